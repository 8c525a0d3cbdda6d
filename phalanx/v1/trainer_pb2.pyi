from phalanx.v1 import adapter_pb2 as _adapter_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoraVariant(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LORA_VARIANT_UNSPECIFIED: _ClassVar[LoraVariant]
    LORA_VARIANT_FFA: _ClassVar[LoraVariant]

class BatchOrder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_ORDER_UNSPECIFIED: _ClassVar[BatchOrder]
    BATCH_ORDER_GROUPED: _ClassVar[BatchOrder]
    BATCH_ORDER_RANDOM: _ClassVar[BatchOrder]
LORA_VARIANT_UNSPECIFIED: LoraVariant
LORA_VARIANT_FFA: LoraVariant
BATCH_ORDER_UNSPECIFIED: BatchOrder
BATCH_ORDER_GROUPED: BatchOrder
BATCH_ORDER_RANDOM: BatchOrder

class TrainHeader(_message.Message):
    __slots__ = ("run_id", "round", "local_steps", "batch_size", "learning_rate", "seed", "reply_dtype", "adapter", "secure_aggregation", "run", "batch_order", "proximal_mu")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPLY_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    BATCH_ORDER_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    local_steps: int
    batch_size: int
    learning_rate: float
    seed: int
    reply_dtype: _adapter_pb2.DataType
    adapter: _adapter_pb2.AdapterManifest
    secure_aggregation: SecureAggregation
    run: RunSpec
    batch_order: BatchOrder
    proximal_mu: float
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., seed: _Optional[int] = ..., reply_dtype: _Optional[_Union[_adapter_pb2.DataType, str]] = ..., adapter: _Optional[_Union[_adapter_pb2.AdapterManifest, _Mapping]] = ..., secure_aggregation: _Optional[_Union[SecureAggregation, _Mapping]] = ..., run: _Optional[_Union[RunSpec, _Mapping]] = ..., batch_order: _Optional[_Union[BatchOrder, str]] = ..., proximal_mu: _Optional[float] = ...) -> None: ...

class RunSpec(_message.Message):
    __slots__ = ("model", "label_names", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "max_length", "last_round", "lora_variant", "ffa_seed", "mixed_ranks")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    LORA_R_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    LORA_VARIANT_FIELD_NUMBER: _ClassVar[int]
    FFA_SEED_FIELD_NUMBER: _ClassVar[int]
    MIXED_RANKS_FIELD_NUMBER: _ClassVar[int]
    model: str
    label_names: _containers.RepeatedScalarFieldContainer[str]
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    max_length: int
    last_round: int
    lora_variant: LoraVariant
    ffa_seed: int
    mixed_ranks: bool
    def __init__(self, model: _Optional[str] = ..., label_names: _Optional[_Iterable[str]] = ..., lora_r: _Optional[int] = ..., lora_alpha: _Optional[int] = ..., lora_dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., max_length: _Optional[int] = ..., last_round: _Optional[int] = ..., lora_variant: _Optional[_Union[LoraVariant, str]] = ..., ffa_seed: _Optional[int] = ..., mixed_ranks: _Optional[bool] = ...) -> None: ...

class SecureAggregation(_message.Message):
    __slots__ = ("attempt", "shares", "weight_share", "clip_range", "clip_norm", "noise_std", "count_unclipped", "count_noise_std")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SHARE_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    NOISE_STD_FIELD_NUMBER: _ClassVar[int]
    COUNT_UNCLIPPED_FIELD_NUMBER: _ClassVar[int]
    COUNT_NOISE_STD_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    shares: _containers.RepeatedCompositeFieldContainer[SealedShares]
    weight_share: float
    clip_range: float
    clip_norm: float
    noise_std: float
    count_unclipped: bool
    count_noise_std: float
    def __init__(self, attempt: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[SealedShares, _Mapping]]] = ..., weight_share: _Optional[float] = ..., clip_range: _Optional[float] = ..., clip_norm: _Optional[float] = ..., noise_std: _Optional[float] = ..., count_unclipped: _Optional[bool] = ..., count_noise_std: _Optional[float] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: TrainHeader
    chunk: _adapter_pb2.AdapterChunk
    def __init__(self, header: _Optional[_Union[TrainHeader, _Mapping]] = ..., chunk: _Optional[_Union[_adapter_pb2.AdapterChunk, _Mapping]] = ...) -> None: ...

class TrainResult(_message.Message):
    __slots__ = ("run_id", "round", "num_examples", "examples_seen", "steps", "loss", "seconds", "adapter", "range_clipped")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_SEEN_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    RANGE_CLIPPED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    num_examples: int
    examples_seen: int
    steps: int
    loss: float
    seconds: float
    adapter: _adapter_pb2.AdapterManifest
    range_clipped: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., examples_seen: _Optional[int] = ..., steps: _Optional[int] = ..., loss: _Optional[float] = ..., seconds: _Optional[float] = ..., adapter: _Optional[_Union[_adapter_pb2.AdapterManifest, _Mapping]] = ..., range_clipped: _Optional[int] = ...) -> None: ...

class TrainProgress(_message.Message):
    __slots__ = ("step", "loss")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ...) -> None: ...

class TrainResponse(_message.Message):
    __slots__ = ("result", "chunk", "progress")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    result: TrainResult
    chunk: _adapter_pb2.AdapterChunk
    progress: TrainProgress
    def __init__(self, result: _Optional[_Union[TrainResult, _Mapping]] = ..., chunk: _Optional[_Union[_adapter_pb2.AdapterChunk, _Mapping]] = ..., progress: _Optional[_Union[TrainProgress, _Mapping]] = ...) -> None: ...

class EvaluateHeader(_message.Message):
    __slots__ = ("run_id", "round", "batch_size", "max_examples", "adapter", "run")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    batch_size: int
    max_examples: int
    adapter: _adapter_pb2.AdapterManifest
    run: RunSpec
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., batch_size: _Optional[int] = ..., max_examples: _Optional[int] = ..., adapter: _Optional[_Union[_adapter_pb2.AdapterManifest, _Mapping]] = ..., run: _Optional[_Union[RunSpec, _Mapping]] = ...) -> None: ...

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

class SecureRound(_message.Message):
    __slots__ = ("run_id", "round", "attempt")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    attempt: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class AdvertiseKeysRequest(_message.Message):
    __slots__ = ("round", "participants", "neighbours", "threshold")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    round: SecureRound
    participants: _containers.RepeatedScalarFieldContainer[str]
    neighbours: int
    threshold: int
    def __init__(self, round: _Optional[_Union[SecureRound, _Mapping]] = ..., participants: _Optional[_Iterable[str]] = ..., neighbours: _Optional[int] = ..., threshold: _Optional[int] = ...) -> None: ...

class SignedKeys(_message.Message):
    __slots__ = ("site", "cipher_public_key", "mask_public_key", "seed_commitment", "signature", "certificate")
    SITE_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SEED_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    site: str
    cipher_public_key: bytes
    mask_public_key: bytes
    seed_commitment: bytes
    signature: bytes
    certificate: bytes
    def __init__(self, site: _Optional[str] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., seed_commitment: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate: _Optional[bytes] = ...) -> None: ...

class AdvertiseKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: SignedKeys
    def __init__(self, keys: _Optional[_Union[SignedKeys, _Mapping]] = ...) -> None: ...

class ShareKeysRequest(_message.Message):
    __slots__ = ("round", "neighbours")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    round: SecureRound
    neighbours: _containers.RepeatedCompositeFieldContainer[SignedKeys]
    def __init__(self, round: _Optional[_Union[SecureRound, _Mapping]] = ..., neighbours: _Optional[_Iterable[_Union[SignedKeys, _Mapping]]] = ...) -> None: ...

class SealedShares(_message.Message):
    __slots__ = ("site", "ciphertext")
    SITE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    site: str
    ciphertext: bytes
    def __init__(self, site: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareKeysResponse(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[SealedShares]
    def __init__(self, shares: _Optional[_Iterable[_Union[SealedShares, _Mapping]]] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("round", "survivors", "dropped")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    round: SecureRound
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round: _Optional[_Union[SecureRound, _Mapping]] = ..., survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("site", "share")
    SITE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    site: str
    share: bytes
    def __init__(self, site: _Optional[str] = ..., share: _Optional[bytes] = ...) -> None: ...

class UnmaskResponse(_message.Message):
    __slots__ = ("seed_shares", "key_shares")
    SEED_SHARES_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    seed_shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    key_shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, seed_shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ..., key_shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...
