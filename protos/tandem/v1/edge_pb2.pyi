from protos.tandem.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EdgeMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EDGE_MODE_UNSPECIFIED: _ClassVar[EdgeMode]
    EDGE_MODE_LOCAL: _ClassVar[EdgeMode]
    EDGE_MODE_SPECULATIVE: _ClassVar[EdgeMode]
    EDGE_MODE_CLOUD: _ClassVar[EdgeMode]
EDGE_MODE_UNSPECIFIED: EdgeMode
EDGE_MODE_LOCAL: EdgeMode
EDGE_MODE_SPECULATIVE: EdgeMode
EDGE_MODE_CLOUD: EdgeMode

class TokenCount(_message.Message):
    __slots__ = ("prompt_tokens",)
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ...) -> None: ...

class EdgeInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EdgeInfo(_message.Message):
    __slots__ = ("drafter", "context_length", "cloud_address", "default_draft_len", "round_deadline_ms")
    DRAFTER_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CLOUD_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_DRAFT_LEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    drafter: str
    context_length: int
    cloud_address: str
    default_draft_len: int
    round_deadline_ms: int
    def __init__(self, drafter: _Optional[str] = ..., context_length: _Optional[int] = ..., cloud_address: _Optional[str] = ..., default_draft_len: _Optional[int] = ..., round_deadline_ms: _Optional[int] = ...) -> None: ...

class EdgeGenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "prompt_tokens", "sampling", "max_new_tokens", "mode", "draft_len", "round_deadline_ms", "fallback_local", "open_deadline_ms")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_LEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_LOCAL_FIELD_NUMBER: _ClassVar[int]
    OPEN_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    max_new_tokens: int
    mode: EdgeMode
    draft_len: int
    round_deadline_ms: int
    fallback_local: bool
    open_deadline_ms: int
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., mode: _Optional[_Union[EdgeMode, str]] = ..., draft_len: _Optional[int] = ..., round_deadline_ms: _Optional[int] = ..., fallback_local: _Optional[bool] = ..., open_deadline_ms: _Optional[int] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("tokens", "text", "source")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    text: str
    source: str
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class EdgeGenerateResponse(_message.Message):
    __slots__ = ("delta", "stats")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    delta: TokenDelta
    stats: _common_pb2.GenerationStats
    def __init__(self, delta: _Optional[_Union[TokenDelta, _Mapping]] = ..., stats: _Optional[_Union[_common_pb2.GenerationStats, _Mapping]] = ...) -> None: ...
