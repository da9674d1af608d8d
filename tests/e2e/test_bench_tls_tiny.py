"""`tandem bench --methods tandem_grpc,tandem_grpc_tls` on tiny models, with real processes.

Slow: it starts the cloud node (Ray Serve behind its plaintext gateway), a second gateway with
TLS and device tokens in front of the same Serve proxy, and a link shaper for each. Checks: both
networked rows give the target's text, the connection set-up figures are there, and no secret
(a token, a private key) is in the JSON or the output. The figures of tiny models mean nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tandem.cli.main import main

pytestmark = pytest.mark.slow

SECRET = re.compile(r"tdm_[0-9a-f]{12}_|PRIVATE KEY")


@pytest.mark.timeout(420)
def test_tls_method_matches_the_target_and_reports_the_handshake(tiny_models, tmp_path: Path, monkeypatch,
                                                                   capsys) -> None:
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "category": "code", "prompt": "def add(a, b):"}) + "\n")
    out = tmp_path / "bench.json"
    rc = main(["bench", "--prompts", str(prompts), "--max-new-tokens", "8", "--json", str(out), "--dtype", "fp32",
               "--methods", "target,tandem_grpc,tandem_grpc_tls", "--rtt-ms", "0", "--handshake-repeats", "3",
               "--target", str(tiny_models.target_hf), "--drafter", str(tiny_models.drafter_onnx)])
    assert rc == 0
    text = out.read_text()
    doc = json.loads(text)
    rows = {(r["method"], r["category"]): r for r in doc["results"]}
    for method in ("tandem_grpc", "tandem_grpc_tls"):
        assert rows[(method, "all")]["identical_to_target"] is True
    h = doc["tls_handshake"]
    for what in ("health", "open"):
        for kind in ("plain_new_connection", "tls_new_connection", "tls_reused_connection", "plain_reused_connection"):
            assert h[f"{what}_{kind}"]["n"] == 3 and h[f"{what}_{kind}"]["median_ms"] > 0
    captured = capsys.readouterr()
    assert "TLS handshake adds" in captured.out
    for blob in (text, captured.out, captured.err):
        assert not SECRET.search(blob)
