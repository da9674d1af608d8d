"""`tandem up` / `status` / `generate` / `docs` / `down` as real processes on the real pair.

Slow: it starts the whole local stack (Ray Serve cloud node with the 1.5B target, link shaper,
edge node with the 0.5B ONNX drafter, orchestrator with MiniLM) in the background, in its
default secure mode (TLS and a credential on every hop), talks to it through the CLI, the SDK
and the OpenAI-compatible endpoint (with the CA and the API key `status --json` names), cuts
the link with the shaper's control endpoint, and checks that `tandem down` leaves nothing
running and that no log holds a secret. TANDEM_HOME is a
temporary folder whose `models` (and compiled kernels) link to the fetched ones, so the
user's own stack record and personal store are untouched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netshape.control import ShaperControl
from tandem import paths
from tandem.models import registry as models
from tandem_sdk import Client

pytestmark = pytest.mark.slow

CODE_PROMPT = "Write a Python function that reverses a string."


def _tandem(env: dict[str, str], *args: str, timeout: float = 300, stdin: str | None = None
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, input=stdin)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    models.require_pair()
    home = tmp_path_factory.mktemp("tandem-home")
    real = paths.tandem_home()
    (home / "models").symlink_to(real / "models")
    if (real / "kernels").exists():
        (home / "kernels").symlink_to(real / "kernels")
    return home


@pytest.fixture(scope="module")
def env(home: Path) -> dict[str, str]:
    e = dict(os.environ, TANDEM_HOME=str(home))
    e.pop("TANDEM_ADDRESS", None)
    return e


@pytest.fixture(scope="module")
def stack(env, home):
    up = _tandem(env, "up", "--port", "0", "--http-port", "0", "--edge-metrics-port", "0", "--cloud-metrics-port", "0",
                 timeout=900)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        lines = up.stdout.split()
        assert len(lines) == 2 and all(re.fullmatch(r"127\.0\.0\.1:\d+", x) for x in lines), up.stdout
        state = json.loads((home / "run" / "stack.json").read_text())
        assert state["orchestrator_grpc"] == lines[0] and state["orchestrator_http"] == lines[1]
        yield state
    finally:
        down = _tandem(env, "down", timeout=300)  # idempotent: "nothing to stop" after the last test
        assert down.returncode == 0, down.stderr


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_status_shows_every_process_healthy(env, stack) -> None:
    out = _tandem(env, "status")
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("cloud", "shaper", "edge", "orchestrator"):
        assert re.search(rf"^{name}\s+healthy", out.stdout, re.M), out.stdout
    assert "link up, circuit closed" in out.stdout


def _status(env) -> dict:
    out = _tandem(env, "status", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def _key(env) -> str:
    return Path(_status(env)["auth"]["api_key_file"]).read_text().strip()


def test_status_json_names_processes_tls_and_auth(env, stack, home) -> None:
    status = _status(env)
    by_name = {p["name"]: p for p in status["processes"]}
    assert set(by_name) == {"cloud", "shaper", "edge", "orchestrator"}
    assert all(p["healthy"] and re.fullmatch(r"127\.0\.0\.1:\d+", p["grpc"]) for p in by_name.values())
    assert by_name["orchestrator"]["http"] == stack["orchestrator_http"]
    ca, key_file = Path(status["tls"]["ca_cert"]), Path(status["auth"]["api_key_file"])
    assert ca.is_file() and key_file.is_file() and (key_file.stat().st_mode & 0o077) == 0
    assert status["link"]["state"] == "up"


def test_no_secret_on_any_command_line(home, stack) -> None:
    import psutil

    secrets = [p.read_text().strip() for p in (home / "secure").iterdir() if p.suffix in (".key", ".token")]
    assert len(secrets) == 3  # the API key, the edge's key, the edge's cloud token
    cmdlines = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    assert any("serve edge" in c for c in cmdlines)  # the stack's processes are among them
    assert not any(secret in c for c in cmdlines for secret in secrets)


def test_every_hop_refuses_plaintext_and_missing_keys(env, stack) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tandem_sdk import TandemError

    for p in _status(env)["processes"]:
        if p["name"] == "shaper":
            continue
        with grpc.insecure_channel(p["grpc"]) as channel, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    ca = _status(env)["tls"]["ca_cert"]
    with Client(stack["orchestrator_grpc"], timeout_s=10, ca_cert=ca) as client, pytest.raises(TandemError) as err:
        client.status()
    assert "UNAUTHENTICATED" in str(err.value) or err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_auto_routes_code_speculative_at_rtt_0(env, stack) -> None:
    out = _tandem(env, "generate", CODE_PROMPT, "--max-new-tokens", "8", "--json", timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["stats"]["route"] == "speculative", result["stats"]["reason"]
    assert result["stats"]["generated_tokens"] == 8 and result["text"]


def _scrape(url: str, key: str, ca: str) -> set[str]:
    import ssl
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    context = ssl.create_default_context(cafile=ca) if url.startswith("https:") else None
    with urllib.request.urlopen(request, context=context, timeout=30) as reply:
        return {f.name for f in text_string_to_metric_families(reply.read().decode())}


def test_every_process_serves_its_metrics_after_an_answer(env, stack) -> None:
    """After the speculative answer above: the edge's and the orchestrator's /metrics (TLS, key)
    and the cloud replicas' metrics through Ray's exporter, at the URLs `status --json` gives."""
    status = _status(env)
    by_name = {p["name"]: p for p in status["processes"]}
    key, ca = _key(env), status["tls"]["ca_cert"]
    edge_key = Path(status["auth"]["edge_api_key_file"]).read_text().strip()
    assert by_name["shaper"]["metrics"] == ""
    assert "tandem_spec_accepted_tokens" in _scrape(by_name["edge"]["metrics"], edge_key, ca)
    assert "tandem_orch_decisions" in _scrape(by_name["orchestrator"]["metrics"], key, ca)
    deadline = time.monotonic() + 120  # Ray's agent exports the replicas' metrics every few seconds
    while "ray_tandem_cloud_sessions_opened" not in (names := _scrape(by_name["cloud"]["metrics"], key, ca)):
        assert time.monotonic() < deadline, sorted(n for n in names if "tandem" in n)
        time.sleep(2)


def test_openai_endpoint_on_the_real_pair(env, stack) -> None:
    import ssl

    import httpx2  # the HTTP client the pinned openai package uses
    import openai

    ca = ssl.create_default_context(cafile=_status(env)["tls"]["ca_cert"])
    oai = openai.OpenAI(base_url=f"https://{stack['orchestrator_http']}/v1", api_key=_key(env), max_retries=0,
                        timeout=600, http_client=httpx2.Client(verify=ca, timeout=600))
    r = oai.chat.completions.create(model="tandem-local", messages=[{"role": "user", "content": "Say hi."}],
                                    max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4 and r.model_extra["tandem"]["route"] == "local"


def test_private_document_keeps_the_answer_on_the_device(env, stack, tmp_path) -> None:
    note = tmp_path / "locker.txt"
    note.write_text("My locker code at the climbing gym is 7731.")
    added = _tandem(env, "docs", "add", str(note), "--private", "--kind", "note")
    assert added.returncode == 0, added.stderr
    listed = _tandem(env, "docs", "list")
    assert "locker.txt" in listed.stdout and "private" in listed.stdout
    out = _tandem(env, "generate", "What is my gym locker code?", "--personal", "--max-new-tokens", "6", "--json",
                  timeout=600)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)["stats"]
    assert stats["route"] == "local" and "private" in stats["reason"]


def test_link_down_routes_auto_local_within_one_health_interval(env, stack) -> None:
    control = ShaperControl(stack["link_control"])
    with Client(stack["orchestrator_grpc"], timeout_s=30, api_key=_key(env),
                ca_cert=_status(env)["tls"]["ca_cert"]) as client:
        interval_s = 1.0  # the orchestrator's default health interval
        control.set(mode="down")
        try:
            t0 = time.monotonic()
            while client.status().link.state != "down":
                assert time.monotonic() - t0 < interval_s + 1.5, "the link was not seen down within one interval"
                time.sleep(0.05)
            answer = client.complete(prompt=CODE_PROMPT, max_new_tokens=4)
            assert answer.started.route == "local" and "link" in answer.started.reason
        finally:
            control.set(mode="up")


def test_down_stops_everything(env, home, stack) -> None:
    pids = [p["pid"] for p in stack["processes"]]
    out = _tandem(env, "down", timeout=300)
    assert out.returncode == 0, out.stderr
    assert not any(_alive(pid) for pid in pids)
    assert not (home / "run" / "stack.json").exists()
    status = _tandem(env, "status")
    assert status.returncode == 1 and "no local stack" in status.stdout
    secrets = [p.read_text().strip() for p in (home / "secure").glob("*.key")] + \
        [p.read_text().strip() for p in (home / "secure").glob("*.token")]
    assert len(secrets) == 3
    for log in (home / "run" / "logs").rglob("*"):
        if log.is_file():
            text = log.read_text(errors="replace")
            assert not any(secret in text for secret in secrets), f"a secret is in {log}"
