"""Installs outside the source tree, one role at a time, as an edge device or the cloud image would.

- `pip install tandem[edge]` into a fresh virtual environment gives a working edge node, and
  neither torch nor Ray comes with it.
- `pip install tandem[cloud]` (a non-editable install: pip builds the wheel) gives a cloud node
  that compiles the small-M kernel from the source the wheel carries, starts on Ray Serve and
  verifies a round exactly as the in-process target does. This is the closest stand-in for the
  container image these machines can run (no container engine here).

Real processes: pip (with the pinned lock as constraints, served from pip's cache when warm),
the nodes started with `python -m edge_node` / `python -m cloud_node` on the tiny models, and
gRPC calls from this process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import venv
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.tandem.v1 import cloud_pb2, common_pb2, edge_pb2, edge_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _fresh_env(root: Path, extra: str) -> Path:
    """A fresh virtual environment with only `tandem[extra]` installed, from a copy of the tree
    (tracked and untracked-but-not-ignored files: no .venv, no build outputs); its python."""
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
                           str(src / "requirements.lock"), f"{src}[{extra}]"], capture_output=True, text=True,
                          timeout=1200, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    shutil.rmtree(src)  # what runs must come from the installed wheel, not the copied tree
    return py


@pytest.fixture(scope="module")
def edge_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fresh_env(tmp_path_factory.mktemp("edge-extra"), "edge")


@pytest.fixture(scope="module")
def cloud_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fresh_env(tmp_path_factory.mktemp("cloud-extra"), "cloud")


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


def _env(home: Path) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TANDEM_", "PYTHONPATH"))}
    return {**keep, "TANDEM_HOME": str(home)}


def test_the_cloud_wheel_carries_the_kernel_source(cloud_env: Path, tmp_path: Path) -> None:
    probe = ("from cloud_node.kernels import build\n"
             "print(build.SOURCE.is_file(), build.cpu_supported() and build.find_compiler() is not None,"
             " build.load_kernel() is not None)")
    out = subprocess.run([str(cloud_env), "-c", probe], capture_output=True, text=True, timeout=300,
                         env=_env(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    source, can_build, loaded = out.stdout.split()
    assert source == "True", "the wheel has no cloud_node/kernels/smallm_gemm.c"
    assert loaded == can_build, out.stderr[-2000:]  # on a CPU with AVX2 and a compiler, it compiles and loads


def test_the_cloud_node_serves_a_round_from_a_wheel_install(cloud_env: Path, tiny_models, tmp_path: Path) -> None:
    from cloud_node.scorer import TargetModel, read_eos_ids
    from tandem_core.loop import Draft, target_round
    from tandem_core.sampling import SamplingParams
    from tests.support.cloud_client import CloudVerifierClient, draft_round

    argv = [str(cloud_env), "-m", "cloud_node", "--port", "0", "--model-dir", str(tiny_models.target_hf),
            "--dtype", "fp32", "--replica-cpus", "0.5"]
    log = (tmp_path / "cloud.log").open("w")
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
                             env=_env(tmp_path), cwd=tmp_path, start_new_session=True)
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("cloud grpc="), line + (tmp_path / "cloud.log").read_text()[-3000:]
        prompt, drafts = [5, 17, 99, 3], (1, 2, 3, 4)
        with CloudVerifierClient(line.split("=", 1)[1].strip(), open_timeout_s=120) as client:
            client.open(cloud_pb2.SessionSpec(session_id="wheel", prompt_tokens=prompt, max_new_tokens=8,
                                              sampling=common_pb2.SamplingParams()))
            verdict = client.verify(draft_round(1, drafts))
        local = target_round(TargetModel(tiny_models.target_hf, dtype="fp32").new_session(prompt),
                             Draft(drafts, None), SamplingParams(), seed=0, position=len(prompt), remaining=8,
                             eos_ids=read_eos_ids(tiny_models.target_hf))
        assert (verdict.accepted, tuple(verdict.tokens)) == (local.accepted, local.tokens)
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            rc = child.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            rc = child.wait(timeout=10)
        log.close()
    assert rc == 0, (tmp_path / "cloud.log").read_text()[-3000:]
