"""Triton's protocol: KServe v2 ``inference.GRPCInferenceService`` over ``api.KServeModels``.

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

from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from pickscore.errors import InvalidInput, PickScoreError
from pickscore.server import tensors
from pickscore.server.api_kserve import InferRequest, InferResponse, InputTensor, KServeModels
from pickscore.server.boundary import boundary, deadline_of
from pickscore.server.streams import windowed
from pickscore.status import status_of

SERVICE_NAME = "inference.GRPCInferenceService"
# FP16 comes raw only
TYPED = {"FP32": "fp32_contents", "INT64": "int64_contents", "UINT8": "uint_contents", "BYTES": "bytes_contents"}


class KServeV2Service(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService``: each RPC is ``KServeModels`` inside the gRPC boundary."""

    def __init__(self, models: KServeModels):
        self.models = models
        self.state = models.state

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.models.ready())

    async def ModelReady(self, request, context):
        async with boundary(self.state, "ModelReady", context, admit=False):
            return pb.ModelReadyResponse(ready=self.models.model_ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        async with boundary(self.state, "ServerMetadata", context, admit=False):
            return _message(self.models.server_metadata(), pb.ServerMetadataResponse)

    async def ModelMetadata(self, request, context):
        async with boundary(self.state, "ModelMetadata", context, admit=False):
            metadata = self.models.metadata(request.name, request.version)
            del metadata["identity"]  # no field for it in the message: ModelConfig's parameters carry it
            return _message(metadata, pb.ModelMetadataResponse)

    async def ModelConfig(self, request, context):
        async with boundary(self.state, "ModelConfig", context, admit=False):
            # Triton's own format, as the api holds it: no round trip through its JSON form
            return pb.ModelConfigResponse(config=self.models.model_config(request.name, request.version))

    async def ModelStatistics(self, request, context):
        async with boundary(self.state, "ModelStatistics", context, admit=False):
            return _message(self.models.statistics(request.name, request.version), pb.ModelStatisticsResponse)

    async def RepositoryIndex(self, request, context):
        async with boundary(self.state, "RepositoryIndex", context, admit=False):
            rows = self.models.index(request.ready)
            return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

    async def RepositoryModelLoad(self, request, context):
        async with boundary(self.state, "RepositoryModelLoad", context, admit=False):
            await self.models.load(request.model_name, _plain_parameters(request.parameters))
            return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        async with boundary(self.state, "RepositoryModelUnload", context, admit=False):
            await self.models.unload(request.model_name, _plain_parameters(request.parameters))
            return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        async with boundary(self.state, "ModelInfer", context):
            return await self._infer(request, deadline_of(context))

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest], context) -> AsyncIterator:
        async def one(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                return pb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline_of(context)))
            except PickScoreError as e:  # in-band, as Triton does: the stream goes on
                code, message = status_of(e)
                return pb.ModelStreamInferResponse(
                    error_message=f"{code.name}: {message}",
                    infer_response=pb.ModelInferResponse(id=request.id, model_name=request.model_name),
                )

        async with boundary(self.state, "ModelStreamInfer", context):
            async for response in windowed(requests, one, self.models.settings.stream_window):
                yield response

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        return _response(await self.models.infer(infer_request(request), deadline))


def infer_request(request: pb.ModelInferRequest) -> InferRequest:
    """The api's request: each input read from its raw contents, or else its typed contents, once checked."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        shape = tuple(tensor.shape)
        if raw:
            read = partial(tensors.from_raw, tensor.name, tensor.datatype, shape, raw[i])
        else:
            read = partial(_typed, tensor, shape)
        inputs.append(InputTensor(tensor.name, tensor.datatype, shape, read))
    return InferRequest(
        request.model_name,
        request.model_version,
        request.id,
        inputs,
        [o.name for o in request.outputs],
        _plain_parameters(request.parameters),
    )


def _typed(tensor: pb.ModelInferRequest.InferInputTensor, shape: tuple[int, ...]) -> np.ndarray:
    if tensor.datatype not in TYPED:
        raise InvalidInput(f"input {tensor.name!r}: {tensor.datatype} must come in raw_input_contents")
    values = getattr(tensor.contents, TYPED[tensor.datatype])
    return tensors.from_values(tensor.name, tensor.datatype, shape, values)


def _plain_parameters(parameters) -> dict[str, Any]:
    return {key: _plain(p) for key, p in parameters.items()}


def _plain(parameter: pb.InferParameter) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def _response(response: InferResponse) -> pb.ModelInferResponse:
    out = pb.ModelInferResponse(model_name=response.model, model_version=response.version, id=response.id)
    for tensor in response.outputs:
        out.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.array.shape)
        out.raw_output_contents.append(tensors.to_raw(tensor.datatype, tensor.array))
    return out


def _message(plain: dict[str, Any], cls: type[Message]) -> Message:
    """The protocol's JSON form (api's metadata, configuration, statistics) as its gRPC message."""
    return json_format.ParseDict(plain, cls())
