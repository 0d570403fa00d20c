"""The OpenAPI 3.1 document of the HTTP front door (served at ``/openapi.json``).

The scoring schemas are scoring.v1's messages in protobuf's JSON mapping (bytes as base64), read from the
messages' descriptors; msgpack bodies carry the same fields with bytes raw. ``tests/server/test_http.py``
checks that every route the server has is documented here and every documented path is served.
"""

from __future__ import annotations

from typing import Any

from pickscore.server.api import ModelInfo
from pickscore.v1 import scoring_pb2 as pb
from pickscore.version import __version__

_ERROR = {
    "description": "error: the message names the item and the reason",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_ERRORS = {
    "400": {**_ERROR, "description": "invalid input (INVALID_ARGUMENT): the message names the item"},
    "401": {**_ERROR, "description": "missing or wrong bearer token (UNAUTHENTICATED)"},
    "404": {**_ERROR, "description": "unknown model or version (NOT_FOUND)"},
    "429": {
        **_ERROR,
        "description": "overloaded (RESOURCE_EXHAUSTED): retry after the Retry-After header's seconds",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}, "retry-after-ms": {"schema": {"type": "integer"}}},
    },
    "500": {**_ERROR, "description": "the model failed on the batch (INTERNAL)"},
    "503": {**_ERROR, "description": "warming up, draining or out of service (UNAVAILABLE): retry elsewhere"},
    "504": {**_ERROR, "description": "the deadline passed before compute (DEADLINE_EXCEEDED)"},
}
_COMMON = [
    {"name": "timeout", "in": "header", "required": False, "schema": {"type": "number"}, "description": "deadline, s"},
    {"name": "x-request-id", "in": "header", "required": False, "schema": {"type": "string"}},
    {"name": "x-client-id", "in": "header", "required": False, "schema": {"type": "string"}},
]
_MODEL = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}


def _json(ref: str) -> dict[str, Any]:
    return {"schema": {"$ref": f"#/components/schemas/{ref}"}}


def _scoring(summary: str, request: str, response: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "parameters": _COMMON,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": _json(request),
                    "application/msgpack": _json(request),
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "prompt": {"type": "string"},
                                "prompts": {"type": "array", "items": {"type": "string"}},
                                "top_k": {"type": "integer"},
                                "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                            },
                        }
                    },
                },
            },
            "responses": {
                "200": {
                    "description": "in the request's encoding (JSON for JSON and multipart)",
                    "content": {"application/json": _json(response), "application/msgpack": _json(response)},
                },
                **_ERRORS,
            },
        }
    }


def _get(summary: str, schema: dict[str, Any] | None, parameters: list | None = None) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": summary}
    if schema is not None:
        ok["content"] = {"application/json": {"schema": schema}}
    return {"get": {"summary": summary, "parameters": parameters or [], "responses": {"200": ok, **_ERRORS}}}


def _health_body(key: str, name: bool = False) -> dict[str, Any]:
    """KServe v2's health bodies: {"live": bool}, {"ready": bool}, a model's {"name": string, "ready": bool}."""
    properties = {"name": {"type": "string"}} if name else {}
    properties[key] = {"type": "boolean"}
    return {"type": "object", "properties": properties, "required": list(properties)}


def _kserve(suffix: str, operation: dict[str, Any]) -> dict[str, Any]:
    paths = {}
    for base, params in (("/v2/models/{name}", [_MODEL]), ("/v2/models/{name}/versions/{version}", [_MODEL, _VERSION])):
        method, spec = next(iter(operation.items()))
        paths[base + suffix] = {method: {**spec, "parameters": params + spec.get("parameters", [])}}
    return paths


def _message_schema(descriptor) -> dict[str, Any]:
    types = {
        descriptor.fields[0].TYPE_STRING: {"type": "string"},
        descriptor.fields[0].TYPE_BYTES: {"type": "string", "format": "byte"},
        descriptor.fields[0].TYPE_FLOAT: {"type": "number"},
        descriptor.fields[0].TYPE_DOUBLE: {"type": "number"},
        descriptor.fields[0].TYPE_BOOL: {"type": "boolean"},
    }
    properties = {}
    for field in descriptor.fields:
        if field.message_type is not None:
            item: dict[str, Any] = {"$ref": f"#/components/schemas/{field.message_type.name}"}
        else:
            item = types.get(field.type, {"type": "integer"})
        properties[field.name] = {"type": "array", "items": item} if field.is_repeated else item
    return {"type": "object", "properties": properties}


def _schemas() -> dict[str, Any]:
    messages = (pb.ScoreRequest, pb.RankRequest, pb.Image, pb.Pixels, pb.ScoreResponse, pb.ScoredImage)
    messages += (pb.RankResponse, pb.RankedImage, pb.GetModelInfoResponse)
    schemas = {m.DESCRIPTOR.name: _message_schema(m.DESCRIPTOR) for m in messages}
    schemas["Error"] = {
        "type": "object",
        "properties": {"error": {"type": "string"}, "code": {"type": "string"}},
        "required": ["error"],
    }
    return schemas


_INFER = {
    "post": {
        "summary": "KServe v2 inference: JSON tensors, or Triton's binary tensor extension "
        "(Inference-Header-Content-Length)",
        "parameters": _COMMON,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}, "application/octet-stream": {}},
        },
        "responses": {"200": {"description": "output tensors"}, **_ERRORS},
    }
}


def _paths() -> dict[str, Any]:
    obj = {"type": "object"}
    return {
        "/v1/score": _scoring(
            "PickScore of each image for one prompt, or of prompt-image pairs", "ScoreRequest", "ScoreResponse"
        ),
        "/v1/rank": _scoring("Images best first, with softmax probabilities", "RankRequest", "RankResponse"),
        "/v1/model": _get(
            "The served model and the server's limits", {"$ref": "#/components/schemas/GetModelInfoResponse"}
        ),
        "/openapi.json": _get("This document", obj),
        "/v2/health/live": _get("200 while the process answers", _health_body("live")),
        "/v2/health/ready": _get(
            "200 while requests are taken; 503 while warming up or draining", _health_body("ready")
        ),
        "/v2": _get("KServe v2 server metadata", obj),
        "/v2/models/stats": _get("KServe v2 statistics of every model", obj),
        **_kserve("", _get("KServe v2 model metadata", obj)),
        **_kserve("/ready", _get("200 when the model is ready, 503 otherwise", _health_body("ready", name=True))),
        **_kserve("/config", _get("Triton model configuration", obj)),
        **_kserve("/stats", _get("KServe v2 model statistics", obj)),
        **_kserve("/infer", _INFER),
    }


def document(info: ModelInfo) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "PickScore",
            "version": __version__,
            "description": f"Human-preference scores for text-to-image generations. Model {info.source} "
            f"({info.backend}, {info.device}); at most {info.max_images_per_request} images a request.",
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
        "paths": _paths(),
    }
