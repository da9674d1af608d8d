"""Per-round and per-request speculative-decoding statistics.

Guarantees:
- `RoundStats` is checked on construction: 0 <= accepted <= drafted and
  accepted <= emitted <= accepted + 1 (a round commits its kept drafts plus at most one target
  token), so the aggregates below are internally consistent.
- Every ratio is None, never NaN or a ZeroDivisionError, when its denominator is 0.
- `RequestStats.to_dict()` holds plain JSON types only (int, float, None, and one str -> int map).

Definitions (p = target, q = drafter, as in `tandem_core.verify`):
- acceptance_rate = accepted / drafted: the empirical per-draft acceptance probability (the
  paper's alpha when k is fixed; Leviathan et al. 2023, arXiv 2211.17192).
- mean_accepted_len = tokens committed by speculative rounds / rounds, i.e. accepted drafts plus
  the recovered or bonus token, averaged per round: the paper's expected tokens per iteration,
  often written tau. Truncation at EOS or the budget is counted as it happened.
- target_forwards_per_token = target forward passes (prefill included) / generated tokens; plain
  decoding gives 1 (plus prefill), speculation aims below it.
- Prefill counts, for what a multi-turn conversation costs: cloud_prefill_tokens are the tokens
  the cloud ran through the target to build the session's KV cache and cloud_reused_tokens those
  whose KV came from its prefix cache (the cloud's ServerTiming, summed over the request's
  streams; both 0 when the cloud does not report them); drafter_prefill_tokens are the tokens
  the drafter ran to build its own KV cache before the first draft.
- Per-round shapes, for histograms without a log of every round (bounded by the draft length,
  not the answer): accepted_by_position[i] counts the rounds whose draft at position i (0 = the
  first) was accepted; rounds_by_drafted[k] the rounds that drafted k tokens; rounds_by_emitted[n]
  the rounds that committed n tokens. Each list is only as long as its largest index.
- Pipelining (`tandem_core.loop`): pipeline_tries counts rounds whose successor was drafted
  while the round's verdict was in flight (on the guess that every draft is accepted and the
  target's own token is the drafter's), pipeline_hits those whose verdict confirmed the guess,
  so the next round went out without drafting; pipeline_hit_rate = hits / tries. alt_tries
  counts rounds also prepared for the likeliest other verdict (greedy), alt_hits those whose
  verdict was that one; alt_hit_rate = hits / tries (edge only, not on the wire).
- Trees (`tandem_core.tree`): a tree round counts its depth (longest path) as `drafted`, so
  acceptance_rate stays per draft position; tree_rounds counts the rounds that sent a tree, and
  tree_nodes_per_round = drafts verified / rounds, a tree's nodes counted (mean_draft_len when no
  round sent a tree).
- Draft length: mean_draft_len = drafted / rounds; draft_reasons counts each round's reason
  class for its length ("pinned", "cost_model", "low_acceptance", "probe", "retrieval",
  "checked"), so a mean k can be explained.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from numbers import Integral

from tandem_core.verify import Verdict


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _bump(counts: list[int], indices: Iterable[int]) -> None:
    for i in indices:
        if i >= len(counts):
            counts.extend([0] * (i + 1 - len(counts)))
        counts[i] += 1


@dataclass(frozen=True)
class RoundStats:
    """What one speculative round did."""

    drafted: int  # drafts proposed (k)
    accepted: int  # drafts accepted and committed (Verdict.accepted)
    emitted: int  # tokens committed this round (len(Verdict.tokens))
    retrieved: int = 0  # of the drafts, those copied by retrieval (`tandem_core.lookup`): 0 or drafted
    reason: str = ""  # why this draft length (a class, see the module doc); "" when not said
    nodes: int = 0  # a tree round: its nodes (drafted is then its depth); 0 for a chain

    def __post_init__(self) -> None:
        for name in ("drafted", "accepted", "emitted", "retrieved", "nodes"):
            _check_count(name, getattr(self, name))
        if self.accepted > self.drafted:
            raise ValueError(f"accepted ({self.accepted}) must not exceed drafted ({self.drafted})")
        if not self.accepted <= self.emitted <= self.accepted + 1:
            raise ValueError(
                f"emitted ({self.emitted}) must be accepted ({self.accepted}) or accepted + 1; "
                "pass Verdict.accepted, which already reflects truncation"
            )
        if self.retrieved > self.drafted:
            raise ValueError(f"retrieved ({self.retrieved}) must not exceed drafted ({self.drafted})")

    @classmethod
    def from_verdict(cls, drafted: int, verdict: Verdict) -> RoundStats:
        return cls(drafted=drafted, accepted=verdict.accepted, emitted=len(verdict.tokens))


@dataclass
class RequestStats:
    """Running totals for one request; mutate through the add_* methods."""

    rounds: int = 0  # speculative rounds (one target forward each)
    drafted: int = 0  # drafts proposed over all rounds
    accepted: int = 0  # drafts accepted over all rounds
    generated_tokens: int = 0  # tokens committed, by rounds and by plain decoding
    target_forwards: int = 0  # target forward passes, prefill and plain decoding included
    round_tokens: int = 0  # tokens committed by speculative rounds only (numerator of tau)
    cloud_prefill_tokens: int = 0  # tokens the cloud prefilled for this request (see the module doc)
    cloud_reused_tokens: int = 0  # tokens whose KV the cloud took from its prefix cache
    drafter_prefill_tokens: int = 0  # tokens the drafter prefilled
    retrieval_drafted: int = 0  # drafts copied by retrieval (`tandem_core.lookup`)
    retrieval_accepted: int = 0  # of which accepted
    accepted_by_position: list[int] = field(default_factory=list)  # [i]: rounds whose draft i was accepted
    rounds_by_drafted: list[int] = field(default_factory=list)  # [k]: rounds that drafted k tokens
    rounds_by_emitted: list[int] = field(default_factory=list)  # [n]: rounds that committed n tokens
    pipeline_tries: int = 0  # rounds whose successor was drafted while their verdict was in flight
    pipeline_hits: int = 0  # of which the verdict confirmed the guess (the successor went out as drafted)
    alt_tries: int = 0  # rounds prepared for the likeliest other verdict (greedy, the edge's drafter)
    alt_hits: int = 0  # of which that verdict came (the next round went out without drafting)
    draft_reasons: dict[str, int] = field(default_factory=dict)  # reason class -> rounds
    tree_rounds: int = 0  # rounds that sent a draft tree
    nodes: int = 0  # drafts verified over all rounds: a chain's k, a tree's nodes

    def add_round(self, r: RoundStats) -> None:
        _bump(self.accepted_by_position, range(int(r.accepted)))
        _bump(self.rounds_by_drafted, (int(r.drafted),))
        _bump(self.rounds_by_emitted, (int(r.emitted),))
        self.rounds += 1
        self.tree_rounds += int(r.nodes > 0)
        self.nodes += int(r.nodes) if r.nodes else int(r.drafted)
        self.drafted += int(r.drafted)
        self.accepted += int(r.accepted)
        self.generated_tokens += int(r.emitted)
        self.round_tokens += int(r.emitted)
        self.target_forwards += 1
        self.retrieval_drafted += int(r.retrieved)
        self.retrieval_accepted += min(int(r.retrieved), int(r.accepted))
        if r.reason:
            self.draft_reasons[r.reason] = self.draft_reasons.get(r.reason, 0) + 1

    def add_pipeline(self, hit: bool) -> None:
        """Count a round drafted ahead of its predecessor's verdict, and whether it was used."""
        self.pipeline_tries += 1
        self.pipeline_hits += int(bool(hit))

    def add_target_forwards(self, n: int) -> None:
        """Count target passes outside speculative rounds (prefill, plain decoding steps)."""
        _check_count("n", n)
        self.target_forwards += int(n)

    def add_tokens(self, n: int) -> None:
        """Count tokens committed outside speculative rounds (e.g. plain decoding)."""
        _check_count("n", n)
        self.generated_tokens += int(n)

    def add_cloud_prefill(self, prefilled: int, reused: int) -> None:
        """Count what the cloud reported about building the session's KV cache."""
        _check_count("prefilled", prefilled)
        _check_count("reused", reused)
        self.cloud_prefill_tokens += int(prefilled)
        self.cloud_reused_tokens += int(reused)

    def add_drafter_prefill(self, n: int) -> None:
        _check_count("n", n)
        self.drafter_prefill_tokens += int(n)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def mean_accepted_len(self) -> float | None:
        return self.round_tokens / self.rounds if self.rounds else None

    @property
    def retrieval_draft_share(self) -> float | None:
        """The fraction of accepted drafts that retrieval copied."""
        return self.retrieval_accepted / self.accepted if self.accepted else None

    @property
    def mean_draft_len(self) -> float | None:
        return self.drafted / self.rounds if self.rounds else None

    @property
    def tree_nodes_per_round(self) -> float | None:
        """Drafts verified per round, a tree's nodes counted (equals mean_draft_len without trees)."""
        return self.nodes / self.rounds if self.rounds else None

    @property
    def pipeline_hit_rate(self) -> float | None:
        return self.pipeline_hits / self.pipeline_tries if self.pipeline_tries else None

    @property
    def alt_hit_rate(self) -> float | None:
        return self.alt_hits / self.alt_tries if self.alt_tries else None

    @property
    def target_forwards_per_token(self) -> float | None:
        return self.target_forwards / self.generated_tokens if self.generated_tokens else None

    def to_dict(self) -> dict[str, int | float | dict[str, int] | None]:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "generated_tokens": self.generated_tokens,
            "target_forwards": self.target_forwards,
            "round_tokens": self.round_tokens,
            "cloud_prefill_tokens": self.cloud_prefill_tokens,
            "cloud_reused_tokens": self.cloud_reused_tokens,
            "drafter_prefill_tokens": self.drafter_prefill_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_len": self.mean_accepted_len,
            "target_forwards_per_token": self.target_forwards_per_token,
            "retrieval_drafted": self.retrieval_drafted,
            "retrieval_accepted": self.retrieval_accepted,
            "retrieval_draft_share": self.retrieval_draft_share,
            "mean_draft_len": self.mean_draft_len,
            "tree_rounds": self.tree_rounds,
            "tree_nodes_per_round": self.tree_nodes_per_round,
            "pipeline_tries": self.pipeline_tries,
            "pipeline_hits": self.pipeline_hits,
            "pipeline_hit_rate": self.pipeline_hit_rate,
            "alt_tries": self.alt_tries,
            "alt_hits": self.alt_hits,
            "draft_reasons": dict(self.draft_reasons),
        }
