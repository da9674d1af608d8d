"""The edge extra alone: `pip install tandem[edge]` into a fresh virtual environment gives a working
edge node, and neither torch nor Ray comes with it.

Real processes: pip (with the pinned lock as constraints, served from pip's cache when warm), the
edge node started with `python -m edge_node` on the tiny ONNX drafter, a health check and one
generation over gRPC from this process.
"""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.tandem.v1 import common_pb2, edge_pb2, edge_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def edge_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with only `tandem[edge]` installed (from a copy of the tree)."""
    root = tmp_path_factory.mktemp("edge-extra")
    src = root / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "--progress-bar", "off", "-q", "-c",
                           str(src / "requirements.lock"), f"{src}[edge]"], capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return py


def _installed(py: Path) -> set[str]:
    out = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], check=True, capture_output=True,
                         text=True).stdout
    return {line.split("==")[0].lower() for line in out.splitlines() if line}


def test_the_edge_extra_brings_no_torch_and_no_ray(edge_env: Path) -> None:
    installed = _installed(edge_env)
    assert {"onnxruntime", "onnxruntime-genai", "grpcio", "tandem"} <= installed
    assert not installed & {"torch", "ray", "transformers"}, sorted(installed)
    probe = "import importlib.util as u; print([m for m in ('torch', 'ray') if u.find_spec(m)])"
    assert subprocess.run([str(edge_env), "-c", probe], check=True, capture_output=True,
                          text=True).stdout.strip() == "[]"


def test_the_edge_node_runs_from_the_edge_extra(edge_env: Path, tiny_models) -> None:
    help_run = subprocess.run([str(edge_env), "-m", "edge_node", "--help"], capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0 and "--cloud" in help_run.stdout, help_run.stderr
    child = subprocess.Popen([str(edge_env), "-m", "edge_node", "--drafter", str(tiny_models.drafter_onnx)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("edge grpc="), line + child.stderr.read()  # type: ignore[union-attr]
        address = line.split("=", 1)[1].strip()
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            request = edge_pb2.EdgeGenerateRequest(prompt_tokens=[5, 6, 7], max_new_tokens=6,
                                                   sampling=common_pb2.SamplingParams())
            replies = list(edge_pb2_grpc.EdgeNodeStub(channel).Generate(request, timeout=60))
        tokens = [t for r in replies if r.HasField("delta") for t in r.delta.tokens]
        stats = replies[-1].stats
        assert tokens and stats.generated_tokens == len(tokens) <= 6 and stats.route == "local"
    finally:
        child.terminate()
        assert child.wait(timeout=30) == 0
