"""KServe v2 inference over REST, as ``tritonclient.http`` speaks it: a JSON header, optionally followed by
the binary tensors of Triton's extension (``Inference-Header-Content-Length``), decoded straight to the api's
numpy tensors; the answer's tensors encoded straight back, as JSON ``data`` or binary.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import numpy as np

from pickscore.errors import InvalidInput
from pickscore.server import tensors
from pickscore.server.api_kserve import InferRequest, InferResponse, InputTensor

HEADER_LENGTH = "Inference-Header-Content-Length"


def infer_request(
    body: bytes, header_length: str | None, model: str, version: str
) -> tuple[InferRequest, dict[str, bool]]:
    """The api's request, and which outputs to answer in binary (``"*"``: those not named)."""
    length = _header_length(header_length, len(body))
    try:
        header = json.loads(body[:length])
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"inference header: not JSON ({e})") from None
    if not isinstance(header, dict):
        raise InvalidInput("inference header: a JSON object expected")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("parameters: a JSON object expected")
    plain = {k: v for k, v in parameters.items() if k != "binary_data_output"}
    for key, value in plain.items():
        _check_parameter(key, value)
    inputs = _inputs(header.get("inputs"), body, length)
    default = bool(parameters.get("binary_data_output", False))
    binary, outputs = {}, []
    for spec in header.get("outputs") or []:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidInput("outputs: each a JSON object with a name")
        outputs.append(spec["name"])
        binary[spec["name"]] = bool((spec.get("parameters") or {}).get("binary_data", default))
    binary["*"] = default
    return InferRequest(model, version, str(header.get("id", "")), inputs, outputs, plain), binary


def _header_length(given: str | None, size: int) -> int:
    if given is None:
        return size
    try:
        length = int(given)
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH}: {given!r} is not a byte count") from None
    if not 0 <= length <= size:
        raise InvalidInput(f"{HEADER_LENGTH} {length}: outside the {size}-byte body")
    return length


def _check_parameter(key: str, value: Any) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise InvalidInput(f"parameter {key!r}: {value} is out of range")
    if not isinstance(value, bool | int | float | str):
        raise InvalidInput(f"parameter {key!r}: a number, boolean or string expected")


def _inputs(specs: Any, body: bytes, at: int) -> list[InputTensor]:
    """The header's inputs; a binary one's bytes are the next ``binary_data_size`` after the header."""
    if not isinstance(specs, list):
        raise InvalidInput("inputs: a JSON list expected")
    out = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise InvalidInput(f"input {i}: a JSON object expected")
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInput(f"input {i}: name and datatype must be strings")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidInput(f"input {name!r}: shape must be a list of integers")
        shape = tuple(shape)
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or at + size > len(body):
                raise InvalidInput(f"input {name!r}: binary_data_size {size!r} runs past the body's end")
            read = partial(tensors.from_raw, name, datatype, shape, body[at : at + size])
            at += size
        else:
            read = partial(_from_json, name, datatype, shape, spec.get("data"))
        out.append(InputTensor(name, datatype, shape, read))
    if at != len(body):
        raise InvalidInput(f"{len(body) - at} bytes after the last binary input")
    return out


def _from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """JSON ``data`` (flat or nested, row-major; BYTES as strings) as an array of ``shape``."""
    if data is None:
        raise InvalidInput(f"input {name!r}: neither data nor binary_data_size")
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).reshape(-1) if isinstance(data, list) else None
        if flat is None or not all(isinstance(x, str) for x in flat):
            raise InvalidInput(f"input {name!r}: BYTES data must be a list of strings")
        data = [x.encode("utf-8") for x in flat]
    return tensors.from_values(name, datatype, shape, data)


def infer_response(response: InferResponse, binary: dict[str, bool]) -> tuple[bytes, int | None]:
    """The JSON header (and binary outputs after it); the header's length when anything is binary."""
    outputs, blobs = [], []
    for tensor in response.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.array.shape)}
        if binary.get(tensor.name, binary.get("*", False)):
            blob = tensors.to_raw(tensor.datatype, tensor.array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = tensor.array.reshape(-1).tolist()
        outputs.append(entry)
    header = json.dumps(
        {"model_name": response.model, "model_version": response.version, "id": response.id, "outputs": outputs}
    ).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
