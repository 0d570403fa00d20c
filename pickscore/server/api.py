"""The server's operations on plain data, whatever the transport: scoring (scoring.v1's Score, Rank and
GetModelInfo) and the three KServe v2 models (metadata, configuration, readiness, statistics, inference).

    scoring = Scoring(engine)
    await scoring.rank("a cat", [ImageItem(jpeg)], top_k=1, deadline=None)    # [RankedImage(0, "", 21.3, 1.0)]
    models = KServeModels(engine, state)
    await models.infer(InferRequest("pickscore", "", "req-1", inputs), deadline=None)   # InferResponse

The transports (scoring_v1 and kserve_v2 over gRPC, http and http_kserve over HTTP) decode their wire into these
calls and encode the answers; what is checked whatever the wire is checked here, once. Errors are
``pickscore.errors``, which each transport maps to its own wire.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as mc

from pickscore.backends.triton_config import DATATYPES, ENSEMBLE, IMAGE, model_configs
from pickscore.errors import InvalidInput, NotFound
from pickscore.server.boundary import ServerState
from pickscore.server.engine import Engine, ImageItem
from pickscore.version import __version__

# scoring.v1 ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """The served model and the server's limits (GetModelInfo; the fields in the message's order)."""

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


@dataclass(frozen=True)
class ScoredImage:
    index: int
    id: str
    score: float


@dataclass(frozen=True)
class RankedImage:
    index: int
    id: str
    score: float
    probability: float


@dataclass(frozen=True)
class RawPixels:
    """An image's decoded pixels as a request carries them: row-major uint8, ``channels`` 0 meaning 3."""

    height: int
    width: int
    channels: int
    data: bytes


def image_item(index: int, data: bytes = b"", id: str = "", pixels: RawPixels | None = None) -> ImageItem:
    """The request's ``index``-th image; InvalidInput naming it when its pixels do not fit their shape."""
    return ImageItem(data, id, None if pixels is None else _pixels(ImageItem(id=id).describe(index), pixels))


def _pixels(name: str, p: RawPixels) -> np.ndarray:
    """(height, width, channels) uint8, or (height, width) for gray."""
    channels = p.channels or 3
    if channels not in (1, 3, 4):
        raise InvalidInput(f"{name}: pixels have {channels} channels; 1 (gray), 3 (RGB) or 4 (RGBA)")
    if len(p.data) != p.height * p.width * channels:
        raise InvalidInput(
            f"{name}: {len(p.data)} bytes of pixels for {p.height}x{p.width}x{channels} "
            f"({p.height * p.width * channels} expected)"
        )
    pixels = np.frombuffer(p.data, np.uint8).reshape(p.height, p.width, channels)
    return pixels[..., 0] if channels == 1 else pixels


class Scoring:
    """scoring.v1's operations over the engine."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def model_info(self) -> ModelInfo:
        backend, s = self.engine.backend, self.engine.settings
        return ModelInfo(
            source=backend.source,
            backend=backend.name,
            device=backend.description,
            embed_dim=backend.embed_dim,
            logit_scale=float(backend.logit_scale),
            image_size=backend.preprocess.output_size[0],
            context_length=backend.tokenizer.context_length,
            max_batch_size=s.max_batch_size,
            max_images_per_request=s.max_images_per_request,
            max_image_bytes=s.max_image_bytes,
            version=__version__,
        )

    async def score(
        self, prompt: str, prompts: Sequence[str], images: Sequence[ImageItem], deadline: float | None
    ) -> list[ScoredImage]:
        """``prompt`` for every image, or ``prompts``, one per image: one of the two."""
        if prompt and prompts:
            raise InvalidInput("set either prompt (one for all images) or prompts (one per image), not both")
        scores = await self.engine.score(list(prompts) or [prompt], images, deadline)
        return [ScoredImage(i, item.id, float(s)) for i, (item, s) in enumerate(zip(images, scores))]

    async def rank(
        self, prompt: str, images: Sequence[ImageItem], top_k: int | None, deadline: float | None
    ) -> list[RankedImage]:
        """Best first; ``top_k`` 0 or None: every image."""
        ranking = await self.engine.rank(prompt, images, top_k or None, deadline)
        return [
            RankedImage(i, images[i].id, float(ranking.scores[i]), float(ranking.probabilities[i]))
            for i in ranking.order
        ]


# KServe v2 -----------------------------------------------------------------------------------------------------

VERSION = "1"  # every model's one version


@dataclass(frozen=True)
class InputTensor:
    """An input as its request declares it. ``read()`` gives its data as an array of ``shape``, or raises
    InvalidInput when the data does not fit; it is called once name, datatype and shape passed the checks."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]


@dataclass(frozen=True)
class InferRequest:
    model: str
    version: str
    id: str
    inputs: Sequence[InputTensor]
    outputs: Sequence[str] = ()  # the outputs asked for, in order; none: every declared output
    parameters: Mapping[str, Any] = field(default_factory=dict)  # plain values; priority and timeout are read


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    array: np.ndarray


@dataclass(frozen=True)
class InferResponse:
    model: str
    version: str
    id: str
    outputs: list[Tensor]


@dataclass
class _Stats:
    """Per-model counters behind ModelStatistics."""

    inference_count: int = 0  # items (images, prompts) inferred
    execution_count: int = 0  # requests
    success: list[int] = field(default_factory=lambda: [0, 0])  # count, ns
    fail: list[int] = field(default_factory=lambda: [0, 0])
    last_inference_ms: int = 0


class KServeModels:
    """The protocol's three models over the engine (the tensors of ``pickscore export triton``'s repository).
    Metadata, configuration and statistics are plain data in the protocol's JSON form (as Triton's HTTP API
    writes them; the gRPC messages have the same fields)."""

    def __init__(self, engine: Engine, state: ServerState):
        self.engine = engine
        self.state = state
        s, b = engine.settings, engine.backend
        self.configs = model_configs(
            b.embed_dim,
            b.preprocess.output_size,
            b.tokenizer.context_length,
            s.max_batch_size,
            s.max_images_per_request,
            int(s.max_queue_delay_ms * 1000),
            pixels=True,
        )
        self._documents = {name: triton_json(cfg) for name, cfg in self.configs.items()}
        self.stats = {name: _Stats() for name in self.configs}

    def ready(self) -> bool:
        return self.state.ready and not self.state.draining and not self.state.unhealthy

    def model_ready(self, name: str, version: str) -> bool:
        self.model_config(name, version)  # NotFound for an unknown model
        return self.ready()

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "pickscore", "version": __version__, "extensions": ["model_configuration", "statistics"]}

    def metadata(self, name: str, version: str) -> dict[str, Any]:
        cfg = self.model_config(name, version)

        def meta(t) -> dict[str, Any]:
            return {"name": t.name, "datatype": DATATYPES[t.data_type], "shape": [-1, *t.dims]}

        return {
            "name": cfg.name,
            "versions": [VERSION],
            "platform": cfg.platform,
            "inputs": [meta(t) for t in cfg.input],
            "outputs": [meta(t) for t in cfg.output],
        }

    def config(self, name: str, version: str) -> dict[str, Any]:
        """Triton's model configuration."""
        return self._documents[self.model_config(name, version).name]

    def statistics(self, name: str, version: str) -> dict[str, Any]:
        """Of one model, or of every model when ``name`` is empty."""
        names = [self.model_config(name, version).name] if name else list(self.configs)
        return {"model_stats": [self._statistics(model) for model in names]}

    def _statistics(self, model: str) -> dict[str, Any]:
        st = self.stats[model]
        return {
            "name": model,
            "version": VERSION,
            "last_inference": st.last_inference_ms,
            "inference_count": st.inference_count,
            "execution_count": st.execution_count,
            "inference_stats": {
                "success": {"count": st.success[0], "ns": st.success[1]},
                "fail": {"count": st.fail[0], "ns": st.fail[1]},
            },
            "batch_stats": [],
            "memory_usage": [],
        }

    def model_config(self, name: str, version: str) -> mc.ModelConfig:
        """Triton's configuration message of a served model (NotFound naming what is served otherwise)."""
        if name not in self.configs:
            raise NotFound(f"unknown model {name!r}; this server has {', '.join(self.configs)}")
        if version not in ("", VERSION):
            raise NotFound(f"model {name!r} has no version {version!r}; it has version {VERSION}")
        return self.configs[name]

    async def infer(self, request: InferRequest, deadline: float | None) -> InferResponse:
        """Every output asked for as FP32, computed through the engine; counted in the model's statistics."""
        cfg = self.model_config(request.model, request.version)
        stats = self.stats[cfg.name]
        start = time.perf_counter_ns()
        try:
            inputs = read_inputs(request.inputs, cfg)
            declared = [o.name for o in cfg.output]
            wanted = list(request.outputs) or declared
            for name in wanted:  # before any compute
                if name not in declared:
                    raise InvalidInput(f"output {name!r}: model {cfg.name!r} has outputs {', '.join(declared)}")
            priority, deadline = _parameters(request.parameters, deadline)
            outputs, items = await self._run(cfg.name, inputs, deadline, priority)
        except Exception:
            stats.fail[0] += 1
            stats.fail[1] += time.perf_counter_ns() - start
            raise
        stats.success[0] += 1
        stats.success[1] += time.perf_counter_ns() - start
        stats.execution_count += 1
        stats.inference_count += items
        stats.last_inference_ms = int(time.time() * 1000)
        tensors = [Tensor(name, "FP32", outputs[name].astype(np.float32, copy=False)) for name in wanted]
        return InferResponse(cfg.name, VERSION, request.id, tensors)

    async def _run(
        self, model: str, inputs: dict[str, np.ndarray], deadline, priority
    ) -> tuple[dict[str, np.ndarray], int]:
        engine = self.engine
        if model == ENSEMBLE:
            if ("IMAGE" in inputs) == ("PIXELS" in inputs):
                raise InvalidInput("give the images as IMAGE (encoded, BYTES) or PIXELS (UINT8 [N, H, W, 3]): one")
            if "IMAGE" in inputs:
                images = [ImageItem(bytes(b)) for b in inputs["IMAGE"].reshape(-1)]
            else:
                images = [ImageItem(pixels=p) for p in inputs["PIXELS"]]  # each (H, W, 3)
            try:
                texts = [p.decode("utf-8") for p in inputs["PROMPT"].reshape(-1)]
            except UnicodeDecodeError as e:
                raise InvalidInput(f"input 'PROMPT': element is not UTF-8 text ({e})") from None
            scores = await engine.score(texts, images, deadline, priority)
            return {"SCORE": scores.reshape(-1, 1)}, len(images)
        if model == IMAGE:
            pixels = inputs["pixel_values"].astype(np.float32, copy=False)
            return {"image_embeds": await engine.embed_pixels(pixels, deadline, priority)}, len(pixels)
        tokens = inputs["input_ids"]
        vocab = len(engine.backend.tokenizer.encoder)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            raise InvalidInput(
                f"input 'input_ids': token ids must lie in [0, {vocab}); got {tokens.min()}..{tokens.max()}"
            )
        return {"text_embeds": await engine.embed_tokens(tokens, deadline, priority)}, len(tokens)


def read_inputs(inputs: Sequence[InputTensor], cfg: mc.ModelConfig) -> dict[str, np.ndarray]:
    """The tensors by name, checked against the model's declared inputs (name, datatype, shape), then read."""
    declared = {t.name: t for t in cfg.input}
    names = [t.name for t in inputs]
    for name in names:
        if name not in declared:
            raise InvalidInput(f"input {name!r}: model {cfg.name!r} has no such input (it takes {', '.join(declared)})")
        if names.count(name) > 1:
            raise InvalidInput(f"input {name!r}: given more than once")
    for name, spec in declared.items():
        if name not in names and not spec.optional:
            raise InvalidInput(f"input {name!r}: missing (model {cfg.name!r} takes {', '.join(declared)})")
    out = {}
    for tensor in inputs:
        spec = declared[tensor.name]
        allowed = [DATATYPES[spec.data_type]] + (
            ["FP16"] if spec.data_type == mc.TYPE_FP32 and cfg.name == IMAGE else []
        )
        if tensor.datatype not in allowed:
            raise InvalidInput(
                f"input {tensor.name!r}: datatype {tensor.datatype or '(none)'}; expected {' or '.join(allowed)}"
            )
        _check_shape(tensor.name, tensor.shape, tuple(spec.dims), cfg.name == ENSEMBLE)
        out[tensor.name] = tensor.read()
    return out


def _check_shape(name: str, shape: tuple[int, ...], dims: tuple[int, ...], flat_ok: bool) -> None:
    expected = f"[-1, {', '.join(map(str, dims))}]"
    if flat_ok and len(shape) == 1 and dims == (1,):  # [N] is accepted for [N, 1]
        shape = (*shape, 1)
    fits = all(d == -1 and s >= 1 or s == d for s, d in zip(shape[1:], dims))  # -1: any size of at least 1
    if len(shape) != len(dims) + 1 or not fits or shape[0] < 1:
        raise InvalidInput(f"input {name!r}: shape {list(shape)}; expected {expected} (batch first, at least 1)")


def _parameters(parameters: Mapping[str, Any], deadline: float | None) -> tuple[int, float | None]:
    """(priority, deadline) from the ``priority`` and ``timeout`` (microseconds) parameters."""

    def integer(key: str) -> int:
        value = parameters[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidInput(f"parameter {key!r}: must be an integer, got {type(value).__name__}")
        if value < 0:
            raise InvalidInput(f"parameter {key!r}: must not be negative, got {value}")
        return value

    priority = integer("priority") if "priority" in parameters else 0
    if "timeout" in parameters and (timeout_us := integer("timeout")):
        own = asyncio.get_running_loop().time() + timeout_us / 1e6
        deadline = own if deadline is None else min(deadline, own)
    return priority, deadline


_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def triton_json(message: Message) -> dict[str, Any]:
    """A Triton message (a model configuration) as Triton's HTTP API writes it: field names as declared, in
    their order, every field present, 64-bit integers as numbers (protobuf's JSON mapping writes strings)."""
    d = json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _numbers(message.DESCRIPTOR, d)


def _numbers(desc: Descriptor, d: dict[str, Any]) -> dict[str, Any]:
    d = {f.name: d[f.name] for f in desc.fields if f.name in d} | {
        k: v for k, v in d.items() if k not in desc.fields_by_name
    }
    for key, value in d.items():
        fd = desc.fields_by_name.get(key)
        if fd is None:
            continue
        if fd.message_type is not None:
            if fd.message_type.GetOptions().map_entry:
                vfd = fd.message_type.fields_by_name["value"]
                if vfd.message_type is not None:
                    d[key] = {k: _numbers(vfd.message_type, v) for k, v in value.items()}
                elif vfd.type in _INT64:
                    d[key] = {k: int(v) for k, v in value.items()}
            elif isinstance(value, list):
                d[key] = [_numbers(fd.message_type, v) for v in value]
            else:
                d[key] = _numbers(fd.message_type, value)
        elif fd.type in _INT64:
            d[key] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return d
