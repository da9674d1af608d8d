"""End to end on the real pair (Qwen2.5-Coder 0.5B int4 ONNX drafting for the 1.5B target).

Slow: the 1.5B target runs at a few tokens per second here, so outputs stay short. The models
come from `tandem models fetch`, which the test command runs first; a missing pair fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tandem.models import registry as models
from tandem_core.sampling import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fp32_pair():
    from tandem.pair import LocalPair

    target, drafter = models.require_pair()
    return LocalPair(target, drafter, dtype="fp32")


@pytest.mark.parametrize("content", [
    "Write a Python function that returns the square of a number.",
    "Describe autumn in one sentence.",
])
def test_greedy_speculative_equals_target_on_the_real_pair_fp32(fp32_pair, content: str) -> None:
    from cloud_node.scorer import encode_prompt

    ids = encode_prompt(fp32_pair.tokenizer, messages=[{"role": "user", "content": content}])
    target = fp32_pair.target_generate(ids, SamplingParams(), max_new_tokens=12)
    spec = fp32_pair.speculative_generate(ids, SamplingParams(), draft_len=4, max_new_tokens=12)
    assert spec.tokens == target.tokens
    assert len(spec.tokens) == 12
    # The real drafter agrees with the target often: far fewer target passes than tokens.
    assert spec.stats.accepted > 0
    assert spec.stats.target_forwards_per_token < 1.0


_STACK_MARKERS = ("raylet", "gcs_server", "netshape", "serve cloud", "serve edge", "serve orchestrator", "cloud_node",
                  "ray::")


def _stack_pids() -> set[int]:
    import psutil

    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if any(marker in cmd for marker in _STACK_MARKERS):
            pids.add(proc.info["pid"])
    return pids


def test_demo_runs_as_processes_streams_the_answer_and_leaves_nothing_running() -> None:
    before = _stack_pids()
    out = subprocess.run([sys.executable, "-m", "tandem", "demo", "--max-new-tokens", "16"],
                         capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "palindrome" in out.stdout  # the prompt echo
    assert "tok/s" in out.stdout and "acceptance" in out.stdout and "bytes up" in out.stdout
    assert "route speculative" in out.stdout  # the orchestrator's choice for code at RTT 0, with its reason
    assert "start-up took" in out.stderr and "all processes healthy" in out.stderr
    assert _stack_pids() - before == set(), "the demo left processes running"


def test_demo_rejects_bad_flags_with_exit_code_2() -> None:
    out = subprocess.run([sys.executable, "-m", "tandem", "demo", "--top-p", "1.5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "top_p" in out.stderr
    assert "Traceback" not in out.stderr
