"""The OpenAPI 3.1 document of the HTTP front door (served at ``/openapi.json``).

The scoring schemas are scoring.v1's messages in protobuf's JSON mapping (bytes as base64; an enum as its name,
or the name's lower-case tail: ``"running"``), read from the messages' descriptors; msgpack bodies carry the same
fields with bytes raw. A /v1 request's model: the path's ``{model}``, the body's ``model`` field, or ``?model=`` of
GET /v1/model; none: the server's default. ``tests/server/test_http.py`` checks that every route the server has is
documented here and every documented path is served.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

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
    "404": {**_ERROR, "description": "unknown model or version (NOT_FOUND): the message lists the models served"},
    "429": {
        **_ERROR,
        "description": "overloaded (RESOURCE_EXHAUSTED): retry after the Retry-After header's seconds",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}, "retry-after-ms": {"schema": {"type": "integer"}}},
    },
    "500": {**_ERROR, "description": "the model failed on the batch (INTERNAL)"},
    "503": {**_ERROR, "description": "warming up, draining or out of service (UNAVAILABLE): retry elsewhere"},
    "504": {**_ERROR, "description": "the deadline passed before compute (DEADLINE_EXCEEDED)"},
}
_IDENTITY = {
    "type": "string",
    "description": "what the model version is, NAME:KIND:PRECISION:DIGEST (the first 16 hex digits of the SHA-256 of "
    "its weights as loaded): equal on every replica serving the same weights at the same precision",
}
_COMMON = [
    {"name": "timeout", "in": "header", "required": False, "schema": {"type": "number"}, "description": "deadline, s"},
    {"name": "x-request-id", "in": "header", "required": False, "schema": {"type": "string"}},
    {"name": "x-client-id", "in": "header", "required": False, "schema": {"type": "string"}},
]
_MODEL = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
_SERVED = {
    "name": "model",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "a served model (GET /v1/models); a body's model field, if any, must name the same",
}
_CHOSEN = {
    "name": "model",
    "in": "query",
    "required": False,
    "schema": {"type": "string"},
    "description": "a served model; absent or empty: the server's default model",
}
_FORBIDDEN = {
    "403": {
        **_ERROR,
        "description": "model control is not explicit (PERMISSION_DENIED): start the server with "
        "--model-control-mode explicit",
    }
}
# the fields a multipart/form-data body may carry, beside its file parts (each an image)
_FORM = {
    "prompt": {"type": "string"},
    "prompts": {"type": "array", "items": {"type": "string"}},
    "top_k": {"type": "integer"},
    "model": {"type": "string"},
    "normalize": {"type": "string"},
}


def _json(ref: str) -> dict[str, Any]:
    return {"schema": {"$ref": f"#/components/schemas/{ref}"}}


def _scoring(summary: str, request: str, response: str, parameters: list | None = None) -> dict[str, Any]:
    known = {f.name for f in getattr(pb, request).DESCRIPTOR.fields}
    form = {k: v for k, v in _FORM.items() if k in known}
    form["images"] = {"type": "array", "items": {"type": "string", "format": "binary"}}
    return {
        "post": {
            "summary": summary,
            "parameters": (parameters or []) + _COMMON,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": _json(request),
                    "application/msgpack": _json(request),
                    "multipart/form-data": {"schema": {"type": "object", "properties": form}},
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
        FieldDescriptor.TYPE_STRING: {"type": "string"},
        FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
        FieldDescriptor.TYPE_FLOAT: {"type": "number"},
        FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
        FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    }
    properties = {}
    for field in descriptor.fields:
        if field.message_type is not None:
            item: dict[str, Any] = {"$ref": f"#/components/schemas/{field.message_type.name}"}
        elif field.enum_type is not None:
            item = _enum_schema(field.enum_type)
        else:
            item = types.get(field.type, {"type": "integer"})
        properties[field.name] = {"type": "array", "items": item} if field.is_repeated else item
    return {"type": "object", "properties": properties}


def _enum_schema(enum) -> dict[str, Any]:
    """An enum as the HTTP API takes it: a value's name (NORMALIZE_RUNNING) or its lower-case tail (running)."""
    prefix = enum.name.upper() + "_"
    names = [v.name for v in enum.values]
    short = [n.removeprefix(prefix).lower() for n in names]
    return {"type": "string", "enum": short + names, "default": short[0]}


def _schemas() -> dict[str, Any]:
    messages = (pb.ScoreRequest, pb.RankRequest, pb.Image, pb.Pixels, pb.ScoreResponse, pb.ScoredImage)
    messages += (pb.RankResponse, pb.RankedImage, pb.GetModelInfoResponse, pb.ListModelsResponse)
    messages += (pb.RewardsRequest, pb.ModelWeight, pb.RewardsResponse, pb.ModelScores)
    schemas = {m.DESCRIPTOR.name: _message_schema(m.DESCRIPTOR) for m in messages}
    schemas["Error"] = {
        "type": "object",
        "properties": {"error": {"type": "string"}, "code": {"type": "string"}},
        "required": ["error"],
    }
    schemas["RepositoryIndexRequest"] = {
        "type": "object",
        "properties": {"ready": {"type": "boolean", "description": "true: only the models in service"}},
    }
    schemas["RepositoryModel"] = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "state": {"type": "string", "enum": ["READY", "UNLOADING", "UNAVAILABLE"]},
            "reason": {"type": "string", "description": "why UNAVAILABLE: the failed load's error, or unloaded"},
        },
        "required": ["name", "version", "state", "reason"],
    }
    schemas["RepositoryModelLoad"] = {
        "type": "object",
        "properties": {
            "parameters": {
                "type": "object",
                "maxProperties": 0,
                "description": "Triton's config and file overrides are not taken: the repository's files are loaded",
            }
        },
    }
    schemas["RepositoryModelUnload"] = {
        "type": "object",
        "properties": {
            "parameters": {
                "type": "object",
                "properties": {
                    "unload_dependents": {
                        "type": "boolean",
                        "description": "taken (tritonclient sends it) and changes nothing: a model's towers "
                        "(NAME_image, NAME_text) are unloaded with it",
                    }
                },
                "additionalProperties": False,
            }
        },
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


def _repository(summary: str, request: str, ok: dict[str, Any], control: bool) -> dict[str, Any]:
    """A POST of KServe's repository extension: an optional JSON body, answered in JSON."""
    body = {"required": False, "content": {"application/json": _json(request)}}
    parameters = [{**_MODEL, "description": "a model of the repository (a directory of --model-repository)"}]
    responses = {"200": {"description": summary, "content": {"application/json": {"schema": ok}}}, **_ERRORS}
    if control:
        responses.update(_FORBIDDEN)
    return {
        "post": {
            "summary": summary,
            "parameters": parameters if control else [],
            "requestBody": body,
            "responses": responses,
        }
    }


def _v1_paths() -> dict[str, Any]:
    info = {"$ref": "#/components/schemas/GetModelInfoResponse"}
    return {
        "/v1/score": _scoring(
            "PickScore of each image for one prompt, or of prompt-image pairs, by the body's model (default: the "
            "server's default model)",
            "ScoreRequest",
            "ScoreResponse",
        ),
        "/v1/rank": _scoring(
            "Images best first, with softmax probabilities, by the body's model", "RankRequest", "RankResponse"
        ),
        "/v1/models/{model}/score": _scoring(
            "Score, by the model in the path", "ScoreRequest", "ScoreResponse", [_SERVED]
        ),
        "/v1/models/{model}/rank": _scoring("Rank, by the model in the path", "RankRequest", "RankResponse", [_SERVED]),
        "/v1/rewards": _scoring(
            "Each image scored by several models (each image decoded once per preprocessing); the reward is the "
            "sum of weight x normalised score. normalize declared: 400 for a model that declares no map",
            "RewardsRequest",
            "RewardsResponse",
        ),
        "/v1/model": _get(
            "A served model (?model=, default: the default model) and the server's limits", info, [_CHOSEN]
        ),
        "/v1/models": _get(
            "Every model in service, the default first", {"$ref": "#/components/schemas/ListModelsResponse"}
        ),
        "/v1/models/{model}": _get(
            "A served model and the server's limits", info, [{**_SERVED, "description": "a served model"}]
        ),
    }


def _v2_paths() -> dict[str, Any]:
    obj = {"type": "object"}
    index = {"type": "array", "items": {"$ref": "#/components/schemas/RepositoryModel"}}
    return {
        "/v2/health/live": _get("200 while the process answers", _health_body("live")),
        "/v2/health/ready": _get(
            "200 while requests are taken; 503 while warming up or draining", _health_body("ready")
        ),
        "/v2": _get("KServe v2 server metadata", obj),
        "/v2/models/stats": _get("KServe v2 statistics of every model", obj),
        **_kserve(
            "",
            _get(
                "KServe v2 model metadata (NAME, NAME_image, NAME_text for each served model), with the served model's "
                "identity",
                {"type": "object", "properties": {"identity": _IDENTITY}},
            ),
        ),
        **_kserve("/ready", _get("200 when the model is ready, 503 otherwise", _health_body("ready", name=True))),
        **_kserve(
            "/config",
            _get(
                "Triton model configuration; parameters.identity.string_value is the served model's identity",
                {
                    "type": "object",
                    "properties": {
                        "parameters": {
                            "type": "object",
                            "properties": {"identity": {"type": "object", "properties": {"string_value": _IDENTITY}}},
                        }
                    },
                },
            ),
        ),
        **_kserve("/stats", _get("KServe v2 model statistics", obj)),
        **_kserve("/infer", _INFER),
        "/v2/repository/index": _repository(
            "Every model known, in service or not, with its version, state and reason",
            "RepositoryIndexRequest",
            index,
            control=False,
        ),
        "/v2/repository/models/{name}/load": _repository(
            "Load (or reload) the model's newest version, warm it, then put it in service; the old version drains. "
            "Needs --model-control-mode explicit",
            "RepositoryModelLoad",
            obj,
            control=True,
        ),
        "/v2/repository/models/{name}/unload": _repository(
            "Take the model (and its towers) out of service once its admitted requests finished. Needs "
            "--model-control-mode explicit",
            "RepositoryModelUnload",
            obj,
            control=True,
        ),
    }


def _paths() -> dict[str, Any]:
    return {**_v1_paths(), "/openapi.json": _get("This document", {"type": "object"}), **_v2_paths()}


def document(models: Sequence[ModelInfo], max_images_per_request: int) -> dict[str, Any]:
    """The document, its description naming ``models`` (the models in service, the default first; none while
    every model is unloaded)."""
    served = "; ".join(f"{m.model} ({m.source}, {m.backend}, {m.device})" for m in models) or "none right now"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "PickScore",
            "version": __version__,
            "description": f"Human-preference scores for text-to-image generations. Models in service, the default "
            f"first: {served} (GET /v1/models). At most {max_images_per_request} images a request.",
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
        "paths": _paths(),
    }
