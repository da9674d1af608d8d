from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]

class SwitchCause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SWITCH_CAUSE_UNSPECIFIED: _ClassVar[SwitchCause]
    SWITCH_CAUSE_LATE_VERDICT: _ClassVar[SwitchCause]
    SWITCH_CAUSE_BROKEN_STREAM: _ClassVar[SwitchCause]
    SWITCH_CAUSE_CLOUD_REFUSED: _ClassVar[SwitchCause]
    SWITCH_CAUSE_BAD_VERDICT: _ClassVar[SwitchCause]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
SWITCH_CAUSE_UNSPECIFIED: SwitchCause
SWITCH_CAUSE_LATE_VERDICT: SwitchCause
SWITCH_CAUSE_BROKEN_STREAM: SwitchCause
SWITCH_CAUSE_CLOUD_REFUSED: SwitchCause
SWITCH_CAUSE_BAD_VERDICT: SwitchCause

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class SparseDist(_message.Message):
    __slots__ = ("ids", "probs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class GenerationStats(_message.Message):
    __slots__ = ("route", "generated_tokens", "ttft_ms", "tokens_per_s", "rounds", "drafted", "accepted", "acceptance_rate", "mean_accepted_len", "target_forwards", "bytes_up", "bytes_down", "edge_cpu_s", "resumes", "finish_reason", "local_tokens", "verified_tokens", "switches", "cloud_prefill_tokens", "cloud_reused_tokens", "drafter_prefill_tokens", "drafter_prefill_ms", "retrieval_drafted", "retrieval_accepted", "pipeline_tries", "pipeline_hits", "draft_reasons", "tree_rounds", "nodes")
    class DraftReasonsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCEPTED_LEN_FIELD_NUMBER: _ClassVar[int]
    TARGET_FORWARDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    EDGE_CPU_S_FIELD_NUMBER: _ClassVar[int]
    RESUMES_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    LOCAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SWITCHES_FIELD_NUMBER: _ClassVar[int]
    CLOUD_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_REUSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_DRAFTED_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_TRIES_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_HITS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_REASONS_FIELD_NUMBER: _ClassVar[int]
    TREE_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    route: str
    generated_tokens: int
    ttft_ms: float
    tokens_per_s: float
    rounds: int
    drafted: int
    accepted: int
    acceptance_rate: float
    mean_accepted_len: float
    target_forwards: int
    bytes_up: int
    bytes_down: int
    edge_cpu_s: float
    resumes: int
    finish_reason: FinishReason
    local_tokens: int
    verified_tokens: int
    switches: _containers.RepeatedCompositeFieldContainer[RouteSwitch]
    cloud_prefill_tokens: int
    cloud_reused_tokens: int
    drafter_prefill_tokens: int
    drafter_prefill_ms: float
    retrieval_drafted: int
    retrieval_accepted: int
    pipeline_tries: int
    pipeline_hits: int
    draft_reasons: _containers.ScalarMap[str, int]
    tree_rounds: int
    nodes: int
    def __init__(self, route: _Optional[str] = ..., generated_tokens: _Optional[int] = ..., ttft_ms: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., rounds: _Optional[int] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ..., acceptance_rate: _Optional[float] = ..., mean_accepted_len: _Optional[float] = ..., target_forwards: _Optional[int] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., edge_cpu_s: _Optional[float] = ..., resumes: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., local_tokens: _Optional[int] = ..., verified_tokens: _Optional[int] = ..., switches: _Optional[_Iterable[_Union[RouteSwitch, _Mapping]]] = ..., cloud_prefill_tokens: _Optional[int] = ..., cloud_reused_tokens: _Optional[int] = ..., drafter_prefill_tokens: _Optional[int] = ..., drafter_prefill_ms: _Optional[float] = ..., retrieval_drafted: _Optional[int] = ..., retrieval_accepted: _Optional[int] = ..., pipeline_tries: _Optional[int] = ..., pipeline_hits: _Optional[int] = ..., draft_reasons: _Optional[_Mapping[str, int]] = ..., tree_rounds: _Optional[int] = ..., nodes: _Optional[int] = ...) -> None: ...

class RouteSwitch(_message.Message):
    __slots__ = ("at_token", "from_route", "to_route", "reason", "at_ms", "cause")
    AT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FROM_ROUTE_FIELD_NUMBER: _ClassVar[int]
    TO_ROUTE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    at_token: int
    from_route: str
    to_route: str
    reason: str
    at_ms: float
    cause: SwitchCause
    def __init__(self, at_token: _Optional[int] = ..., from_route: _Optional[str] = ..., to_route: _Optional[str] = ..., reason: _Optional[str] = ..., at_ms: _Optional[float] = ..., cause: _Optional[_Union[SwitchCause, str]] = ...) -> None: ...
