"""The link shaper: a user-space TCP proxy that imposes latency, jitter, bandwidth and outages.

It sits between a client (the edge node) and an upstream server (the cloud node) and forwards
each TCP connection's bytes both ways under the current `LinkConditions`. Direction "up" is client
-> upstream, "down" is upstream -> client.

Guarantees:
- Bytes are never reordered, duplicated or altered within a connection and direction: each side
  is one FIFO queue drained by one writer. A connection either carries its bytes intact and in
  order or is closed.
- Delay model, per direction: a chunk read at time `now` is cut into pieces (64 KiB; smaller under
  a bandwidth limit so delivery stays smooth) and each piece is delivered at
      max(tx_done + max(0, rtt/2 + U(-jitter, +jitter)), previous piece's delivery time)
  where `tx_done` is when the link has finished serializing the piece. Each direction of the link
  is one serializer shared by all connections, sending `bandwidth_kbps * 1000` bit/s (0: no
  serialization delay, `tx_done = now`). Jitter is drawn per piece and never makes a delay
  negative or reorders bytes.
- Backpressure, not loss: a reader stops reading while its direction's serializer has more than
  0.25 s of backlog or its queue is full, so the sender's TCP window fills as on a slow link.
- Conditions are read as each piece is scheduled: changes apply to new bytes at once; pieces
  already scheduled keep their delivery time.
- mode "down": every live connection is reset, and new ones are accepted and reset at once.
- mode "blackhole": new connections are accepted but never connected upstream; bytes read from
  either side are discarded; bytes already in flight are held, not delivered. Leaving blackhole
  resets every live connection: stalled connections are dropped, never resumed.
- `drop_connections()` resets (SO_LINGER 0, so RST) both sides of every live connection and keeps
  accepting new ones.

Not modelled: packet loss, MTU, the TCP handshake's round trip (connecting to the shaper completes
at once and the upstream connect gets no added delay).

The delay model's arithmetic is in `netshape.link` (pure); the control endpoint, when asked for,
is `netshape.control_server`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import random
import socket
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from netshape.link import (
    MAX_PIECE,
    Address,
    DelayLine,
    LinkConditions,
    LinkStats,
    Serializer,
    format_address,
    parse_address,
    piece_size,
)

if TYPE_CHECKING:
    from netshape.control_server import ControlServer

log = logging.getLogger(__name__)

_MAX_BACKLOG_S = 0.25  # serializer backlog above which a reader waits
_QUEUE_PIECES = 256  # pieces queued per direction per connection
_CONNECT_TIMEOUT_S = 10.0
_CALL_TIMEOUT_S = 10.0  # cross-thread calls into the shaper's loop

_UNSHAPED = LinkConditions()  # the default: no delay, no limit, "up"

T = TypeVar("T")


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST where the socket allows SO_LINGER 0, else plainly."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class _Connection:
    """One proxied client connection: four tasks, a reader and a writer per direction."""

    def __init__(self, shaper: LinkShaper, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self._shaper = shaper
        self._reader = reader
        self._writers = [writer]
        self.task: asyncio.Task[None] | None = None  # runs `run`; set by the shaper

    def reset(self) -> None:
        for writer in self._writers:
            _reset(writer)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    async def run(self, blackholed: bool) -> None:
        if blackholed:
            while data := await self._reader.read(MAX_PIECE):
                self._shaper._count("blackholed", len(data))
            self._writers[0].close()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self._shaper.upstream), _CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            log.warning("upstream %s unreachable: %r", format_address(self._shaper.upstream), exc)
            self.reset()
            return
        self._writers.append(up_writer)
        client_writer = self._writers[0]
        try:
            async with asyncio.TaskGroup() as group:
                self._pump(group, self._reader, up_writer, "up")
                self._pump(group, up_reader, client_writer, "down")
        except* OSError as errors:  # a reset or broken pipe on either side ends both
            log.debug("connection ended by %r", errors.exceptions[0])
            self.reset()
        else:  # both directions reached EOF and delivered everything
            for writer in self._writers:
                writer.close()

    def _pump(self, group: asyncio.TaskGroup, src: asyncio.StreamReader,
              dst: asyncio.StreamWriter, direction: str) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUE_PIECES)
        line = DelayLine(self._shaper._serializers[direction], self._shaper._rng)
        group.create_task(self._read_side(src, queue, line))
        group.create_task(self._write_side(dst, queue, direction))

    async def _read_side(self, src: asyncio.StreamReader,
                         queue: asyncio.Queue[tuple[float, bytes] | None], line: DelayLine) -> None:
        loop = asyncio.get_running_loop()
        while data := await src.read(MAX_PIECE):
            size = piece_size(self._shaper.conditions.bandwidth_kbps)
            for start in range(0, len(data), size):
                backlog = line.serializer.backlog(loop.time())
                if backlog > _MAX_BACKLOG_S:
                    await asyncio.sleep(backlog - _MAX_BACKLOG_S)
                conditions = self._shaper.conditions
                piece = data[start:start + size]
                if conditions.mode == "blackhole":
                    self._shaper._count("blackholed", len(piece))
                    continue
                await queue.put((line.schedule(len(piece), loop.time(), conditions), piece))
        await queue.put(None)

    async def _write_side(self, dst: asyncio.StreamWriter,
                          queue: asyncio.Queue[tuple[float, bytes] | None], direction: str) -> None:
        loop = asyncio.get_running_loop()
        while (item := await queue.get()) is not None:
            deliver_at, piece = item
            if deliver_at > loop.time():
                await asyncio.sleep(deliver_at - loop.time())
            await self._shaper._passing.wait()  # in blackhole, in-flight bytes are held here
            dst.write(piece)
            await dst.drain()
            self._shaper._count(direction, len(piece))
        if dst.can_write_eof():
            dst.write_eof()


class LinkShaper:
    """A TCP proxy from a listen address to `upstream` under run-time `LinkConditions`.

    Use it in a running event loop (`await start()` ... `await aclose()`), or as a context manager
    that runs it on its own loop in a background thread. The public methods may be called from
    any thread.
    """

    def __init__(self, upstream: Address | str, conditions: LinkConditions = _UNSHAPED, *,
                 listen: Address = ("127.0.0.1", 0), control: Address | None = None,
                 seed: int | None = None) -> None:
        self.upstream = parse_address(upstream) if isinstance(upstream, str) else upstream
        self._conditions = conditions
        self._listen = listen
        self._control = control
        self._rng = random.Random(seed)
        self._serializers = {"up": Serializer(), "down": Serializer()}
        self._counts = dict.fromkeys(
            ("up", "down", "blackholed", "accepted", "dropped", "refused"), 0)
        self._live: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._passing: asyncio.Event = asyncio.Event()  # set unless mode is "blackhole"
        self._server: asyncio.Server | None = None
        self._control_server: ControlServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def conditions(self) -> LinkConditions:
        return self._conditions

    @property
    def address(self) -> Address:
        """The listen address actually bound (port 0 resolved)."""
        assert self._server is not None, "not started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def control_address(self) -> Address | None:
        """The control endpoint's bound address, or None when it has none."""
        return None if self._control_server is None else self._control_server.address

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._conditions.mode != "blackhole":
            self._passing.set()
        self._server = await asyncio.start_server(self._accept, *self._listen)
        if self._control is not None:
            from netshape.control_server import start_control_server  # needs aiohttp

            try:
                self._control_server = await start_control_server(self, *self._control)
            except BaseException:
                self._server.close()
                raise
        log.info("shaping %s -> %s under %s", format_address(self.address),
                 format_address(self.upstream), self._conditions)

    async def aclose(self) -> None:
        if self._control_server is not None:
            await self._control_server.aclose()
        if self._server is not None:
            self._server.close()
        tasks = [conn.task for conn in self._live if conn.task is not None]
        self._drop_all()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def set_conditions(self, conditions: LinkConditions | None = None,
                       **fields: Any) -> LinkConditions:
        """Replace the conditions, or change only `fields`; returns the conditions now in force."""
        names = {f.name for f in dataclasses.fields(LinkConditions)}
        for name in fields:
            if name not in names:
                raise ValueError(f"{name}: not a LinkConditions field ({', '.join(sorted(names))})")
        base = self._conditions if conditions is None else conditions
        new = dataclasses.replace(base, **fields)
        return self._in_loop(self._apply, new)

    def drop_connections(self) -> int:
        """Reset every live connection now; returns how many."""
        return self._in_loop(self._drop_all)

    def stats(self) -> LinkStats:
        c = self._counts
        return LinkStats(bytes_up=c["up"], bytes_down=c["down"], bytes_blackholed=c["blackholed"],
                         connections_accepted=c["accepted"], connections_active=len(self._live),
                         connections_dropped=c["dropped"], connections_refused=c["refused"])

    def __enter__(self) -> LinkShaper:
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,),
                                        name="netshape", daemon=True)
        self._thread.start()
        ready.result(timeout=_CALL_TIMEOUT_S)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_CALL_TIMEOUT_S)

    def _thread_main(self, ready: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self.start())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            ready.set_exception(exc)
            loop.close()
            return
        ready.set_result(None)
        try:
            loop.run_forever()
            loop.run_until_complete(self.aclose())
        finally:
            loop.close()

    def _in_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the shaper's loop and wait for it, whatever thread we are on."""
        loop = self._loop
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is None or loop is here or not loop.is_running():
            return fn(*args)
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                done.set_exception(exc)

        loop.call_soon_threadsafe(call)
        return done.result(timeout=_CALL_TIMEOUT_S)

    def _apply(self, new: LinkConditions) -> LinkConditions:
        old, self._conditions = self._conditions, new
        if new.mode == "down" or (old.mode == "blackhole" and new.mode != "blackhole"):
            self._drop_all()
        if new.mode == "blackhole":
            self._passing.clear()
        else:
            self._passing.set()
        log.info("conditions now %s", new)
        return new

    def _drop_all(self) -> int:
        live = list(self._live)
        self._live.clear()
        for conn in live:
            conn.reset()
        self._counts["dropped"] += len(live)
        if live:
            log.info("dropped %d connections", len(live))
        return len(live)

    def _count(self, what: str, n: int = 1) -> None:
        self._counts[what] += n

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._count("accepted")
        mode = self._conditions.mode
        if mode == "down":
            self._count("refused")
            _reset(writer)
            return
        conn = _Connection(self, reader, writer)
        self._live.add(conn)
        # Our own task, not this callback's: asyncio logs a cancelled callback task as an error.
        conn.task = asyncio.create_task(conn.run(blackholed=mode == "blackhole"))
        conn.task.add_done_callback(lambda task: self._finished(conn, task))

    def _finished(self, conn: _Connection, task: asyncio.Task[None]) -> None:
        self._live.discard(conn)
        if not task.cancelled() and task.exception() is not None:
            log.error("connection failed", exc_info=task.exception())
