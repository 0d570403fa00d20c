"""KServe v2 tensor data to and from numpy, for the transports that carry it: raw bytes (gRPC's
``raw_input_contents``, Triton's HTTP binary extension) and lists of values (gRPC's typed contents, JSON ``data``).

Raw numbers are little-endian, row-major; a raw BYTES element is a 4-byte little-endian length, then its bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from pickscore.errors import InvalidInput

NUMPY = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "UINT8": np.uint8}


def from_raw(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    """An input's raw bytes as an array of ``shape``; InvalidInput naming the input when they do not fit."""
    count = int(np.prod(shape))
    if datatype == "BYTES":
        return _elements(name, shape, _split_bytes(name, raw))
    dtype = np.dtype(NUMPY[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {name!r}: {len(raw)} bytes of raw data for shape {list(shape)} ({count * dtype.itemsize} expected)"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def from_values(name: str, datatype: str, shape: tuple[int, ...], values: Sequence[Any]) -> np.ndarray:
    """An input's values (flat, or nested row-major) as an array of ``shape``; BYTES values are bytes."""
    if datatype == "BYTES":
        return _elements(name, shape, list(values))
    try:
        array = np.asarray(values, dtype=NUMPY[datatype]).reshape(-1)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidInput(f"input {name!r}: data is not a regular array of {datatype} ({e})") from None
    count = int(np.prod(shape))
    if len(array) != count:
        raise InvalidInput(f"input {name!r}: {len(array)} values for shape {list(shape)} ({count} expected)")
    return array.reshape(shape)


def _elements(name: str, shape: tuple[int, ...], items: list[bytes]) -> np.ndarray:
    """A BYTES input's elements as an object array of ``shape``."""
    count = int(np.prod(shape))
    if len(items) != count:
        raise InvalidInput(f"input {name!r}: {len(items)} elements for shape {list(shape)} ({count} expected)")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def _split_bytes(name: str, raw: bytes) -> list[bytes]:
    """Elements of a raw BYTES tensor."""
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


def to_raw(datatype: str, array: np.ndarray) -> bytes:
    """An output's raw bytes (numbers only: the models answer FP32)."""
    return np.ascontiguousarray(array, dtype=np.dtype(NUMPY[datatype]).newbyteorder("<")).tobytes()
