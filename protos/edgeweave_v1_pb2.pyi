from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
INT8: DType
INT32: DType
INT64: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class QuantizedTensor(_message.Message):
    __slots__ = ("shape", "values", "scales")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    values: bytes
    scales: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., values: _Optional[bytes] = ..., scales: _Optional[bytes] = ...) -> None: ...

class Activation(_message.Message):
    __slots__ = ("dense", "quantized")
    DENSE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_FIELD_NUMBER: _ClassVar[int]
    dense: Tensor
    quantized: QuantizedTensor
    def __init__(self, dense: _Optional[_Union[Tensor, _Mapping]] = ..., quantized: _Optional[_Union[QuantizedTensor, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class ShardSpec(_message.Message):
    __slots__ = ("checkpoint", "first_layer", "last_layer", "embed", "head", "placement_id", "kv_budget_bytes", "max_context", "threads", "experts", "hosted", "fast_slots", "redis_url", "model_name", "prefetch", "next_stage", "keep_awake")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    LAST_LAYER_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_ID_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    HOSTED_FIELD_NUMBER: _ClassVar[int]
    FAST_SLOTS_FIELD_NUMBER: _ClassVar[int]
    REDIS_URL_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    NEXT_STAGE_FIELD_NUMBER: _ClassVar[int]
    KEEP_AWAKE_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    first_layer: int
    last_layer: int
    embed: bool
    head: bool
    placement_id: str
    kv_budget_bytes: int
    max_context: int
    threads: int
    experts: _containers.RepeatedCompositeFieldContainer[ExpertUnit]
    hosted: _containers.RepeatedCompositeFieldContainer[ExpertUnit]
    fast_slots: int
    redis_url: str
    model_name: str
    prefetch: bool
    next_stage: str
    keep_awake: bool
    def __init__(self, checkpoint: _Optional[str] = ..., first_layer: _Optional[int] = ..., last_layer: _Optional[int] = ..., embed: _Optional[bool] = ..., head: _Optional[bool] = ..., placement_id: _Optional[str] = ..., kv_budget_bytes: _Optional[int] = ..., max_context: _Optional[int] = ..., threads: _Optional[int] = ..., experts: _Optional[_Iterable[_Union[ExpertUnit, _Mapping]]] = ..., hosted: _Optional[_Iterable[_Union[ExpertUnit, _Mapping]]] = ..., fast_slots: _Optional[int] = ..., redis_url: _Optional[str] = ..., model_name: _Optional[str] = ..., prefetch: _Optional[bool] = ..., next_stage: _Optional[str] = ..., keep_awake: _Optional[bool] = ...) -> None: ...

class ExpertUnit(_message.Message):
    __slots__ = ("layer", "expert", "address")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    address: str
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., address: _Optional[str] = ...) -> None: ...

class LoadShardRequest(_message.Message):
    __slots__ = ("shard",)
    SHARD_FIELD_NUMBER: _ClassVar[int]
    shard: ShardSpec
    def __init__(self, shard: _Optional[_Union[ShardSpec, _Mapping]] = ...) -> None: ...

class LoadShardResponse(_message.Message):
    __slots__ = ("weight_bytes", "load_seconds")
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    weight_bytes: int
    load_seconds: float
    def __init__(self, weight_bytes: _Optional[int] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class StepItem(_message.Message):
    __slots__ = ("session_id", "position", "token_ids", "hidden", "max_tokens", "sampling", "step", "route")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    token_ids: Tensor
    hidden: Activation
    max_tokens: int
    sampling: SamplingParams
    step: int
    route: Tensor
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ..., token_ids: _Optional[_Union[Tensor, _Mapping]] = ..., hidden: _Optional[_Union[Activation, _Mapping]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., step: _Optional[int] = ..., route: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("placement_id", "items", "quantize_output", "relay_id", "relay_seq", "stage_ms", "relay_bytes")
    PLACEMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RELAY_ID_FIELD_NUMBER: _ClassVar[int]
    RELAY_SEQ_FIELD_NUMBER: _ClassVar[int]
    STAGE_MS_FIELD_NUMBER: _ClassVar[int]
    RELAY_BYTES_FIELD_NUMBER: _ClassVar[int]
    placement_id: str
    items: _containers.RepeatedCompositeFieldContainer[StepItem]
    quantize_output: bool
    relay_id: str
    relay_seq: int
    stage_ms: _containers.RepeatedScalarFieldContainer[float]
    relay_bytes: int
    def __init__(self, placement_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[StepItem, _Mapping]]] = ..., quantize_output: _Optional[bool] = ..., relay_id: _Optional[str] = ..., relay_seq: _Optional[int] = ..., stage_ms: _Optional[_Iterable[float]] = ..., relay_bytes: _Optional[int] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("session_id", "hidden", "token", "route")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    hidden: Activation
    token: int
    route: Tensor
    def __init__(self, session_id: _Optional[str] = ..., hidden: _Optional[_Union[Activation, _Mapping]] = ..., token: _Optional[int] = ..., route: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("results", "compute_ms")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StepResult]
    compute_ms: float
    def __init__(self, results: _Optional[_Iterable[_Union[StepResult, _Mapping]]] = ..., compute_ms: _Optional[float] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("placement_id", "relay_id")
    PLACEMENT_ID_FIELD_NUMBER: _ClassVar[int]
    RELAY_ID_FIELD_NUMBER: _ClassVar[int]
    placement_id: str
    relay_id: str
    def __init__(self, placement_id: _Optional[str] = ..., relay_id: _Optional[str] = ...) -> None: ...

class RelayEvent(_message.Message):
    __slots__ = ("seq", "result", "stage_ms", "error_code", "error", "relay_bytes", "can_relay", "next_stage")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    STAGE_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RELAY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAN_RELAY_FIELD_NUMBER: _ClassVar[int]
    NEXT_STAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    result: ForwardResponse
    stage_ms: _containers.RepeatedScalarFieldContainer[float]
    error_code: int
    error: str
    relay_bytes: int
    can_relay: bool
    next_stage: str
    def __init__(self, seq: _Optional[int] = ..., result: _Optional[_Union[ForwardResponse, _Mapping]] = ..., stage_ms: _Optional[_Iterable[float]] = ..., error_code: _Optional[int] = ..., error: _Optional[str] = ..., relay_bytes: _Optional[int] = ..., can_relay: _Optional[bool] = ..., next_stage: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_ids",)
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class ProfileRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeProfile(_message.Message):
    __slots__ = ("node_id", "tier", "cpu_total_bytes", "cpu_available_bytes", "gpu_total_bytes", "gpu_available_bytes", "budget_bytes", "int8_gops", "cores")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CPU_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    INT8_GOPS_FIELD_NUMBER: _ClassVar[int]
    CORES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    tier: str
    cpu_total_bytes: int
    cpu_available_bytes: int
    gpu_total_bytes: int
    gpu_available_bytes: int
    budget_bytes: int
    int8_gops: float
    cores: int
    def __init__(self, node_id: _Optional[str] = ..., tier: _Optional[str] = ..., cpu_total_bytes: _Optional[int] = ..., cpu_available_bytes: _Optional[int] = ..., gpu_total_bytes: _Optional[int] = ..., gpu_available_bytes: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., int8_gops: _Optional[float] = ..., cores: _Optional[int] = ...) -> None: ...

class WorkerHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerHealthResponse(_message.Message):
    __slots__ = ("placement_id", "sessions", "kv_bytes_used", "kv_budget_bytes", "expert_map_version", "fast", "expert_hits", "expert_misses", "expert_moves", "expert_bytes_moved", "stats_recorded", "stats_flushed", "stats_buffered", "stats_lost")
    PLACEMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    FAST_FIELD_NUMBER: _ClassVar[int]
    EXPERT_HITS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_MISSES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_MOVES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    STATS_RECORDED_FIELD_NUMBER: _ClassVar[int]
    STATS_FLUSHED_FIELD_NUMBER: _ClassVar[int]
    STATS_BUFFERED_FIELD_NUMBER: _ClassVar[int]
    STATS_LOST_FIELD_NUMBER: _ClassVar[int]
    placement_id: str
    sessions: int
    kv_bytes_used: int
    kv_budget_bytes: int
    expert_map_version: int
    fast: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    expert_hits: int
    expert_misses: int
    expert_moves: int
    expert_bytes_moved: int
    stats_recorded: int
    stats_flushed: int
    stats_buffered: int
    stats_lost: int
    def __init__(self, placement_id: _Optional[str] = ..., sessions: _Optional[int] = ..., kv_bytes_used: _Optional[int] = ..., kv_budget_bytes: _Optional[int] = ..., expert_map_version: _Optional[int] = ..., fast: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ..., expert_hits: _Optional[int] = ..., expert_misses: _Optional[int] = ..., expert_moves: _Optional[int] = ..., expert_bytes_moved: _Optional[int] = ..., stats_recorded: _Optional[int] = ..., stats_flushed: _Optional[int] = ..., stats_buffered: _Optional[int] = ..., stats_lost: _Optional[int] = ...) -> None: ...

class LayerExperts(_message.Message):
    __slots__ = ("layer", "experts")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ...) -> None: ...

class ExpertRequest(_message.Message):
    __slots__ = ("placement_id", "layer", "expert", "hidden")
    PLACEMENT_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    placement_id: str
    layer: int
    expert: int
    hidden: Tensor
    def __init__(self, placement_id: _Optional[str] = ..., layer: _Optional[int] = ..., expert: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ExpertResponse(_message.Message):
    __slots__ = ("output",)
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ExpertTierMap(_message.Message):
    __slots__ = ("placement_id", "version", "fast")
    PLACEMENT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FAST_FIELD_NUMBER: _ClassVar[int]
    placement_id: str
    version: int
    fast: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    def __init__(self, placement_id: _Optional[str] = ..., version: _Optional[int] = ..., fast: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ...) -> None: ...

class ExpertTierResponse(_message.Message):
    __slots__ = ("version", "moved", "bytes_moved")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    version: int
    moved: int
    bytes_moved: int
    def __init__(self, version: _Optional[int] = ..., moved: _Optional[int] = ..., bytes_moved: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_tokens", "stop", "sampling")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    sampling: SamplingParams
    def __init__(self, prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "prompt_tokens", "generated_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ...) -> None: ...

class InferenceHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InferenceHealthResponse(_message.Message):
    __slots__ = ("model", "placement_id", "stages", "active_sessions", "unavailable", "recoveries")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_ID_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    RECOVERIES_FIELD_NUMBER: _ClassVar[int]
    model: str
    placement_id: str
    stages: int
    active_sessions: int
    unavailable: str
    recoveries: int
    def __init__(self, model: _Optional[str] = ..., placement_id: _Optional[str] = ..., stages: _Optional[int] = ..., active_sessions: _Optional[int] = ..., unavailable: _Optional[str] = ..., recoveries: _Optional[int] = ...) -> None: ...
