"""Triton's protocol: KServe v2 ``inference.GRPCInferenceService`` over the same engine as scoring.v1.

Models (the names and tensors of the Triton repository that ``pickscore export triton`` writes):
  pickscore        PROMPT (BYTES, 1 prompt broadcast over N images, or N prompts) + IMAGE (BYTES, N encoded
                   images) -> SCORE (FP32, [N, 1])
  pickscore_image  pixel_values (FP32 or FP16, [B, 3, H, W]) -> image_embeds (FP32, [B, D])
  pickscore_text   input_ids (INT64, [B, 77]) -> text_embeds (FP32, [B, D])
Inputs come as ``raw_input_contents`` or typed contents; BYTES elements carry a 4-byte little-endian length
prefix in raw form. Parameters ``priority`` (1 highest, 0 default) and ``timeout`` (microseconds) are honoured.
Every request goes through the same batchers, caches, metrics and error mapping as scoring.v1.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from pickscore.backends.triton_config import DATATYPES, ENSEMBLE, IMAGE, model_configs
from pickscore.errors import InvalidInput, NotFound, PickScoreError
from pickscore.server.boundary import ServerState, boundary
from pickscore.server.engine import Engine, ImageItem
from pickscore.server.streams import deadline_of, windowed
from pickscore.status import status_of
from pickscore.version import __version__

SERVICE_NAME = "inference.GRPCInferenceService"
VERSION = "1"
NUMPY = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "UINT8": np.uint8}
# FP16 comes raw only
TYPED = {"FP32": "fp32_contents", "INT64": "int64_contents", "UINT8": "uint_contents", "BYTES": "bytes_contents"}


@dataclass
class _Stats:
    """Per-model counters behind ModelStatistics."""

    inference_count: int = 0  # items (images, prompts) inferred
    execution_count: int = 0  # requests
    success: list[int] = field(default_factory=lambda: [0, 0])  # count, ns
    fail: list[int] = field(default_factory=lambda: [0, 0])
    last_inference_ms: int = 0


class KServeModels:
    """The three models of the protocol over the engine, transport-neutral: protobuf messages in and out (the
    gRPC service answers with them; the HTTP front door converts them to and from JSON)."""

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
        self.stats = {name: _Stats() for name in self.configs}

    def ready(self) -> bool:
        return self.state.ready and not self.state.draining and not self.state.unhealthy

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="pickscore", version=__version__, extensions=["model_configuration", "statistics"]
        )

    def metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        cfg = self.config(name, version)

        def meta(t):
            return pb.ModelMetadataResponse.TensorMetadata(
                name=t.name, datatype=DATATYPES[t.data_type], shape=[-1, *t.dims]
            )

        return pb.ModelMetadataResponse(
            name=cfg.name,
            versions=[VERSION],
            platform=cfg.platform,
            inputs=[meta(t) for t in cfg.input],
            outputs=[meta(t) for t in cfg.output],
        )

    def statistics(self, name: str, version: str) -> pb.ModelStatisticsResponse:
        names = [self.config(name, version).name] if name else list(self.configs)
        out = []
        for model in names:
            st = self.stats[model]
            out.append(
                pb.ModelStatistics(
                    name=model,
                    version=VERSION,
                    last_inference=st.last_inference_ms,
                    inference_count=st.inference_count,
                    execution_count=st.execution_count,
                    inference_stats=pb.InferStatistics(
                        success=pb.StatisticDuration(count=st.success[0], ns=st.success[1]),
                        fail=pb.StatisticDuration(count=st.fail[0], ns=st.fail[1]),
                    ),
                )
            )
        return pb.ModelStatisticsResponse(model_stats=out)

    def config(self, name: str, version: str) -> mc.ModelConfig:
        if name not in self.configs:
            raise NotFound(f"unknown model {name!r}; this server has {', '.join(self.configs)}")
        if version not in ("", VERSION):
            raise NotFound(f"model {name!r} has no version {version!r}; it has version {VERSION}")
        return self.configs[name]

    async def infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        cfg = self.config(request.model_name, request.model_version)
        stats = self.stats[cfg.name]
        start = time.perf_counter_ns()
        try:
            inputs = read_inputs(request, cfg)
            declared = [o.name for o in cfg.output]
            wanted = [o.name for o in request.outputs] or declared
            for name in wanted:  # before any compute
                if name not in declared:
                    raise InvalidInput(f"output {name!r}: model {cfg.name!r} has outputs {', '.join(declared)}")
            priority, deadline = _parameters(request, deadline)
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
        response = pb.ModelInferResponse(model_name=cfg.name, model_version=VERSION, id=request.id)
        for name in wanted:
            array = outputs[name]
            response.outputs.add(name=name, datatype="FP32", shape=array.shape)
            response.raw_output_contents.append(array.astype("<f4").tobytes())
        return response

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


class KServeV2Service(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService``: each RPC is ``KServeModels`` inside the gRPC boundary."""

    def __init__(self, models: KServeModels):
        self.models = models
        self.state = models.state
        self.engine = models.engine

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.models.ready())

    async def ModelReady(self, request, context):
        async with boundary(self.state, "ModelReady", context, admit=False):
            self.models.config(request.name, request.version)
            return pb.ModelReadyResponse(ready=self.models.ready())

    async def ServerMetadata(self, request, context):
        async with boundary(self.state, "ServerMetadata", context, admit=False):
            return self.models.server_metadata()

    async def ModelMetadata(self, request, context):
        async with boundary(self.state, "ModelMetadata", context, admit=False):
            return self.models.metadata(request.name, request.version)

    async def ModelConfig(self, request, context):
        async with boundary(self.state, "ModelConfig", context, admit=False):
            return pb.ModelConfigResponse(config=self.models.config(request.name, request.version))

    async def ModelStatistics(self, request, context):
        async with boundary(self.state, "ModelStatistics", context, admit=False):
            return self.models.statistics(request.name, request.version)

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        async with boundary(self.state, "ModelInfer", context):
            return await self.models.infer(request, deadline_of(context))

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest], context) -> AsyncIterator:
        async def one(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                return pb.ModelStreamInferResponse(
                    infer_response=await self.models.infer(request, deadline_of(context))
                )
            except PickScoreError as e:  # in-band, as Triton does: the stream goes on
                code, message = status_of(e)
                return pb.ModelStreamInferResponse(
                    error_message=f"{code.name}: {message}",
                    infer_response=pb.ModelInferResponse(id=request.id, model_name=request.model_name),
                )

        async with boundary(self.state, "ModelStreamInfer", context):
            async for response in windowed(requests, one, self.engine.settings.stream_window):
                yield response


def read_inputs(request: pb.ModelInferRequest, cfg: mc.ModelConfig) -> dict[str, np.ndarray]:
    """The request's tensors by name, checked against the model's declared inputs (name, datatype, shape)."""
    declared = {t.name: t for t in cfg.input}
    names = [t.name for t in request.inputs]
    for name in names:
        if name not in declared:
            raise InvalidInput(f"input {name!r}: model {cfg.name!r} has no such input (it takes {', '.join(declared)})")
        if names.count(name) > 1:
            raise InvalidInput(f"input {name!r}: given more than once")
    for name, spec in declared.items():
        if name not in names and not spec.optional:
            raise InvalidInput(f"input {name!r}: missing (model {cfg.name!r} takes {', '.join(declared)})")
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs")
    out = {}
    for i, tensor in enumerate(request.inputs):
        spec = declared[tensor.name]
        allowed = [DATATYPES[spec.data_type]] + (
            ["FP16"] if spec.data_type == mc.TYPE_FP32 and cfg.name == IMAGE else []
        )
        if tensor.datatype not in allowed:
            raise InvalidInput(
                f"input {tensor.name!r}: datatype {tensor.datatype or '(none)'}; expected {' or '.join(allowed)}"
            )
        shape = tuple(tensor.shape)
        _check_shape(tensor.name, shape, tuple(spec.dims), cfg.name == ENSEMBLE)
        raw = request.raw_input_contents[i] if request.raw_input_contents else None
        out[tensor.name] = _decode(tensor, shape, raw)
    return out


def _check_shape(name: str, shape: tuple[int, ...], dims: tuple[int, ...], flat_ok: bool) -> None:
    expected = f"[-1, {', '.join(map(str, dims))}]"
    if flat_ok and len(shape) == 1 and dims == (1,):  # [N] is accepted for [N, 1]
        shape = (*shape, 1)
    fits = all(d == -1 and s >= 1 or s == d for s, d in zip(shape[1:], dims))  # -1: any size of at least 1
    if len(shape) != len(dims) + 1 or not fits or shape[0] < 1:
        raise InvalidInput(f"input {name!r}: shape {list(shape)}; expected {expected} (batch first, at least 1)")


def _decode(tensor, shape: tuple[int, ...], raw: bytes | None) -> np.ndarray:
    count = int(np.prod(shape))
    if tensor.datatype == "BYTES":
        elements = _split_bytes(tensor.name, raw) if raw is not None else list(tensor.contents.bytes_contents)
        if len(elements) != count:
            raise InvalidInput(
                f"input {tensor.name!r}: {len(elements)} elements for shape {list(shape)} ({count} expected)"
            )
        array = np.empty(count, dtype=object)
        array[:] = elements
        return array.reshape(shape)
    dtype = np.dtype(NUMPY[tensor.datatype]).newbyteorder("<")
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {tensor.name!r}: {len(raw)} bytes of raw data for shape {list(shape)} "
                f"({count * dtype.itemsize} expected)"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    if tensor.datatype not in TYPED:
        raise InvalidInput(f"input {tensor.name!r}: {tensor.datatype} must come in raw_input_contents")
    values = getattr(tensor.contents, TYPED[tensor.datatype])
    if len(values) != count:
        raise InvalidInput(f"input {tensor.name!r}: {len(values)} values for shape {list(shape)} ({count} expected)")
    return np.asarray(values, dtype=dtype).reshape(shape)


def _split_bytes(name: str, raw: bytes) -> list[bytes]:
    """Elements of a raw BYTES tensor: each a 4-byte little-endian length, then that many bytes."""
    out, at = [], 0
    view = memoryview(raw)
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidInput(
                f"input {name!r}: BYTES element {len(out)} has a cut length prefix ({len(raw) - at} of 4 bytes)"
            )
        (length,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + length > len(raw):
            raise InvalidInput(
                f"input {name!r}: BYTES element {len(out)} declares {length} bytes but {len(raw) - at} remain"
            )
        out.append(bytes(view[at : at + length]))
        at += length
    return out


def _parameters(request: pb.ModelInferRequest, deadline: float | None) -> tuple[int, float | None]:
    """(priority, deadline) from the request's ``priority`` and ``timeout`` (microseconds) parameters."""

    def integer(key: str) -> int:
        p = request.parameters[key]
        kind = p.WhichOneof("parameter_choice")
        if kind not in ("int64_param", "uint64_param"):
            raise InvalidInput(f"parameter {key!r}: must be an integer, got {kind}")
        value = getattr(p, kind)
        if value < 0:
            raise InvalidInput(f"parameter {key!r}: must not be negative, got {value}")
        return value

    priority = integer("priority") if "priority" in request.parameters else 0
    if "timeout" in request.parameters and (timeout_us := integer("timeout")):
        own = asyncio.get_running_loop().time() + timeout_us / 1e6
        deadline = own if deadline is None else min(deadline, own)
    return priority, deadline
