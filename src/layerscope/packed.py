"""Numpy arrays inside JSON documents: ``{"__array__": dtype, "shape": [...], "b64": ...}``.

Summaries hold per-neuron statistics for every neuron of every layer; as JSON number lists they
would be several times larger than the raw bytes and slow to parse. Both summary.json and the
dashboard page carry arrays in this form; the page decodes them into typed arrays.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np

# dtypes a browser has a typed array for (little-endian, as every browser runs)
DTYPES = ("float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32")


def pack_array(a: np.ndarray) -> dict[str, Any]:
    """One array as a JSON-ready dict; int64 is narrowed to the smallest type that holds it."""
    a = np.asarray(a)
    if a.dtype.kind in "iu" and a.dtype.name not in DTYPES or a.dtype.kind == "b":
        a = narrow_ints(a)
    elif a.dtype.kind == "f" and a.dtype.name not in DTYPES:
        a = a.astype(np.float32)
    if a.dtype.name not in DTYPES:
        raise TypeError(f"cannot pack dtype {a.dtype}")
    data = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    return {"__array__": a.dtype.name, "shape": list(a.shape), "b64": base64.b64encode(data).decode("ascii")}


def narrow_ints(a: np.ndarray) -> np.ndarray:
    """Integers in the smallest browser-typed dtype that holds them all."""
    a = np.asarray(a)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32):
        if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
            return a.astype(t)
    return a.astype(np.float64)  # beyond 32 bits: exact up to 2**53, as JavaScript numbers are


def unpack_array(d: dict[str, Any]) -> np.ndarray:
    """The array a ``pack_array`` dict holds (a read-only view of fresh bytes)."""
    raw = base64.b64decode(d["b64"])
    return np.frombuffer(raw, dtype=np.dtype(d["__array__"]).newbyteorder("<")).reshape(d["shape"])


def is_packed(x: Any) -> bool:
    return isinstance(x, dict) and "__array__" in x


def pack(obj: Any) -> Any:
    """``obj`` with every numpy array packed, numpy scalars made Python, non-finite floats None."""
    if isinstance(obj, np.ndarray):
        return pack_array(obj)
    if isinstance(obj, dict):
        return {str(k): pack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [pack(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def unpack(obj: Any) -> Any:
    """The inverse of ``pack`` (arrays come back as numpy arrays)."""
    if is_packed(obj):
        return unpack_array(obj)
    if isinstance(obj, dict):
        return {k: unpack(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v) for v in obj]
    return obj
