from protos.tandem.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionSpec(_message.Message):
    __slots__ = ("session_id", "model", "prompt_tokens", "messages", "sampling", "max_new_tokens", "generated_tokens", "first_round")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_ROUND_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    sampling: _common_pb2.SamplingParams
    max_new_tokens: int
    generated_tokens: _containers.RepeatedScalarFieldContainer[int]
    first_round: bool
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., generated_tokens: _Optional[_Iterable[int]] = ..., first_round: _Optional[bool] = ...) -> None: ...

class DraftRound(_message.Message):
    __slots__ = ("round", "draft_tokens", "q_rows", "assume_position", "assume_token", "draft_parents")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    Q_ROWS_FIELD_NUMBER: _ClassVar[int]
    ASSUME_POSITION_FIELD_NUMBER: _ClassVar[int]
    ASSUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PARENTS_FIELD_NUMBER: _ClassVar[int]
    round: int
    draft_tokens: _containers.RepeatedScalarFieldContainer[int]
    q_rows: _containers.RepeatedCompositeFieldContainer[_common_pb2.SparseDist]
    assume_position: int
    assume_token: int
    draft_parents: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, round: _Optional[int] = ..., draft_tokens: _Optional[_Iterable[int]] = ..., q_rows: _Optional[_Iterable[_Union[_common_pb2.SparseDist, _Mapping]]] = ..., assume_position: _Optional[int] = ..., assume_token: _Optional[int] = ..., draft_parents: _Optional[_Iterable[int]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("open", "round")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    open: SessionSpec
    round: DraftRound
    def __init__(self, open: _Optional[_Union[SessionSpec, _Mapping]] = ..., round: _Optional[_Union[DraftRound, _Mapping]] = ...) -> None: ...

class ServerTiming(_message.Message):
    __slots__ = ("queue_ms", "prefill_ms", "verify_ms", "prefill_tokens", "reused_tokens", "batch_sessions")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REUSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    prefill_ms: float
    verify_ms: float
    prefill_tokens: int
    reused_tokens: int
    batch_sessions: int
    def __init__(self, queue_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., verify_ms: _Optional[float] = ..., prefill_tokens: _Optional[int] = ..., reused_tokens: _Optional[int] = ..., batch_sessions: _Optional[int] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("model", "prompt_len", "max_draft_len", "max_context", "replica", "timing", "pipelining", "max_tree_nodes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    PIPELINING_FIELD_NUMBER: _ClassVar[int]
    MAX_TREE_NODES_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt_len: int
    max_draft_len: int
    max_context: int
    replica: str
    timing: ServerTiming
    pipelining: bool
    max_tree_nodes: int
    def __init__(self, model: _Optional[str] = ..., prompt_len: _Optional[int] = ..., max_draft_len: _Optional[int] = ..., max_context: _Optional[int] = ..., replica: _Optional[str] = ..., timing: _Optional[_Union[ServerTiming, _Mapping]] = ..., pipelining: _Optional[bool] = ..., max_tree_nodes: _Optional[int] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("round", "accepted", "tokens", "finished", "finish_reason", "timing", "dropped")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    round: int
    accepted: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: _common_pb2.FinishReason
    timing: ServerTiming
    dropped: bool
    def __init__(self, round: _Optional[int] = ..., accepted: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., timing: _Optional[_Union[ServerTiming, _Mapping]] = ..., dropped: _Optional[bool] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("opened", "verdict")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    verdict: Verdict
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionSpec
    def __init__(self, session: _Optional[_Union[SessionSpec, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("tokens", "finished", "finish_reason", "timing")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: _common_pb2.FinishReason
    timing: ServerTiming
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., timing: _Optional[_Union[ServerTiming, _Mapping]] = ...) -> None: ...
