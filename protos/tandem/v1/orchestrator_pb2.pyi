from protos.tandem.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Route(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTE_AUTO: _ClassVar[Route]
    ROUTE_LOCAL: _ClassVar[Route]
    ROUTE_SPECULATIVE: _ClassVar[Route]
    ROUTE_CLOUD: _ClassVar[Route]

class PrivacyMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIVACY_MODE_UNSPECIFIED: _ClassVar[PrivacyMode]
    PRIVACY_MODE_STRICT: _ClassVar[PrivacyMode]
    PRIVACY_MODE_CLOUD_QUALITY: _ClassVar[PrivacyMode]

class Privacy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIVACY_UNSPECIFIED: _ClassVar[Privacy]
    PRIVACY_PRIVATE: _ClassVar[Privacy]
    PRIVACY_SHAREABLE: _ClassVar[Privacy]
ROUTE_AUTO: Route
ROUTE_LOCAL: Route
ROUTE_SPECULATIVE: Route
ROUTE_CLOUD: Route
PRIVACY_MODE_UNSPECIFIED: PrivacyMode
PRIVACY_MODE_STRICT: PrivacyMode
PRIVACY_MODE_CLOUD_QUALITY: PrivacyMode
PRIVACY_UNSPECIFIED: Privacy
PRIVACY_PRIVATE: Privacy
PRIVACY_SHAREABLE: Privacy

class GenerateOptions(_message.Message):
    __slots__ = ("route", "deadline_ms", "ttft_budget_ms", "privacy", "use_personal_context", "sampling", "max_new_tokens", "context_chunks", "category")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    USE_PERSONAL_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    route: Route
    deadline_ms: int
    ttft_budget_ms: int
    privacy: PrivacyMode
    use_personal_context: bool
    sampling: _common_pb2.SamplingParams
    max_new_tokens: int
    context_chunks: int
    category: str
    def __init__(self, route: _Optional[_Union[Route, str]] = ..., deadline_ms: _Optional[int] = ..., ttft_budget_ms: _Optional[int] = ..., privacy: _Optional[_Union[PrivacyMode, str]] = ..., use_personal_context: _Optional[bool] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., context_chunks: _Optional[int] = ..., category: _Optional[str] = ...) -> None: ...

class GenerateTextRequest(_message.Message):
    __slots__ = ("prompt", "messages", "options")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    options: GenerateOptions
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., options: _Optional[_Union[GenerateOptions, _Mapping]] = ...) -> None: ...

class Citation(_message.Message):
    __slots__ = ("document_id", "title", "chunk_index", "score", "privacy")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    title: str
    chunk_index: int
    score: float
    privacy: Privacy
    def __init__(self, document_id: _Optional[str] = ..., title: _Optional[str] = ..., chunk_index: _Optional[int] = ..., score: _Optional[float] = ..., privacy: _Optional[_Union[Privacy, str]] = ...) -> None: ...

class GenerationStarted(_message.Message):
    __slots__ = ("route", "reason", "citations", "private_chunks_dropped", "prompt_tokens")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_CHUNKS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    route: str
    reason: str
    citations: _containers.RepeatedCompositeFieldContainer[Citation]
    private_chunks_dropped: int
    prompt_tokens: int
    def __init__(self, route: _Optional[str] = ..., reason: _Optional[str] = ..., citations: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ..., private_chunks_dropped: _Optional[int] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text", "tokens", "source")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    source: str
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., source: _Optional[str] = ...) -> None: ...

class OrchestratorStats(_message.Message):
    __slots__ = ("route", "reason", "generation", "switches", "citations", "private_chunks_dropped", "orchestrator_ms", "ttft_ms", "tokens_per_s", "category")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SWITCHES_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_CHUNKS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    ORCHESTRATOR_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    route: str
    reason: str
    generation: _common_pb2.GenerationStats
    switches: _containers.RepeatedCompositeFieldContainer[_common_pb2.RouteSwitch]
    citations: _containers.RepeatedCompositeFieldContainer[Citation]
    private_chunks_dropped: int
    orchestrator_ms: float
    ttft_ms: float
    tokens_per_s: float
    category: str
    def __init__(self, route: _Optional[str] = ..., reason: _Optional[str] = ..., generation: _Optional[_Union[_common_pb2.GenerationStats, _Mapping]] = ..., switches: _Optional[_Iterable[_Union[_common_pb2.RouteSwitch, _Mapping]]] = ..., citations: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ..., private_chunks_dropped: _Optional[int] = ..., orchestrator_ms: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., category: _Optional[str] = ...) -> None: ...

class GenerateTextResponse(_message.Message):
    __slots__ = ("started", "delta", "stats")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    started: GenerationStarted
    delta: TextDelta
    stats: OrchestratorStats
    def __init__(self, started: _Optional[_Union[GenerationStarted, _Mapping]] = ..., delta: _Optional[_Union[TextDelta, _Mapping]] = ..., stats: _Optional[_Union[OrchestratorStats, _Mapping]] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("id", "title", "kind", "privacy", "chunks", "bytes", "created_unix_ms", "source", "truncated")
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    kind: str
    privacy: Privacy
    chunks: int
    bytes: int
    created_unix_ms: int
    source: str
    truncated: bool
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., kind: _Optional[str] = ..., privacy: _Optional[_Union[Privacy, str]] = ..., chunks: _Optional[int] = ..., bytes: _Optional[int] = ..., created_unix_ms: _Optional[int] = ..., source: _Optional[str] = ..., truncated: _Optional[bool] = ...) -> None: ...

class AddDocumentRequest(_message.Message):
    __slots__ = ("title", "text", "kind", "privacy", "source", "idempotency_key")
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    title: str
    text: str
    kind: str
    privacy: Privacy
    source: str
    idempotency_key: str
    def __init__(self, title: _Optional[str] = ..., text: _Optional[str] = ..., kind: _Optional[str] = ..., privacy: _Optional[_Union[Privacy, str]] = ..., source: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class DeleteDocumentRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteDocumentResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class ListDocumentsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDocumentsResponse(_message.Message):
    __slots__ = ("documents", "next_page_token")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    next_page_token: str
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SetDocumentPrivacyRequest(_message.Message):
    __slots__ = ("id", "privacy")
    ID_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    id: str
    privacy: Privacy
    def __init__(self, id: _Optional[str] = ..., privacy: _Optional[_Union[Privacy, str]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LinkStatus(_message.Message):
    __slots__ = ("state", "circuit", "rtt_ms", "rtt_jitter_ms", "consecutive_failures", "last_probe_age_s", "cloud_address")
    STATE_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    RTT_JITTER_MS_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    LAST_PROBE_AGE_S_FIELD_NUMBER: _ClassVar[int]
    CLOUD_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    state: str
    circuit: str
    rtt_ms: float
    rtt_jitter_ms: float
    consecutive_failures: int
    last_probe_age_s: float
    cloud_address: str
    def __init__(self, state: _Optional[str] = ..., circuit: _Optional[str] = ..., rtt_ms: _Optional[float] = ..., rtt_jitter_ms: _Optional[float] = ..., consecutive_failures: _Optional[int] = ..., last_probe_age_s: _Optional[float] = ..., cloud_address: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("role", "name", "where", "loaded")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    role: str
    name: str
    where: str
    loaded: bool
    def __init__(self, role: _Optional[str] = ..., name: _Optional[str] = ..., where: _Optional[str] = ..., loaded: _Optional[bool] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("link", "recent_acceptance", "acceptance_by_category", "models", "edge_address", "documents", "edge_healthy")
    class AcceptanceByCategoryEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LINK_FIELD_NUMBER: _ClassVar[int]
    RECENT_ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_BY_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    EDGE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    EDGE_HEALTHY_FIELD_NUMBER: _ClassVar[int]
    link: LinkStatus
    recent_acceptance: float
    acceptance_by_category: _containers.ScalarMap[str, float]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    edge_address: str
    documents: int
    edge_healthy: bool
    def __init__(self, link: _Optional[_Union[LinkStatus, _Mapping]] = ..., recent_acceptance: _Optional[float] = ..., acceptance_by_category: _Optional[_Mapping[str, float]] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., edge_address: _Optional[str] = ..., documents: _Optional[int] = ..., edge_healthy: _Optional[bool] = ...) -> None: ...
