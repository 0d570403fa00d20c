"""KServe v2's models on plain data, whatever the transport: for each served model NAME three KServe models
(the names and tensors of ``pickscore export triton``'s repository; the model served as pickscore keeps today's):

    NAME         PROMPT (BYTES) + IMAGE (BYTES) or PIXELS (UINT8 [N, H, W, 3]) -> SCORE (FP32, [N, 1])
    NAME_image   pixel_values (FP32 or FP16, [B, 3, H, W]) -> image_embeds (FP32, [B, D])
    NAME_text    input_ids (INT64, [B, 77]) -> text_embeds (FP32, [B, D])

and the repository extension (index, load, unload: Triton's explicit model control).

    models = KServeModels(repository, state)
    await models.infer(InferRequest("pickscore", "", "req-1", inputs), deadline=None)   # InferResponse
    await models.load("aesthetic")         # Forbidden unless --model-control-mode explicit

The transports (kserve_v2 over gRPC, http_kserve over HTTP) decode their wire into these calls; metadata,
configuration and statistics are plain data in the protocol's JSON form (as Triton's HTTP API writes them).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as mc

from pickscore.backends.triton_config import DATATYPES, model_configs, tower_names
from pickscore.errors import Forbidden, InvalidInput, NotFound
from pickscore.server.boundary import ServerState
from pickscore.server.engine import ImageItem
from pickscore.server.repository import Repository, ServedModel
from pickscore.version import __version__


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
    """The protocol's models over the served models, and the repository extension. Metadata, configuration and
    statistics are plain data in the protocol's JSON form (as Triton's HTTP API writes them; the gRPC messages
    have the same fields)."""

    def __init__(self, repository: Repository, state: ServerState):
        self.repository = repository
        self.settings = repository.settings
        self.state = state
        # each version's three configurations, built once, dropped with the version
        self._configs: weakref.WeakKeyDictionary[ServedModel, dict[str, tuple[str, mc.ModelConfig, dict]]] = (
            weakref.WeakKeyDictionary()
        )
        self.stats: dict[tuple[str, str], _Stats] = {}  # (KServe name, version)

    def _of(self, model: ServedModel) -> dict[str, tuple[str, mc.ModelConfig, dict]]:
        """KServe name -> (kind: ensemble, image or text; its configuration; the same as Triton's JSON)."""
        if model not in self._configs:
            s, b = self.settings, model.backend
            configs = model_configs(
                b.embed_dim,
                b.preprocess.output_size,
                b.tokenizer.context_length,
                s.max_batch_size,
                s.max_images_per_request,
                int(s.max_queue_delay_ms * 1000),
                pixels=True,
                name=model.name,
            )
            kinds = dict(zip((model.name, *tower_names(model.name)), ("ensemble", "image", "text")))
            if b.joint:  # its towers' rows are not embeddings (ImageReward's: ViT tokens, prompt ids): SCORE only,
                # from one model that runs on torch rather than an ensemble of towers
                configs = {model.name: configs[model.name]}
                configs[model.name].ClearField("ensemble_scheduling")
                configs[model.name].platform, configs[model.name].backend = "", "pytorch"
            for cfg in configs.values():  # what the model is, where the gRPC metadata message has no field for it
                cfg.parameters["identity"].string_value = model.identity
            self._configs[model] = {n: (kinds[n], cfg, triton_json(cfg)) for n, cfg in configs.items()}
        return self._configs[model]

    def _find(self, name: str, version: str) -> tuple[ServedModel, str, mc.ModelConfig, dict]:
        """The served model a KServe name belongs to, the name's kind and configuration; NotFound otherwise."""
        for model in self.repository.serving.values():
            if name in (of := self._of(model)):
                if version not in ("", model.version):
                    raise NotFound(
                        f"model {name!r} has no version {version!r} in service; it serves version {model.version}"
                    )
                return (model, *of[name])
        known = [n for m in self.repository.serving.values() for n in self._of(m)]
        raise NotFound(f"unknown model {name!r}; this server has {', '.join(known) or 'no model'}")

    def ready(self) -> bool:
        return self.state.ready and not self.state.draining and not self.state.unhealthy

    def model_ready(self, name: str, version: str) -> bool:
        model = self._find(name, version)[0]  # NotFound for an unknown model
        return self.ready() and model.state == "READY" and not model.engine.hung

    def server_metadata(self) -> dict[str, Any]:
        extensions = ["model_configuration", "statistics", "model_repository"]
        return {"name": "pickscore", "version": __version__, "extensions": extensions}

    def metadata(self, name: str, version: str) -> dict[str, Any]:
        """Triton's model metadata and the served model's ``identity`` (the gRPC message has no such field: it is
        in the configuration's parameters there, as it is in every transport's)."""
        model, _, cfg, _ = self._find(name, version)

        def meta(t) -> dict[str, Any]:
            return {"name": t.name, "datatype": DATATYPES[t.data_type], "shape": [-1, *t.dims]}

        return {
            "name": cfg.name,
            "versions": [model.version],
            "platform": cfg.platform,
            "inputs": [meta(t) for t in cfg.input],
            "outputs": [meta(t) for t in cfg.output],
            "identity": model.identity,
        }

    def config(self, name: str, version: str) -> dict[str, Any]:
        """Triton's model configuration."""
        return self._find(name, version)[3]

    def model_config(self, name: str, version: str) -> mc.ModelConfig:
        """Triton's configuration message of a served model (NotFound naming what is served otherwise)."""
        return self._find(name, version)[2]

    def statistics(self, name: str, version: str) -> dict[str, Any]:
        """Of one model, or of every model when ``name`` is empty."""
        if name:
            model = self._find(name, version)[0]
            return {"model_stats": [self._statistics(name, model.version)]}
        served = [(n, m.version) for m in self.repository.serving.values() for n in self._of(m)]
        return {"model_stats": [self._statistics(n, v) for n, v in served]}

    def _statistics(self, name: str, version: str) -> dict[str, Any]:
        st = self.stats.get((name, version), _Stats())
        return {
            "name": name,
            "version": version,
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

    # the repository extension (Triton's explicit model control) ----------------------------------------------

    def index(self, ready: bool = False) -> list[dict[str, str]]:
        """Every model known, in service or not (``ready``: only those in service): name, version, state (READY,
        UNLOADING, UNAVAILABLE), reason."""
        rows = self.repository.index()
        return [r for r in rows if r["state"] == "READY"] if ready else rows

    async def load(self, name: str, parameters: Mapping[str, Any]) -> None:
        """Load (or reload) ``name``'s newest version, warm it, then put it in service; the old version drains."""
        _check_parameters(parameters)
        self._control()
        await self.repository.load(self.repository.spec_to_load(name))

    async def unload(self, name: str, parameters: Mapping[str, Any]) -> None:
        """Take ``name`` out of service once its admitted requests finished."""
        _check_parameters(parameters, taken=("unload_dependents",))
        self._control()
        await self.repository.unload(name)

    def _control(self) -> None:
        if self.settings.model_control_mode != "explicit":
            raise Forbidden(
                f"model control is {self.settings.model_control_mode}: loading and unloading over the API needs "
                "the server started with --model-control-mode explicit"
            )

    # inference ------------------------------------------------------------------------------------------------

    async def infer(self, request: InferRequest, deadline: float | None) -> InferResponse:
        """Every output asked for as FP32, computed through the model's engine; counted in its statistics."""
        served, kind, cfg, _ = self._find(request.model, request.version)
        stats = self.stats.setdefault((cfg.name, served.version), _Stats())
        start = time.perf_counter_ns()
        try:
            inputs = read_inputs(request.inputs, cfg, kind)
            declared = [o.name for o in cfg.output]
            wanted = list(request.outputs) or declared
            for name in wanted:  # before any compute
                if name not in declared:
                    raise InvalidInput(f"output {name!r}: model {cfg.name!r} has outputs {', '.join(declared)}")
            priority, deadline = _parameters(request.parameters, deadline)
            with self.repository.use([served.name], served.version) as (model,):
                outputs, items = await _run(model, kind, inputs, deadline, priority)
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
        return InferResponse(cfg.name, served.version, request.id, tensors)


def _check_parameters(parameters: Mapping[str, Any], taken: tuple[str, ...] = ()) -> None:
    """A load's or unload's parameters (plain values): Triton's config and file overrides are not taken; the boolean
    ``taken`` ones are (an unload's ``unload_dependents``, which tritonclient always sends, changes nothing: a
    model's towers are unloaded with it whatever it says)."""
    refused = [key for key, value in parameters.items() if not (key in taken and isinstance(value, bool))]
    if refused:
        raise InvalidInput(f"parameters {', '.join(refused)}: not supported; the repository's files are loaded")


async def _run(
    model: ServedModel, kind: str, inputs: dict[str, np.ndarray], deadline, priority
) -> tuple[dict[str, np.ndarray], int]:
    engine = model.engine
    if kind == "ensemble":
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
    if kind == "image":
        pixels = inputs["pixel_values"].astype(np.float32, copy=False)
        return {"image_embeds": await engine.embed_pixels(pixels, deadline, priority)}, len(pixels)
    tokens = inputs["input_ids"]
    vocab = len(engine.backend.tokenizer.encoder)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise InvalidInput(f"input 'input_ids': token ids must lie in [0, {vocab}); got {tokens.min()}..{tokens.max()}")
    return {"text_embeds": await engine.embed_tokens(tokens, deadline, priority)}, len(tokens)


def read_inputs(inputs: Sequence[InputTensor], cfg: mc.ModelConfig, kind: str) -> dict[str, np.ndarray]:
    """The tensors by name, checked against the model's declared inputs (name, datatype, shape), then read;
    ``kind``: ensemble, image or text."""
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
        allowed = [DATATYPES[spec.data_type]] + (["FP16"] if spec.data_type == mc.TYPE_FP32 and kind == "image" else [])
        if tensor.datatype not in allowed:
            raise InvalidInput(
                f"input {tensor.name!r}: datatype {tensor.datatype or '(none)'}; expected {' or '.join(allowed)}"
            )
        _check_shape(tensor.name, tensor.shape, tuple(spec.dims), kind == "ensemble")
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
