"""The HTTP front door: KServe v2 REST (what ``tritonclient.http`` speaks) and a plain scoring API, on the
same engine, boundary, metrics and errors as the gRPC port.

    GET  /v2/health/live | /v2/health/ready                       {"live": true} | {"ready": bool}: 200, or 503
                                                                   while warming up or draining
    GET  /v2                                                       server metadata
    GET  /v2/models/{name}[/versions/{v}][/ready|/config|/stats]   model metadata, readiness, config, statistics
    POST /v2/models/{name}[/versions/{v}]/infer                    JSON tensors, or Triton's binary extension
    POST /v2/repository/index                                      every model known: name, version, state, reason
    POST /v2/repository/models/{name}/load | /unload               explicit model control (--model-control-mode)
    POST /v1/score, /v1/rank, /v1/rewards                          scoring.v1's fields as JSON (images base64),
                                                                   multipart/form-data, or msgpack (raw bytes)
    POST /v1/models/{name}/score, /v1/models/{name}/rank           the same, scored by the model in the path
    GET  /v1/model[?model=NAME], /v1/models/{name}                 scoring.v1's GetModelInfo (default: the default)
    GET  /v1/models                                                scoring.v1's ListModels: every model in service
    GET  /openapi.json                                             the OpenAPI document of all of the above

Errors are mapped once, here, from the domain errors to an HTTP status (``status.HTTP_STATUS``), with a body
``{"error": message, "code": status name}`` (Triton's error body, plus the gRPC name). Deadlines: a
``timeout`` header or query parameter in seconds (and KServe's ``timeout`` parameter in microseconds).
Request ids: ``x-request-id``, echoed in the response. Never pickle: JSON, multipart and msgpack only.
The model of a /v1 request: the path's ``{name}``, or the body's ``model`` field (both: they must agree), else the
server's default model.
Requests are decoded straight to the api's plain values (``server/api.py``; KServe's tensors in
``http_kserve.py``) and answers encoded straight from them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import msgpack
import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from pickscore.errors import InvalidInput, TooLarge
from pickscore.server.api import RawPixels, Scoring, image_item
from pickscore.server.api_kserve import KServeModels
from pickscore.server.boundary import Call, ServerState, new_request_id, scope
from pickscore.server.engine import ImageItem
from pickscore.server.http_kserve import HEADER_LENGTH, infer_request, infer_response
from pickscore.server.openapi import document
from pickscore.status import http_status_of, retry_after_ms, status_of

MSGPACK = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
MAX_BODY = web.AppKey("max_body_bytes", int)
# scoring.v1's requests as /v1 reads them: each field a str, an int (uint32), bytes, a message, or a list of one
PIXELS = ("Pixels", {"height": int, "width": int, "channels": int, "data": bytes})
IMAGE = ("Image", {"data": bytes, "id": str, "pixels": PIXELS})
SCORE = ("ScoreRequest", {"prompt": str, "images": [IMAGE], "prompts": [str], "model": str})
RANK = ("RankRequest", {"prompt": str, "images": [IMAGE], "top_k": int, "model": str})
WEIGHT = ("ModelWeight", {"model": str, "weight": float})
REWARDS = ("RewardsRequest", {"prompt": str, "images": [IMAGE], "prompts": [str], "models": [WEIGHT], "normalize": str})
JSON_NAMES = {"topK": "top_k"}  # protobuf's JSON mapping, which /v1 speaks, takes lowerCamelCase names too


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
    """The aiohttp application over the same api objects the gRPC services hold."""

    def __init__(self, scoring: Scoring, models: KServeModels, state: ServerState, max_body_bytes: int):
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
            web.post("/v2/repository/index", self._endpoint("RepositoryIndex", self.repository_index, admit=False)),
            web.post(
                "/v2/repository/models/{name}/load", self._endpoint("RepositoryModelLoad", self.load, admit=False)
            ),
            web.post(
                "/v2/repository/models/{name}/unload",
                self._endpoint("RepositoryModelUnload", self.unload, admit=False),
            ),
            web.post("/v1/score", self._endpoint("Score", self.score)),
            web.post("/v1/rank", self._endpoint("Rank", self.rank)),
            web.post("/v1/rewards", self._endpoint("Rewards", self.rewards)),
            web.post("/v1/models/{model}/score", self._endpoint("Score", self.score)),
            web.post("/v1/models/{model}/rank", self._endpoint("Rank", self.rank)),
            web.get("/v1/model", self._endpoint("GetModelInfo", self.model_info, admit=False)),
            web.get("/v1/models", self._endpoint("ListModels", self.list_models, admit=False)),
            web.get("/v1/models/{model}", self._endpoint("GetModelInfo", self.model_info, admit=False)),
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
        return web.json_response(self.models.server_metadata())

    async def model_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self.models.metadata(*_model(request)))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        return _readiness({"name": name, "ready": self.models.model_ready(name, version)})  # 404 when unknown

    async def model_config(self, request: web.Request) -> web.Response:
        return web.json_response(self.models.config(*_model(request)))

    async def model_stats(self, request: web.Request) -> web.Response:
        name, version = _model(request) if "name" in request.match_info else ("", "")
        return web.json_response(self.models.statistics(name, version))

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        body = await _body(request)
        message, binary = infer_request(body, request.headers.get(HEADER_LENGTH), name, version)
        response = await self.models.infer(message, _deadline(request))
        payload, length = infer_response(response, binary)
        headers = {HEADER_LENGTH: str(length)} if length is not None else {}
        kind = "application/octet-stream" if length is not None else "application/json"
        return web.Response(body=payload, headers=headers, content_type=kind)

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await _body(request)
        try:
            ready = bool(json.loads(body).get("ready", False)) if body.strip() else False
        except (ValueError, AttributeError):
            raise InvalidInput('request body: {"ready": true|false} or nothing expected') from None
        return web.json_response(self.models.index(ready))

    async def load(self, request: web.Request) -> web.Response:
        await self.models.load(request.match_info["name"], await _parameters(request))
        return web.json_response({})

    async def unload(self, request: web.Request) -> web.Response:
        await self.models.unload(request.match_info["name"], await _parameters(request))
        return web.json_response({})

    # scoring.v1 over HTTP ---------------------------------------------------------------------------------

    async def score(self, request: web.Request) -> web.Response:
        fields = await _scoring_request(request, SCORE)
        prompt, prompts = fields.get("prompt", ""), fields.get("prompts", [])
        model = _model_of(request, fields)
        results = await self.scoring.score(prompt, prompts, _images(fields), _deadline(request), model)
        return _reply(request, {"results": [_record(r) for r in results]})

    async def rank(self, request: web.Request) -> web.Response:
        fields = await _scoring_request(request, RANK)
        top_k, prompt, model = fields.get("top_k", 0), fields.get("prompt", ""), _model_of(request, fields)
        ranking = await self.scoring.rank(prompt, _images(fields), top_k, _deadline(request), model)
        return _reply(request, {"ranking": [_record(r) for r in ranking]})

    async def rewards(self, request: web.Request) -> web.Response:
        fields = await _scoring_request(request, REWARDS)
        normalize = fields.get("normalize", "none").lower().removeprefix("normalize_")  # protobuf's enum names too
        weights = [(m.get("model", ""), m.get("weight", 0.0)) for m in fields.get("models", [])]
        prompt, prompts = fields.get("prompt", ""), fields.get("prompts", [])
        rewards = await self.scoring.rewards(prompt, prompts, _images(fields), weights, normalize, _deadline(request))
        body = {"rewards": _floats(rewards.rewards), "models": [_record(m) for m in rewards.models]}
        return _reply(request, body)

    async def model_info(self, request: web.Request) -> web.Response:
        model = request.match_info.get("model") or request.query.get("model", "")
        return _reply(request, _record(self.scoring.model_info(model)))

    async def list_models(self, request: web.Request) -> web.Response:
        return _reply(request, {"models": [_record(m) for m in self.scoring.models()]})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(document(self.scoring.models(), self.scoring.settings.max_images_per_request))


# Helpers: request parsing and response encoding -----------------------------------------------------------


def _error(error: BaseException, as_msgpack: bool) -> web.Response:
    code, message = status_of(error)
    status = http_status_of(error)
    headers = {}
    if (retry := getattr(error, "retry_after_s", None)) is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry)))  # whole seconds, as HTTP has it
        headers["retry-after-ms"] = str(retry_after_ms(error))
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


def _too_large(request: web.Request) -> TooLarge:
    return TooLarge(f"request body over {request.app[MAX_BODY]} bytes (--max-message-bytes)")


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


async def _scoring_request(request: web.Request, message: tuple) -> dict[str, Any]:
    """A ScoreRequest's or RankRequest's fields from JSON (protobuf's JSON mapping: bytes as base64), msgpack
    (the same fields, bytes raw) or multipart/form-data (its text fields: prompt, prompts, top_k, model,
    normalize, those of the message; every file part an image)."""
    if request.content_type == "multipart/form-data":
        return await _multipart(request, message)
    body = await _body(request)
    if request.content_type in MSGPACK:
        try:
            obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several kinds for malformed input
            raise InvalidInput(f"request body: not msgpack ({type(e).__name__}: {e})") from None
        return _fields(obj, message, binary=True)
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"request body: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"request body: a JSON object expected, got {type(obj).__name__}")
    return _fields(obj, message, binary=False)


async def _multipart(request: web.Request, message: tuple) -> dict[str, Any]:
    try:
        form = await request.post()
    except web.HTTPRequestEntityTooLarge as e:
        raise _too_large(request) from e
    except ValueError as e:
        raise InvalidInput(f"request body: not multipart/form-data ({e})") from None
    name, known = message
    fields: dict[str, Any] = {"images": []}
    for key, value in form.items():
        if isinstance(value, web.FileField):
            fields["images"].append({"data": value.file.read(), "id": value.filename or ""})
        elif known.get(key) is str:  # prompt; model, normalize where the message has them
            fields[key] = value
        elif key == "prompts" and "prompts" in known:
            fields.setdefault("prompts", []).append(value)
        elif key == "top_k" and "top_k" in known:
            try:
                fields["top_k"] = int(value)
            except ValueError:
                raise InvalidInput(f"field 'top_k': {value!r} is not an integer") from None
        else:
            raise InvalidInput(f"field {key!r}: not a field of {name} (or a file part not an image)")
    return fields


def _fields(obj: Any, message: tuple, binary: bool) -> dict[str, Any]:
    """The fields given (null ones are absent), each checked against its kind; bytes raw when ``binary``, else
    base64 text."""
    name, known = message
    if not isinstance(obj, dict):
        raise InvalidInput(f"{name}: a map expected, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        field = key if binary else JSON_NAMES.get(key, key)
        kind = known.get(field) if isinstance(field, str) else None
        if kind is None:
            raise InvalidInput(f"field {key!r}: {name} has no such field")
        if value is None:
            continue
        if isinstance(kind, list):
            if not isinstance(value, list):
                raise InvalidInput(f"field {key!r}: a list expected, got {type(value).__name__}")
            out[field] = [_value(key, kind[0], v, binary) for v in value]
        else:
            out[field] = _value(key, kind, value, binary)
    return out


def _value(key: str, kind: Any, value: Any, binary: bool) -> Any:
    if isinstance(kind, tuple):
        return _fields(value, kind, binary)
    try:
        if kind is str and isinstance(value, str):
            return value
        if kind is bytes and isinstance(value, bytes if binary else str):
            return value if binary else base64.urlsafe_b64decode(value + "=" * (4 - len(value) % 4))
        if kind is float and not isinstance(value, bool) and isinstance(value, int | float | str):
            if math.isfinite(number := float(value)):
                return number
        if kind is int and not isinstance(value, bool) and isinstance(value, int if binary else int | float | str):
            number = float(value) if isinstance(value, float | str) else value  # JSON: 2, 2.0 and "2" alike
            if float(number).is_integer() and 0 <= number < 2**32:
                return int(number)
    except ValueError as e:  # base64 or a number's text
        raise InvalidInput(f"field {key!r}: {e}") from None
    expected = {
        str: "a string",
        bytes: "bytes" if binary else "base64 text",
        int: "an unsigned 32-bit integer",
        float: "a finite number",
    }
    raise InvalidInput(f"field {key!r}: {expected[kind]} expected, got {value!r:.40}")


def _model_of(request: web.Request, fields: dict[str, Any]) -> str:
    """The path's model, or the body's ``model`` field: InvalidInput when they disagree."""
    path, body = request.match_info.get("model", ""), fields.get("model", "")
    if path and body and path != body:
        raise InvalidInput(f"field 'model': {body!r}, but the path names model {path!r}; give one")
    return path or body


async def _parameters(request: web.Request) -> dict[str, Any]:
    """A load's or unload's parameters from its body: nothing, or ``{"parameters": {...}}``."""
    body = await _body(request)
    try:
        parameters = json.loads(body).get("parameters") if body.strip() else None
    except (ValueError, AttributeError):
        raise InvalidInput('request body: {"parameters": {}} or nothing expected') from None
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidInput(f"parameters: a JSON object expected, got {type(parameters).__name__}")
    return parameters or {}


def _images(fields: dict[str, Any]) -> list[ImageItem]:
    return [
        image_item(
            i, image.get("data", b""), image.get("id", ""), _pixels(image["pixels"]) if "pixels" in image else None
        )
        for i, image in enumerate(fields.get("images", []))
    ]


def _pixels(p: dict[str, Any]) -> RawPixels:
    return RawPixels(p.get("height", 0), p.get("width", 0), p.get("channels", 0), p.get("data", b""))


def _record(record: Any) -> dict[str, Any]:
    """An api result as scoring.v1's JSON: its fields in order, floats as protobuf writes a float32 (the
    shortest text that reads back as the same float32); the running statistics' doubles as they are."""
    out = {}
    for k, v in asdict(record).items():
        if isinstance(v, float) and k not in ("score_mean", "score_std"):
            v = float(str(np.float32(v)))
        elif isinstance(v, list) and v and isinstance(v[0], float):
            v = _floats(v)
        out[k] = v
    return out


def _floats(values: list[float]) -> list[float]:
    return [float(str(np.float32(v))) for v in values]


def _reply(request: web.Request, body: dict[str, Any]) -> web.Response:
    if _wants_msgpack(request):
        return web.Response(body=msgpack.packb(body), content_type=MSGPACK[0])
    return web.json_response(body)
