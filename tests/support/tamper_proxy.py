"""An attacker on the path, for tests: a TCP proxy that rewrites gRPC messages going to the client.

It stands where the link shaper stands (client -> proxy -> upstream, plaintext HTTP/2). Bytes
from the client go upstream verbatim. Bytes from upstream are read as HTTP/2 frames (RFC 9113
§4.1); the payloads of each stream's DATA frames are reassembled into gRPC messages (a 1-byte
compressed flag and a 4-byte big-endian length, then the message), and every whole uncompressed
message passes through `rewrite(bytes) -> bytes` before it is framed again. Other frames pass
unchanged. A rewrite may change a message's length: the frame and message lengths follow (flow
control then drifts by those few bytes, harmless for small messages). Padding is dropped.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

_DATA, _END_STREAM, _PADDED = 0, 0x1, 0x8
_HEADER = 9  # HTTP/2 frame header: length (3), type, flags, stream id (4)
_PREFIX = 5  # gRPC message prefix: compressed flag, length (4)

Rewrite = Callable[[bytes], bytes]


class Http2Rewriter:
    """Upstream-to-client HTTP/2 bytes in, the same frames out with gRPC messages rewritten."""

    def __init__(self, rewrite: Rewrite) -> None:
        self._rewrite = rewrite
        self._buffer = bytearray()
        self._messages: dict[int, bytearray] = {}  # per stream: DATA bytes not yet a whole message

    def feed(self, data: bytes) -> bytes:
        """The whole frames that `data` completes, rewritten; a partial frame waits for more."""
        self._buffer += data
        out = bytearray()
        while len(self._buffer) >= _HEADER:
            length = int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < _HEADER + length:
                break
            header, payload = bytes(self._buffer[:_HEADER]), bytes(self._buffer[_HEADER:_HEADER + length])
            del self._buffer[:_HEADER + length]
            out += self._data(header, payload) if header[3] == _DATA else header + payload
        return bytes(out)

    def _data(self, header: bytes, payload: bytes) -> bytes:
        flags, stream = header[4], int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
        if flags & _PADDED:
            payload, flags = payload[1:len(payload) - payload[0]], flags & ~_PADDED
        pending = self._messages.setdefault(stream, bytearray())
        pending += payload
        body = bytearray()
        while len(pending) >= _PREFIX and len(pending) >= _PREFIX + int.from_bytes(pending[1:5], "big"):
            compressed, size = pending[0], int.from_bytes(pending[1:5], "big")
            message = bytes(pending[_PREFIX:_PREFIX + size])
            del pending[:_PREFIX + size]
            if not compressed:
                message = self._rewrite(message)
            body += bytes([compressed]) + len(message).to_bytes(4, "big") + message
        if flags & _END_STREAM:
            body += self._messages.pop(stream)
        return len(body).to_bytes(3, "big") + bytes([_DATA, flags]) + header[5:9] + body


class LoopbackProxy:
    """Listens on 127.0.0.1 (port 0) and forwards each connection to `upstream` ("host:port")
    through `transforms(connection index)` = (client-to-upstream, upstream-to-client) byte
    transforms. A context manager; `address` is "host:port"."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._connections = 0

    def transforms(self, index: int) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
        raise NotImplementedError

    def __enter__(self) -> LoopbackProxy:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _close(self._listener)  # shutdown wakes the accept() that close alone would leave blocked
        for sock in list(self._sockets):
            _close(sock)
        for thread in self._threads:
            thread.join(5)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name=type(self).__name__)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed by __exit__
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=10)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            up, down = self.transforms(self._connections)
            self._connections += 1
            self._spawn(_pump, client, upstream, up)
            self._spawn(_pump, upstream, client, down)


class TamperProxy(LoopbackProxy):
    """A `LoopbackProxy` rewriting the gRPC messages that come back."""

    def __init__(self, upstream: str, rewrite: Rewrite) -> None:
        super().__init__(upstream)
        self._rewrite = rewrite

    def __enter__(self) -> TamperProxy:
        super().__enter__()
        return self

    def transforms(self, index: int) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
        return (lambda data: data), Http2Rewriter(self._rewrite).feed


def _pump(src: socket.socket, dst: socket.socket, transform: Callable[[bytes], bytes]) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(transform(data))
    except OSError:
        pass
    finally:
        _close(dst)
        _close(src)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
