from phalanx.v1 import adapter_pb2 as _adapter_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainHeader(_message.Message):
    __slots__ = ("run_id", "round", "local_steps", "batch_size", "learning_rate", "seed", "reply_dtype", "adapter")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPLY_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    local_steps: int
    batch_size: int
    learning_rate: float
    seed: int
    reply_dtype: _adapter_pb2.DataType
    adapter: _adapter_pb2.AdapterManifest
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., seed: _Optional[int] = ..., reply_dtype: _Optional[_Union[_adapter_pb2.DataType, str]] = ..., adapter: _Optional[_Union[_adapter_pb2.AdapterManifest, _Mapping]] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: TrainHeader
    chunk: _adapter_pb2.AdapterChunk
    def __init__(self, header: _Optional[_Union[TrainHeader, _Mapping]] = ..., chunk: _Optional[_Union[_adapter_pb2.AdapterChunk, _Mapping]] = ...) -> None: ...

class TrainResult(_message.Message):
    __slots__ = ("run_id", "round", "num_examples", "examples_seen", "steps", "loss", "seconds", "adapter")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_SEEN_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    num_examples: int
    examples_seen: int
    steps: int
    loss: float
    seconds: float
    adapter: _adapter_pb2.AdapterManifest
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., examples_seen: _Optional[int] = ..., steps: _Optional[int] = ..., loss: _Optional[float] = ..., seconds: _Optional[float] = ..., adapter: _Optional[_Union[_adapter_pb2.AdapterManifest, _Mapping]] = ...) -> None: ...

class TrainResponse(_message.Message):
    __slots__ = ("result", "chunk")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    result: TrainResult
    chunk: _adapter_pb2.AdapterChunk
    def __init__(self, result: _Optional[_Union[TrainResult, _Mapping]] = ..., chunk: _Optional[_Union[_adapter_pb2.AdapterChunk, _Mapping]] = ...) -> None: ...

class EvaluateHeader(_message.Message):
    __slots__ = ("run_id", "round", "batch_size", "max_examples", "adapter")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    batch_size: int
    max_examples: int
    adapter: _adapter_pb2.AdapterManifest
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., batch_size: _Optional[int] = ..., max_examples: _Optional[int] = ..., adapter: _Optional[_Union[_adapter_pb2.AdapterManifest, _Mapping]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: EvaluateHeader
    chunk: _adapter_pb2.AdapterChunk
    def __init__(self, header: _Optional[_Union[EvaluateHeader, _Mapping]] = ..., chunk: _Optional[_Union[_adapter_pb2.AdapterChunk, _Mapping]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("run_id", "round", "num_examples", "loss", "accuracy", "seconds")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    num_examples: int
    loss: float
    accuracy: float
    seconds: float
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., seconds: _Optional[float] = ...) -> None: ...

class EndRunRequest(_message.Message):
    __slots__ = ("run_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class EndRunResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
