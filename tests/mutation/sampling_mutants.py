"""Deliberate bugs in the sampling code, applied one at a time to a scratch copy (issue 14, item 1).

Usage (from the repository root):

    .venv/bin/python tests/mutation/sampling_mutants.py            # every mutant, one at a time
    .venv/bin/python tests/mutation/sampling_mutants.py --list     # the mutants, run nothing
    .venv/bin/python tests/mutation/sampling_mutants.py -k bonus   # those whose name contains "bonus"
    .venv/bin/python tests/mutation/sampling_mutants.py --stats    # also: do the chi-square checks alone kill it?

A full run takes about 10 minutes on one core (20 with --stats); it prints a markdown table.

The packages and the tests are copied to a temporary directory; each mutant replaces one exact
piece of text in one file of the copy (it must occur exactly once), pytest runs there with
`-x`, and the copy's file is restored. The working tree is never written and git is not used.
First the tests that existed before issue 14 run ("before"), then the new ones ("after"); a
mutant is killed when a test fails or errors. The unmutated copy must pass both sets first.
Survivors are listed with the reason each is equivalent (`Mutant.equivalent`, which also says
why the answers' distribution cannot show a bug that only a direct test kills); `tests/README.md`
records the last run. The exit status is 1 if a mutant survives with no reason given.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COPIED = ["tandem", "tandem_core", "edge_node", "cloud_node", "protos", "tests", "pyproject.toml"]
BEFORE = ["tests/unit/test_sampling.py", "tests/unit/test_verify_stochastic.py", "tests/unit/test_verify_greedy.py",
          "tests/unit/test_verdict_check.py"]
AFTER = ["tests/unit/test_sampling_rows_and_keys.py", "tests/integration/test_sampling_pipeline_fake_models.py"]
STATISTICAL = "answers_follow"  # the chi-square checks against the exact distribution, in AFTER


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # exact text, found exactly once
    new: str
    # Why the answers' distribution cannot show it (so the statistical tests alone cannot kill
    # it); empty if they must. A mutant with a reason may still be killed by a direct test.
    equivalent: str = ""


VERIFY, LOOP, SAMPLING = "tandem_core/verify.py", "tandem_core/loop.py", "tandem_core/sampling.py"
DRAFTER, LINK = "edge_node/drafter.py", "edge_node/cloud_link.py"
VALIDATION, VERIFIER = "cloud_node/validation.py", "cloud_node/verifier.py"
ACCEPT_P = "[p_arr.item(i, t) for i, t in enumerate(x)]"
ACCEPT_Q = "[q_arr.item(i, t) for i, t in enumerate(x)]"
RESIDUAL = "nxt = sample(_residual(p_arr[accepted], q_arr[accepted]), rng)"
CHOOSE = "return sample(q, round_rng(self._seed, DRAFTER_STREAM, position)), q"

MUTANTS = [
    # --- verification: rows ------------------------------------------------------------------
    Mutant("acceptance reads p from the next row", VERIFY, ACCEPT_P, "[p_arr.item(i + 1, t) for i, t in enumerate(x)]"),
    Mutant("acceptance reads q from the previous row", VERIFY, ACCEPT_Q, "[q_arr.item(i - 1, t) for i, t in enumerate(x)]"),
    Mutant("acceptance reads p from row 0 for every draft", VERIFY, ACCEPT_P, "[p_arr.item(0, t) for i, t in enumerate(x)]"),
    Mutant("residual built from the next row's p", VERIFY, RESIDUAL,
           "nxt = sample(_residual(p_arr[accepted + 1], q_arr[accepted]), rng)"),
    Mutant("residual built from the previous row's q", VERIFY, RESIDUAL,
           "nxt = sample(_residual(p_arr[accepted], q_arr[accepted - 1]), rng)"),
    Mutant("residual built from the wrong q (row 0's)", VERIFY, RESIDUAL,
           "nxt = sample(_residual(p_arr[accepted], q_arr[0]), rng)"),
    Mutant("recovered token drawn from p, not the residual", VERIFY, RESIDUAL, "nxt = sample(p_arr[accepted], rng)"),
    Mutant("bonus token drawn from the previous row", VERIFY, "nxt = sample(p_arr[k], rng)",
           "nxt = sample(p_arr[k - 1], rng)"),
    # --- verification: the rule --------------------------------------------------------------
    Mutant("residual is max(0, q - p)", VERIFY, "r = np.maximum(p - q, 0.0)", "r = np.maximum(q - p, 0.0)"),
    Mutant("acceptance ratio inverted (u * p < q)", VERIFY, "if not u_i * q_i < p_i:", "if not u_i * p_i < q_i:"),
    Mutant("acceptance test u * q <= p (>= vs >)", VERIFY, "if not u_i * q_i < p_i:", "if not u_i * q_i <= p_i:",
           equivalent="differs only when u * q == p exactly (probability 0 for the continuous u); "
                      "test_count_accepted_rule pins the documented strict rule anyway"),
    Mutant("all-accepted counted as k - 1 (off by one)", VERIFY, "    return len(p_x)\n",
           "    return len(p_x) - 1\n"),
    Mutant("one uniform shared by every draft of a round", VERIFY, "u = rng.random(k).tolist()",
           "u = [rng.random()] * k"),
    Mutant("residual not normalized", VERIFY, "return r / mass if mass > 0 else p / float(p.sum())",
           "return r if mass > 0 else p / float(p.sum())",
           equivalent="`sample` draws by inverse CDF scaled by the vector's total, so an unnormalized "
                      "residual gives the same token for the same u"),
    Mutant("empty residual falls back to q", VERIFY, "else p / float(p.sum())", "else q / float(q.sum())",
           equivalent="for the statistics: the residual is empty only when p == q up to rounding "
                      "(test_an_empty_residual_falls_back_to_p pins the documented fallback)"),
    # --- the loop and its keys -----------------------------------------------------------------
    Mutant("target transform skipped (p from plain softmax)", LOOP, "p = logits_to_probs(target_logits, params)",
           "p = logits_to_probs(target_logits, SamplingParams(temperature=1.0))"),
    Mutant("verifier stream not keyed by position", LOOP, "rng = round_rng(seed, VERIFIER_STREAM, position)",
           "rng = round_rng(seed, VERIFIER_STREAM, 0)"),
    Mutant("TargetVerifier advances its position by the accepted drafts only", LOOP,
           "self.position += len(verdict.tokens)", "self.position += verdict.accepted"),
    Mutant("TargetVerifier keys by generated count, not absolute position", LOOP,
           "self.position, self.end = start, start + max_new_tokens",
           "self.position, self.end = 0, max_new_tokens",
           equivalent="for the statistics: each position still has its own stream; only the seeded "
                      "tokens change, which the tests keyed on absolute positions see"),
    Mutant("loop drafts past the budget", LOOP, "k = min(wanted, max_new_tokens - produced - 1)",
           "k = min(wanted, max_new_tokens - produced)",
           equivalent="for the answers: `finalize` cuts the round at the budget, so only wasted drafting "
                      "changes (test_no_round_drafts_past_the_budget_with_fake_models pins the budget)"),
    # --- sampling.py -------------------------------------------------------------------------
    Mutant("round_rng ignores the position", SAMPLING, "np.random.default_rng([seed, stream, position])",
           "np.random.default_rng([seed, stream])"),
    Mutant("drafter and verifier share one stream", SAMPLING, "VERIFIER_STREAM = 1", "VERIFIER_STREAM = 0"),
    Mutant("temperature not applied", SAMPLING, "    z /= params.temperature\n", "\n"),
    Mutant("softmax not normalized", SAMPLING, "    z /= z.sum(axis=1, keepdims=True)\n", "\n"),
    Mutant("top-p keeps one token too many", SAMPLING, 'np.searchsorted(mass, top_p, side="left")) + 1',
           'np.searchsorted(mass, top_p, side="left")) + 2'),
    Mutant("sample picks on the left of a CDF step", SAMPLING, 'cdf.searchsorted(u * total, side="right")',
           'cdf.searchsorted(u * total, side="left")',
           equivalent="for the statistics: differs only when u * total equals a CDF value exactly "
                      "(probability ~2**-53 per draw); test_sample_is_inverse_cdf_and_skips_zero_mass pins it"),
    Mutant("cap_support keeps the least likely tokens", SAMPLING, "keep = np.argpartition(q, -n)[-n:]",
           "keep = np.argpartition(q, n)[:n]"),
    Mutant("cap_support not float32-exact", SAMPLING, "out[keep] = (vals / vals.sum()).astype(np.float32)",
           "out[keep] = vals / vals.sum()",
           equivalent="for the statistics: the edge samples from values 1e-8 away from those sent; "
                      "the float32-exactness test sees it"),
    # --- the edge drafter and the wire -----------------------------------------------------------
    Mutant("drafter samples from the uncapped q, sends the capped one", DRAFTER, CHOOSE,
           "return sample(logits_to_probs(logits, self._params), round_rng(self._seed, DRAFTER_STREAM, position)), q"),
    Mutant("drafter samples from the capped q, sends the uncapped one", DRAFTER, CHOOSE,
           "return sample(q, round_rng(self._seed, DRAFTER_STREAM, position)), logits_to_probs(logits, self._params)"),
    Mutant("drafter transform skipped", DRAFTER, "q = cap_support(logits_to_probs(logits, self._params), self._q_support)",
           "q = cap_support(logits_to_probs(logits, SamplingParams(temperature=1.0)), self._q_support)",
           equivalent="for the statistics: rejection sampling is lossless for any q the drafter samples "
                      "from and sends; only acceptance drops (the as-sent and self-drafting tests see it)"),
    Mutant("drafter stream keyed by the round, not the position", DRAFTER,
           "token, q = self._choose(logits, self.committed_len + len(tokens))",
           "token, q = self._choose(logits, self.committed_len)"),
    Mutant("q rows sent in reverse order", LINK, "    for row in q:\n", "    for row in q[::-1]:\n"),
    Mutant("q rows sent as float64", LINK, "probs=row[ids].astype(np.float32).tolist()", "probs=row[ids].tolist()",
           equivalent="cap_support already rounds q to float32 values, and the proto's probs field is a "
                      "32-bit float: the bytes sent are the same"),
    # --- the cloud -------------------------------------------------------------------------------
    Mutant("cloud writes each q row into the previous row", VALIDATION, "q[i, ids_a] = probs_a / float(probs_a.sum())",
           "q[i - 1, ids_a] = probs_a / float(probs_a.sum())"),
    Mutant("cloud does not renormalize the q rows", VALIDATION, "q[i, ids_a] = probs_a / float(probs_a.sum())",
           "q[i, ids_a] = probs_a",
           equivalent="for the statistics: float32 rows sum to 1 within ~1e-6, far below what any "
                      "sample size can see (the as-sent test pins the renormalization exactly)"),
    Mutant("cloud stream keyed by the prompt length, not the position", VERIFIER,
           "position = len(record.committed)", "position = record.prompt_len"),
    Mutant("cloud ignores the request's seed", VERIFIER, "resolve_seed(checked.seed)", "resolve_seed(None)",
           equivalent="for the statistics: fresh entropy is as good as the seed; only reproducibility is "
                      "lost, which the in-process comparison sees"),
]


def copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


def run_pytest(where: Path, files: list[str], timeout_s: float, select: str = "") -> tuple[bool, str]:
    """(passed, the first failing test or the reason) for `files` run in the copy."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(where)}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=-rfE", *files]
    if select:
        cmd += ["-k", select]
    try:
        done = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return False, f"timeout after {timeout_s:.0f} s"
    if done.returncode == 0:
        return True, ""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, flags=re.M)
    return False, failed[0] if failed else f"pytest exit {done.returncode}: {done.stdout[-300:]}"


def check_imports_come_from(where: Path) -> None:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(where)}
    out = subprocess.run([sys.executable, "-c", "import tandem_core, edge_node, cloud_node; "
                          "print(tandem_core.__file__, edge_node.__file__, cloud_node.__file__)"],
                         cwd=where, env=env, capture_output=True, text=True, check=True).stdout
    if any(not Path(p).is_relative_to(where) for p in out.split()):
        raise SystemExit(f"the copy is not what gets imported: {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="pattern", default="", help="only mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--stats", action="store_true",
                        help=f"also run the chi-square checks alone (pytest -k {STATISTICAL!r}) on each mutant")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.pattern in m.name]
    if args.list:
        for m in mutants:
            print(f"{m.path}: {m.name}" + (" (equivalent)" if m.equivalent else ""))
        return 0
    with tempfile.TemporaryDirectory(prefix="sampling-mutants-") as tmp:
        where = Path(tmp)
        copy_tree(where)
        check_imports_come_from(where)
        for files in (BEFORE, AFTER):
            ok, why = run_pytest(where, files, args.timeout)
            if not ok:
                raise SystemExit(f"the unmutated copy fails {files}: {why}")
        rows = [run_mutant(where, m, args.timeout, args.stats) for m in mutants]
    return report(rows, args.stats)


@dataclass(frozen=True)
class Outcome:
    mutant: Mutant
    before: str  # the first test that failed among those before issue 14, or ""
    after: str  # the first that failed among the new ones, or ""
    stats: str  # the first chi-square check that failed (with --stats), or ""
    seconds: float

    @property
    def killed(self) -> bool:
        return bool(self.before or self.after)


def run_mutant(where: Path, m: Mutant, timeout_s: float, stats: bool) -> Outcome:
    target = where / m.path
    original = target.read_text()
    if original.count(m.old) != 1:
        raise SystemExit(f"{m.name}: the text to replace occurs {original.count(m.old)} times in {m.path}")
    t0 = time.perf_counter()
    target.write_text(original.replace(m.old, m.new))
    try:
        before = run_pytest(where, BEFORE, timeout_s)[1]
        after = run_pytest(where, AFTER, timeout_s)[1]
        by_stats = run_pytest(where, AFTER, timeout_s, STATISTICAL)[1] if stats else ""
    finally:
        target.write_text(original)
    out = Outcome(m, before, after, by_stats, time.perf_counter() - t0)
    print(f"{'killed  ' if out.killed else 'SURVIVED'} {m.name} ({out.seconds:.0f} s): before: {before or '-'}; "
          f"after: {after or '-'}" + (f"; chi-square: {by_stats or '-'}" if stats else ""), flush=True)
    return out


def short(test: str) -> str:
    return test.rsplit("::", 1)[-1] if test else "no"


def report(rows: list[Outcome], stats: bool) -> int:
    print(f"\nkilled {sum(r.killed for r in rows)} of {len(rows)} "
          f"(by the tests from before issue 14: {sum(bool(r.before) for r in rows)}"
          + (f"; by the chi-square checks alone: {sum(bool(r.stats) for r in rows)}" if stats else "") + ")")
    print("\n| deliberate bug | file | killing test (new) | chi-square alone | before |\n|---|---|---|---|---|")
    for r in rows:
        chi = short(r.stats) if stats else "not run"
        print(f"| {r.mutant.name} | `{r.mutant.path}` | {short(r.after)} | {chi} | {short(r.before)} |")
    unexplained = [r for r in rows if not r.killed and not r.mutant.equivalent]
    for r in rows:
        if not r.killed:
            print(f"  survivor: {r.mutant.name} -- {r.mutant.equivalent or 'NOT EXPLAINED'}")
    if stats:
        for r in rows:
            if not r.stats and not r.mutant.equivalent:
                print(f"  note: the chi-square checks alone miss {r.mutant.name} (a direct test kills it)")
    return 1 if unexplained else 0


if __name__ == "__main__":
    raise SystemExit(main())
