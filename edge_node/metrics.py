"""The edge node's Prometheus metrics (prometheus-client) and its `/metrics` endpoint.

Guarantees:
- The instruments are those `tandem.metric_defs` defines for the edge, in this node's own
  registry (`REGISTRY`), created once per process.
- Figures come from where they are final: `record_result` reads an answer's `EdgeResult` (its
  `RequestStats`, switches, resumes, bytes, TTFT and drafter prefill), so the counters move by
  exactly what the answer's statistics message reports. Inter-token gaps are timed by the
  servicer as committed tokens leave (`TokenGaps`). No label holds a per-request value: draft
  positions past `MAX_POSITION` are counted under `MAX_POSITION`.
- `serve_metrics` serves the text exposition at `/metrics` (anything else 404). With a key every
  request must carry `Authorization: Bearer KEY` (401 otherwise); with TLS it speaks HTTPS only.
  Beyond loopback it needs both, unless `insecure` (the house rule, `tandem.security.check_bind`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edge_node.generation import EdgeResult
from tandem.metric_defs import EDGE, MAX_POSITION, prometheus_instruments
from tandem.security import ServerTls, bearer_from, check_bind, same_secret

REGISTRY = CollectorRegistry(auto_describe=True)
M: dict[str, Any] = prometheus_instruments(EDGE, REGISTRY)


def _counts(name: str, counts: list[int]) -> None:
    """Observe value i counts[i] times in the histogram `name`."""
    hist = M[name]
    for value, n in enumerate(counts):
        for _ in range(n):
            hist.observe(value)


def record_result(r: EdgeResult) -> None:
    """Count one finished answer (see the module docstring)."""
    s = r.stats
    finish = r.finish_reason.value if r.finish_reason is not None else "none"
    M["tandem_edge_requests_total"].labels(route=r.route, finish_reason=finish).inc()
    cloud_source = "cloud" if r.route == "cloud" else "verified"
    M["tandem_edge_generated_tokens_total"].labels(source=cloud_source).inc(r.verified_tokens)
    M["tandem_edge_generated_tokens_total"].labels(source="local").inc(r.local_tokens)
    M["tandem_spec_drafts_total"].inc(s.rounds)
    M["tandem_spec_draft_tokens_total"].inc(s.drafted)
    M["tandem_spec_accepted_tokens_total"].inc(s.accepted)
    M["tandem_spec_bonus_tokens_total"].inc(s.round_tokens - s.accepted)
    M["tandem_spec_retrieval_draft_tokens_total"].inc(s.retrieval_drafted)
    M["tandem_spec_retrieval_accepted_tokens_total"].inc(s.retrieval_accepted)
    for position, n in enumerate(s.accepted_by_position):
        M["tandem_spec_accepted_tokens_per_position_total"].labels(position=str(min(position, MAX_POSITION))).inc(n)
    _counts("tandem_spec_tokens_per_round", s.rounds_by_emitted)
    _counts("tandem_spec_draft_length", s.rounds_by_drafted)
    if r.tokens:
        M["tandem_edge_ttft_seconds"].labels(route=r.route).observe(r.ttft_s)
    if s.drafter_prefill_tokens or r.drafter_prefill_s:
        M["tandem_edge_drafter_prefill_seconds"].observe(r.drafter_prefill_s)
    M["tandem_edge_resumes_total"].inc(r.resumes)
    for switch in r.switches:
        M["tandem_edge_fallbacks_total"].labels(cause=str(switch.cause)).inc()
    M["tandem_edge_link_bytes_total"].labels(direction="up").inc(r.bytes_up)
    M["tandem_edge_link_bytes_total"].labels(direction="down").inc(r.bytes_down)


def record_refused(code: str) -> None:
    M["tandem_edge_refused_total"].labels(code=code).inc()


def track_running(running: Callable[[], int]) -> None:
    """The active-generations gauge reads `running()` at each scrape (the last node built wins)."""
    M["tandem_edge_active_generations"].set_function(running)


class TokenGaps:
    """Times the gaps between committed tokens of one answer; a piece of n tokens after a gap g
    counts n gaps of g / n (the first piece's wait is TTFT, not a gap)."""

    def __init__(self) -> None:
        self._last: float | None = None
        self._gaps: list[tuple[float, int]] = []

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self._last is not None:
            self._gaps.append(((now - self._last) / n, n))
        self._last = now

    def record(self, route: str) -> None:
        hist = M["tandem_edge_inter_token_seconds"].labels(route=route)
        for gap, n in self._gaps:
            for _ in range(n):
                hist.observe(gap)


def exposition() -> bytes:
    return generate_latest(REGISTRY)


def _handler(key: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self._reply(404, b"not found\n", "text/plain")
                return
            given = bearer_from(self.headers.items())
            if key is not None and not (given and same_secret(given, key)):
                self._reply(401, b"missing or wrong bearer key\n", "text/plain", {"WWW-Authenticate": "Bearer"})
                return
            self._reply(200, exposition(), CONTENT_TYPE_LATEST)

        def _reply(self, code: int, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: no access log
            pass

    return Handler


class MetricsServer:
    """`/metrics` on its own port, served by a daemon thread; `stop()` closes it."""

    def __init__(self, host: str, port: int, *, tls: ServerTls | None, key: str | None, insecure: bool) -> None:
        check_bind("edge metrics", host, tls=tls is not None, credential=key is not None, insecure=insecure)
        self._server = ThreadingHTTPServer((host, port), _handler(key))
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.ssl_context().wrap_socket(self._server.socket, server_side=True)
        self.port = int(self._server.server_address[1])
        self.scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="edge-metrics")

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
