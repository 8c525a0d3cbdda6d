from phalanx.v1 import adapter_pb2 as _adapter_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_WAITING: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_FINISHED: _ClassVar[RunState]
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_WAITING: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_FINISHED: RunState

class RegisterRequest(_message.Message):
    __slots__ = ("name", "address", "partition", "num_train_examples", "num_test_examples", "label_names", "adapter_layout", "capabilities")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_TEST_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    partition: int
    num_train_examples: int
    num_test_examples: int
    label_names: _containers.RepeatedScalarFieldContainer[str]
    adapter_layout: _adapter_pb2.AdapterManifest
    capabilities: SiteCapabilities
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., partition: _Optional[int] = ..., num_train_examples: _Optional[int] = ..., num_test_examples: _Optional[int] = ..., label_names: _Optional[_Iterable[str]] = ..., adapter_layout: _Optional[_Union[_adapter_pb2.AdapterManifest, _Mapping]] = ..., capabilities: _Optional[_Union[SiteCapabilities, _Mapping]] = ...) -> None: ...

class SiteCapabilities(_message.Message):
    __slots__ = ("cores", "memory_bytes", "accelerator")
    CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    cores: int
    memory_bytes: int
    accelerator: str
    def __init__(self, cores: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., accelerator: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("trainer_id", "run_id", "heartbeat_interval_seconds", "last_round")
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    trainer_id: str
    run_id: str
    heartbeat_interval_seconds: float
    last_round: int
    def __init__(self, trainer_id: _Optional[str] = ..., run_id: _Optional[str] = ..., heartbeat_interval_seconds: _Optional[float] = ..., last_round: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("trainer_id",)
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    trainer_id: str
    def __init__(self, trainer_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: RunState
    def __init__(self, state: _Optional[_Union[RunState, str]] = ...) -> None: ...
