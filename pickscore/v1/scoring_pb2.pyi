from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Normalize(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NORMALIZE_NONE: _ClassVar[Normalize]
    NORMALIZE_DECLARED: _ClassVar[Normalize]
    NORMALIZE_RUNNING: _ClassVar[Normalize]
NORMALIZE_NONE: Normalize
NORMALIZE_DECLARED: Normalize
NORMALIZE_RUNNING: Normalize

class Image(_message.Message):
    __slots__ = ("data", "id", "pixels")
    DATA_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    id: str
    pixels: Pixels
    def __init__(self, data: _Optional[bytes] = ..., id: _Optional[str] = ..., pixels: _Optional[_Union[Pixels, _Mapping]] = ...) -> None: ...

class Pixels(_message.Message):
    __slots__ = ("height", "width", "channels", "data")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    channels: int
    data: bytes
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("prompt", "images", "prompts", "model")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    model: str
    def __init__(self, prompt: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., prompts: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ...) -> None: ...

class ScoredImage(_message.Message):
    __slots__ = ("index", "id", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    score: float
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoredImage]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoredImage, _Mapping]]] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("prompt", "images", "top_k", "model")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    top_k: int
    model: str
    def __init__(self, prompt: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., top_k: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class RankedImage(_message.Message):
    __slots__ = ("index", "id", "score", "probability")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    score: float
    probability: float
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., score: _Optional[float] = ..., probability: _Optional[float] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("ranking",)
    RANKING_FIELD_NUMBER: _ClassVar[int]
    ranking: _containers.RepeatedCompositeFieldContainer[RankedImage]
    def __init__(self, ranking: _Optional[_Iterable[_Union[RankedImage, _Mapping]]] = ...) -> None: ...

class ScoreStreamRequest(_message.Message):
    __slots__ = ("tag", "request")
    TAG_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    tag: str
    request: ScoreRequest
    def __init__(self, tag: _Optional[str] = ..., request: _Optional[_Union[ScoreRequest, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    retry_after_ms: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class ScoreStreamResponse(_message.Message):
    __slots__ = ("tag", "response", "error")
    TAG_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    tag: str
    response: ScoreResponse
    error: Error
    def __init__(self, tag: _Optional[str] = ..., response: _Optional[_Union[ScoreResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("source", "backend", "device", "embed_dim", "logit_scale", "image_size", "context_length", "max_batch_size", "max_images_per_request", "max_image_bytes", "version", "model", "model_version", "weights_bytes", "scores_seen", "score_mean", "score_std", "kind", "identity")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    LOGIT_SCALE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    SCORES_SEEN_FIELD_NUMBER: _ClassVar[int]
    SCORE_MEAN_FIELD_NUMBER: _ClassVar[int]
    SCORE_STD_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    source: str
    backend: str
    device: str
    embed_dim: int
    logit_scale: float
    image_size: int
    context_length: int
    max_batch_size: int
    max_images_per_request: int
    max_image_bytes: int
    version: str
    model: str
    model_version: str
    weights_bytes: int
    scores_seen: int
    score_mean: float
    score_std: float
    kind: str
    identity: str
    def __init__(self, source: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., embed_dim: _Optional[int] = ..., logit_scale: _Optional[float] = ..., image_size: _Optional[int] = ..., context_length: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., version: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., weights_bytes: _Optional[int] = ..., scores_seen: _Optional[int] = ..., score_mean: _Optional[float] = ..., score_std: _Optional[float] = ..., kind: _Optional[str] = ..., identity: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[GetModelInfoResponse]
    def __init__(self, models: _Optional[_Iterable[_Union[GetModelInfoResponse, _Mapping]]] = ...) -> None: ...

class ModelWeight(_message.Message):
    __slots__ = ("model", "weight")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    model: str
    weight: float
    def __init__(self, model: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class RewardsRequest(_message.Message):
    __slots__ = ("prompt", "images", "prompts", "models", "normalize")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.RepeatedCompositeFieldContainer[ModelWeight]
    normalize: Normalize
    def __init__(self, prompt: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., prompts: _Optional[_Iterable[str]] = ..., models: _Optional[_Iterable[_Union[ModelWeight, _Mapping]]] = ..., normalize: _Optional[_Union[Normalize, str]] = ...) -> None: ...

class ModelScores(_message.Message):
    __slots__ = ("model", "version", "weight", "scores", "normalized")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    weight: float
    scores: _containers.RepeatedScalarFieldContainer[float]
    normalized: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., weight: _Optional[float] = ..., scores: _Optional[_Iterable[float]] = ..., normalized: _Optional[_Iterable[float]] = ...) -> None: ...

class RewardsResponse(_message.Message):
    __slots__ = ("rewards", "models")
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    rewards: _containers.RepeatedScalarFieldContainer[float]
    models: _containers.RepeatedCompositeFieldContainer[ModelScores]
    def __init__(self, rewards: _Optional[_Iterable[float]] = ..., models: _Optional[_Iterable[_Union[ModelScores, _Mapping]]] = ...) -> None: ...
