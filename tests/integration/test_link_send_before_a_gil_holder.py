"""A request the edge sends is on the wire before the edge's next drafter pass starts.

gRPC's sending thread needs the GIL, and an onnxruntime-genai pass holds it for the pass's whole
length: the open, put in the queue just before the drafter's first prefill pass, used to leave
only after that pass (+50 ms to the first token, BENCHMARKS.md). Here the "pass" is pure Python
with a switch interval longer than it, which holds the GIL the same way. The peer is a real
gRPC server in another process, on 127.0.0.1, that writes down when the open arrived.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from edge_node import link_stream
from edge_node.link_stream import VerifyStream
from protos.tandem.v1 import cloud_pb2, cloud_pb2_grpc

_PEER = r"""
import sys, time
from concurrent import futures
import grpc
from protos.tandem.v1 import cloud_pb2

def verify(requests, context):
    for request in requests:
        if request.WhichOneof("kind") == "open":
            with open(sys.argv[1], "a") as f:
                f.write(f"{time.time()}\n")
            yield cloud_pb2.VerifyResponse(opened=cloud_pb2.SessionOpened(prompt_len=1, max_draft_len=4,
                                                                          max_context=64, replica="peer"))

server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
handler = grpc.stream_stream_rpc_method_handler(verify, request_deserializer=cloud_pb2.VerifyRequest.FromString,
                                                response_serializer=cloud_pb2.VerifyResponse.SerializeToString)
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("tandem.v1.CloudVerifier", {"Verify": handler})])
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"""

HOLD_S = 1.0  # the "pass": the GIL is held this long


@pytest.fixture()
def peer(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    arrivals = tmp_path / "arrivals.txt"
    proc = subprocess.Popen([sys.executable, "-c", _PEER, str(arrivals)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"127.0.0.1:{port}", arrivals
    finally:
        proc.kill()
        proc.wait()


def _hold_the_gil(seconds: float) -> tuple[float, float]:
    """Busy pure Python that no other thread interrupts (the switch interval is longer)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(5 * seconds)
    try:
        start = time.time()
        while time.time() - start < seconds:
            pass
        return start, time.time()
    finally:
        sys.setswitchinterval(before)


def test_the_open_reaches_the_peer_while_the_next_pass_holds_the_gil(peer: tuple[str, Path],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The bound on the wait (20 ms) is for a pathological link; on a loaded test machine gRPC's
    # thread may take longer to be scheduled, which is not what this test is about.
    monkeypatch.setattr(link_stream, "SEND_WAIT_S", 30.0, raising=False)
    address, arrivals = peer
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stream = VerifyStream(cloud_pb2_grpc.CloudVerifierStub(channel), total_timeout_s=60)
        stream.send(cloud_pb2.VerifyRequest(open=cloud_pb2.SessionSpec(session_id="s", prompt_tokens=[1])))
        start, end = _hold_the_gil(HOLD_S)
        assert stream.recv(30).WhichOneof("kind") == "opened"
        stream.close()
    arrived = float(arrivals.read_text().split()[0])
    assert arrived < end - HOLD_S / 2, (arrived - start, end - start)  # before the pass ended, not after it
