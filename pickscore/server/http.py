"""The HTTP front door: KServe v2 REST (what ``tritonclient.http`` speaks) and a plain scoring API, on the
same engine, boundary, metrics and errors as the gRPC port.

    GET  /v2/health/live | /v2/health/ready                       {"live": true} | {"ready": bool}: 200, or 503
                                                                   while warming up or draining
    GET  /v2                                                       server metadata
    GET  /v2/models/{name}[/versions/{v}][/ready|/config|/stats]   model metadata, readiness, config, statistics
    POST /v2/models/{name}[/versions/{v}]/infer                    JSON tensors, or Triton's binary extension
    POST /v1/score, /v1/rank                                       scoring.v1's fields as JSON (images base64),
                                                                   multipart/form-data, or msgpack (raw bytes)
    GET  /v1/model                                                 scoring.v1's GetModelInfo
    GET  /openapi.json                                             the OpenAPI document of all of the above

Errors are mapped once, here, from the domain errors to an HTTP status (``status.HTTP_STATUS``), with a body
``{"error": message, "code": status name}`` (Triton's error body, plus the gRPC name). Deadlines: a
``timeout`` header or query parameter in seconds (and KServe's ``timeout`` parameter in microseconds).
Request ids: ``x-request-id``, echoed in the response. Never pickle: JSON, multipart and msgpack only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2 as kpb

from pickscore.errors import InvalidInput
from pickscore.server.boundary import Call, ServerState, new_request_id, scope
from pickscore.server.kserve_v2 import NUMPY, KServeModels
from pickscore.server.openapi import document
from pickscore.server.scoring_v1 import ScoringService
from pickscore.status import http_status_of, status_of
from pickscore.v1 import scoring_pb2 as pb

MSGPACK = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor extension
MAX_BODY = web.AppKey("max_body_bytes", int)


class NotHttp(logging.Filter):
    """aiohttp logs a connection whose bytes are not an HTTP/1.x request (a gRPC client dialling this port, TLS to
    a plaintext port) with the parser's traceback: keep it to one line with the parser's reason, a warning at most
    (aiohttp's own debug level for garbage stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            reason = (error.message.strip().splitlines() or [str(error.code)])[0].rstrip(":")
            hint = "; an HTTP/2 (gRPC) client? gRPC is served on --port" if "PRI" in reason else ""
            record.msg = f"{record.getMessage()}: not an HTTP/1.x request ({reason}){hint}"
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno = min(record.levelno, logging.WARNING)
            record.levelname = logging.getLevelName(record.levelno)
        return True


log = logging.getLogger("pickscore.server.http")  # aiohttp's connection-level messages, in the server's log
log.addFilter(NotHttp())


class HttpFrontDoor:
    """The aiohttp application over the same objects the gRPC services hold."""

    def __init__(self, scoring: ScoringService, models: KServeModels, state: ServerState, max_body_bytes: int):
        self.scoring = scoring
        self.models = models
        self.state = state
        self.app = web.Application(client_max_size=max_body_bytes)
        self.app[MAX_BODY] = max_body_bytes
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        kserve = [
            ("GET", "", self.model_metadata, "ModelMetadata"),
            ("GET", "/ready", self.model_ready, "ModelReady"),
            ("GET", "/config", self.model_config, "ModelConfig"),
            ("GET", "/stats", self.model_stats, "ModelStatistics"),
            ("POST", "/infer", self.infer, "ModelInfer"),
        ]
        routes = [
            web.get("/v2/health/live", self.live),
            web.get("/v2/health/ready", self.ready),
            web.get("/v2", self._endpoint("ServerMetadata", self.server_metadata, admit=False)),
            web.get("/v2/models/stats", self._endpoint("ModelStatistics", self.model_stats, admit=False)),
            web.post("/v1/score", self._endpoint("Score", self.score)),
            web.post("/v1/rank", self._endpoint("Rank", self.rank)),
            web.get("/v1/model", self._endpoint("GetModelInfo", self.model_info, admit=False)),
            web.get("/openapi.json", self.openapi),
        ]
        for method, suffix, handler, rpc in kserve:
            wrapped = self._endpoint(rpc, handler, admit=rpc == "ModelInfer")
            for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
                routes.append(web.route(method, base + suffix, wrapped))
        self.app.add_routes(routes)

    async def start(self, sock: socket.socket, ssl_context: ssl.SSLContext | None) -> int:
        """Serve on a listening socket (bound before the model loaded, ``ports.listen``); the port it serves."""
        # handler_cancellation: a caller that disconnects cancels its request, so its items leave the queues
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True, logger=log)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock, ssl_context=ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.shutdown()
            await self._runner.cleanup()

    # The boundary and the error mapping ------------------------------------------------------------------

    def _endpoint(
        self, rpc: str, handler: Callable[[web.Request], Awaitable[web.Response]], admit: bool = True
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def run(request: web.Request) -> web.Response:
            headers = request.headers
            call = Call(
                "http",
                rpc,
                new_request_id(headers.get("x-request-id")),
                (headers.get("x-client-id") or request.remote or "unknown")[:128],
                headers.get("authorization"),
            )
            try:
                async with scope(self.state, call, admit):
                    response = await handler(request)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                response = _error(e, _wants_msgpack(request))
            response.headers["x-request-id"] = call.request_id
            return response

        return run

    # KServe v2 --------------------------------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})  # the protocol's body; Triton's clients read only the status

    async def ready(self, request: web.Request) -> web.Response:
        return _readiness({"ready": self.models.ready()})

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(to_json(self.models.server_metadata()))

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        return web.json_response(to_json(self.models.metadata(name, version)))

    async def model_ready(self, request: web.Request) -> web.Response:
        config = self.models.config(*_model(request))  # 404 for an unknown model
        return _readiness({"name": config.name, "ready": self.models.ready()})

    async def model_config(self, request: web.Request) -> web.Response:
        return web.json_response(to_json(self.models.config(*_model(request))))

    async def model_stats(self, request: web.Request) -> web.Response:
        name, version = _model(request) if "name" in request.match_info else ("", "")
        return web.json_response(to_json(self.models.statistics(name, version)))

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        body = await _body(request)
        message, binary = infer_request(body, request.headers.get(HEADER_LENGTH), name, version)
        response = await self.models.infer(message, _deadline(request))
        payload, length = infer_response(response, binary)
        headers = {HEADER_LENGTH: str(length)} if length is not None else {}
        kind = "application/octet-stream" if length is not None else "application/json"
        return web.Response(body=payload, headers=headers, content_type=kind)

    # scoring.v1 over HTTP ---------------------------------------------------------------------------------

    async def score(self, request: web.Request) -> web.Response:
        message = await _scoring_request(request, pb.ScoreRequest)
        return _reply(request, await self.scoring.score(message, _deadline(request)))

    async def rank(self, request: web.Request) -> web.Response:
        message = await _scoring_request(request, pb.RankRequest)
        return _reply(request, await self.scoring.rank(message, _deadline(request)))

    async def model_info(self, request: web.Request) -> web.Response:
        return _reply(request, self.scoring.model_info())

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(document(self.scoring.model_info()))


# Helpers: request parsing and response encoding -----------------------------------------------------------


def _error(error: BaseException, as_msgpack: bool) -> web.Response:
    code, message = status_of(error)
    status = http_status_of(error)
    headers = {}
    if (retry := getattr(error, "retry_after_s", None)) is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry)))  # whole seconds, as HTTP has it
        headers["retry-after-ms"] = str(max(1, round(retry * 1000)))
    elif status in (429, 503):
        headers["Retry-After"] = "1"
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    body = {"error": message, "code": code.name}
    if as_msgpack:
        return web.Response(status=status, body=msgpack.packb(body), content_type=MSGPACK[0], headers=headers)
    return web.json_response(body, status=status, headers=headers)


def _readiness(body: dict[str, Any]) -> web.Response:
    """KServe v2's readiness body, and the status that probes and tritonclient read: 200 when ready, else 503."""
    return web.json_response(body, status=200 if body["ready"] else 503)


def _wants_msgpack(request: web.Request) -> bool:
    return request.content_type in MSGPACK or any(kind in request.headers.get("accept", "") for kind in MSGPACK)


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["name"], request.match_info.get("version", "")


async def _body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise _too_large(request) from e


def _too_large(request: web.Request) -> InvalidInput:
    return InvalidInput(f"request body over {request.app[MAX_BODY]} bytes (--max-message-bytes)")


def _deadline(request: web.Request) -> float | None:
    """The ``timeout`` header or query parameter (seconds) as event-loop time, or None."""
    text = request.headers.get("timeout") or request.query.get("timeout")
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise InvalidInput(f"timeout {text!r}: not a number of seconds") from None
    if not seconds > 0 or math.isinf(seconds):
        raise InvalidInput(f"timeout {text!r}: must be a positive number of seconds")
    return asyncio.get_running_loop().time() + seconds


async def _scoring_request(request: web.Request, cls: type[Message]) -> Message:
    """A ScoreRequest or RankRequest from JSON (the proto3 JSON mapping: bytes as base64), msgpack (the same
    fields, bytes raw) or multipart/form-data (fields prompt, prompts, top_k; every file part an image)."""
    if request.content_type == "multipart/form-data":
        return await _multipart(request, cls)
    body = await _body(request)
    if request.content_type in MSGPACK:
        try:
            obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several kinds for malformed input
            raise InvalidInput(f"request body: not msgpack ({type(e).__name__}: {e})") from None
        return from_plain(obj, cls)
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"request body: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"request body: a JSON object expected, got {type(obj).__name__}")
    try:
        return json_format.ParseDict(obj, cls())
    except json_format.ParseError as e:
        raise InvalidInput(f"request body: {e}") from None


async def _multipart(request: web.Request, cls: type[Message]) -> Message:
    try:
        form = await request.post()
    except web.HTTPRequestEntityTooLarge as e:
        raise _too_large(request) from e
    except ValueError as e:
        raise InvalidInput(f"request body: not multipart/form-data ({e})") from None
    message = cls()
    for key, value in form.items():
        if isinstance(value, web.FileField):
            message.images.add(data=value.file.read(), id=value.filename or "")
        elif key == "prompt":
            message.prompt = value
        elif key == "prompts" and hasattr(message, "prompts"):
            message.prompts.append(value)
        elif key == "top_k" and hasattr(message, "top_k"):
            try:
                message.top_k = int(value)
            except ValueError:
                raise InvalidInput(f"field 'top_k': {value!r} is not an integer") from None
        else:
            raise InvalidInput(f"field {key!r}: not a field of {cls.DESCRIPTOR.name} (or a file part not an image)")
    return message


def _reply(request: web.Request, message: Message) -> web.Response:
    body = to_json(message)
    if _wants_msgpack(request):
        return web.Response(body=msgpack.packb(body), content_type=MSGPACK[0])
    return web.json_response(body)


INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def to_json(message: Message) -> dict[str, Any]:
    """A message as JSON the way Triton's HTTP API writes it: field names as declared, every field present,
    64-bit integers as numbers (protobuf's JSON mapping writes them as strings)."""
    d = json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _numbers(message.DESCRIPTOR, d)


def _numbers(desc: Descriptor, d: dict[str, Any]) -> dict[str, Any]:
    """64-bit integers as numbers, and the fields in their declared order (as a reader expects them)."""
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
                elif vfd.type in INT64:
                    d[key] = {k: int(v) for k, v in value.items()}
            elif isinstance(value, list):
                d[key] = [_numbers(fd.message_type, v) for v in value]
            else:
                d[key] = _numbers(fd.message_type, value)
        elif fd.type in INT64:
            d[key] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return d


def from_plain(obj: Any, cls: type[Message]) -> Message:
    """A message from msgpack's plain values: the proto field names, bytes fields as raw bytes."""
    message = cls()
    _fill(message, obj)
    return message


def _fill(message: Message, obj: Any) -> None:
    desc = message.DESCRIPTOR
    if not isinstance(obj, dict):
        raise InvalidInput(f"{desc.name}: a map expected, got {type(obj).__name__}")
    for key, value in obj.items():
        fd = desc.fields_by_name.get(key) if isinstance(key, str) else None
        if fd is None:
            raise InvalidInput(f"field {key!r}: {desc.name} has no such field")
        repeated = fd.is_repeated
        if repeated and not isinstance(value, list):
            raise InvalidInput(f"field {key!r}: a list expected, got {type(value).__name__}")
        try:
            if fd.message_type is not None:
                if repeated:
                    for v in value:
                        _fill(getattr(message, key).add(), v)
                else:
                    _fill(getattr(message, key), value)
            elif repeated:
                getattr(message, key).extend(value)
            else:
                setattr(message, key, value)
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"field {key!r}: {e}") from None


# KServe v2 REST inference: JSON tensors and the binary extension ------------------------------------------


def infer_request(
    body: bytes, header_length: str | None, model: str, version: str
) -> tuple[kpb.ModelInferRequest, dict[str, bool]]:
    """The protobuf request the gRPC service would get, and which outputs to return as binary."""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH}: {header_length!r} is not a byte count") from None
        if not 0 <= length <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} {length}: outside the {len(body)}-byte body")
    else:
        length = len(body)
    try:
        header = json.loads(body[:length])
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"inference header: not JSON ({e})") from None
    if not isinstance(header, dict):
        raise InvalidInput("inference header: a JSON object expected")
    message = kpb.ModelInferRequest(model_name=model, model_version=version, id=str(header.get("id", "")))
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("parameters: a JSON object expected")
    for key, value in parameters.items():
        if key in ("binary_data_output",):
            continue
        _parameter(message.parameters[key], key, value)
    at = length
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidInput("inputs: a JSON list expected")
    for i, spec in enumerate(inputs):
        if not isinstance(spec, dict):
            raise InvalidInput(f"input {i}: a JSON object expected")
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInput(f"input {i}: name and datatype must be strings")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidInput(f"input {name!r}: shape must be a list of integers")
        message.inputs.add(name=name, datatype=datatype, shape=shape)
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or at + size > len(body):
                raise InvalidInput(f"input {name!r}: binary_data_size {size!r} runs past the body's end")
            message.raw_input_contents.append(body[at : at + size])
            at += size
        else:
            message.raw_input_contents.append(_raw(name, datatype, spec.get("data")))
    if at != len(body):
        raise InvalidInput(f"{len(body) - at} bytes after the last binary input")
    outputs = header.get("outputs") or []
    default = bool(parameters.get("binary_data_output", False))
    binary = {}
    for spec in outputs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidInput("outputs: each a JSON object with a name")
        message.outputs.add(name=spec["name"])
        binary[spec["name"]] = bool((spec.get("parameters") or {}).get("binary_data", default))
    binary["*"] = default
    return message, binary


def _parameter(target: kpb.InferParameter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidInput(f"parameter {key!r}: {value} is out of range")
        target.int64_param = value
    elif isinstance(value, str):
        target.string_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        raise InvalidInput(f"parameter {key!r}: a number, boolean or string expected")


def _raw(name: str, datatype: str, data: Any) -> bytes:
    """JSON ``data`` (flat or nested, row-major) as the raw bytes the gRPC protocol carries."""
    if data is None:
        raise InvalidInput(f"input {name!r}: neither data nor binary_data_size")
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).reshape(-1) if isinstance(data, list) else None
        if flat is None or not all(isinstance(x, str) for x in flat):
            raise InvalidInput(f"input {name!r}: BYTES data must be a list of strings")
        out = bytearray()
        for element in flat:
            encoded = element.encode("utf-8")
            out += struct.pack("<I", len(encoded)) + encoded
        return bytes(out)
    if datatype not in NUMPY:
        raise InvalidInput(f"input {name!r}: datatype {datatype} is not one this server takes")
    try:
        array = np.asarray(data, dtype=NUMPY[datatype])
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidInput(f"input {name!r}: data is not a regular array of {datatype} ({e})") from None
    return array.astype(np.dtype(NUMPY[datatype]).newbyteorder("<")).tobytes()


def infer_response(response: kpb.ModelInferResponse, binary: dict[str, bool]) -> tuple[bytes, int | None]:
    """The JSON header (and binary outputs after it); the header's length when anything is binary."""
    outputs, blobs = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary.get(tensor.name, binary.get("*", False)):
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = np.frombuffer(raw, "<f4").tolist()
        outputs.append(entry)
    header = json.dumps(
        {
            "model_name": response.model_name,
            "model_version": response.model_version,
            "id": response.id,
            "outputs": outputs,
        }
    ).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
