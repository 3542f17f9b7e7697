"""Concept vectors: read from a file, or the contrastive direction of two splits of a captured run."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.errors import DataError


def read_vector_file(path: str | os.PathLike) -> np.ndarray:
    """A .npy (no pickle) or one-tensor .safetensors file as float32: [hidden] or [layers, hidden]."""
    p = Path(path)
    if p.suffix == ".npy":
        return np.load(p, allow_pickle=False).astype(np.float32)
    from safetensors.numpy import load_file

    tensors = load_file(p)
    if len(tensors) != 1:
        raise DataError(f"{p}: {len(tensors)} tensors; a steering vector file holds one")
    return next(iter(tensors.values())).astype(np.float32)


def contrastive(run_dir: str | os.PathLike, layer: int, split_a: str, split_b: str, reduce: str) -> np.ndarray:
    """mean over split A minus mean over split B of resid_post at ``layer``, each example reduced
    to its last token or the mean of its tokens first (float64 sums)."""
    from layerscope.store.reader import Run

    run = Run(run_dir)
    means = []
    for split in (split_a, split_b):
        if split not in run.splits:
            raise DataError(f"{run.path}: no split {split!r} for the contrastive vector (splits: "
                            f"{', '.join(run.splits)}); set steering.vectors.*.contrast.split_a / split_b")
        acts = run.activations(layer, "resid_post", split)
        if acts.per_token and acts.positions != "all":
            raise DataError(f"{run.path}: {acts.name} holds the {acts.positions} tokens only; a contrast reduces each "
                            "example's last token or all its tokens (contrast.reduce): capture the layer with "
                            "positions: all (or last)")
        last_only = not acts.per_token
        if reduce == "mean" and last_only:
            raise DataError(f"{run.path}: layer {layer} resid_post holds last positions only; contrast.reduce: mean "
                            "needs capture.positions: all")
        total = np.zeros(acts.width, dtype=np.float64)
        for i in range(len(acts)):
            x = np.asarray(acts[i], dtype=np.float64)
            total += x if last_only else (x[-1] if reduce == "last" else x.mean(axis=0))
        means.append(total / max(len(acts), 1))
    return (means[0] - means[1]).astype(np.float32)


def make_vector(spec: dict[str, Any], base: str | os.PathLike, run_dir: str | os.PathLike, num_layers: int,
                hidden: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The concept's vector ([hidden] or [layers, hidden], normalised per row if asked) and its provenance."""
    if "file" in spec:
        path = Path(spec["file"]) if Path(spec["file"]).is_absolute() else Path(base) / spec["file"]
        vec = read_vector_file(path)
        info: dict[str, Any] = {"source": "file", "file": str(spec["file"]),
                                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    else:
        c = spec["contrast"]
        vec = contrastive(run_dir, c["layer"], c["split_a"], c["split_b"], c["reduce"])
        info = {"source": "contrast", **c}
    if vec.shape[-1] != hidden or vec.ndim not in (1, 2) or (vec.ndim == 2 and vec.shape[0] != num_layers):
        raise DataError(f"steering vector of shape {list(vec.shape)}; the model needs [{hidden}] or "
                        f"[{num_layers}, {hidden}]")
    if spec.get("normalize"):
        norm = np.linalg.norm(vec, axis=-1, keepdims=True)
        if (norm == 0).any():
            raise DataError("steering vector is zero: it cannot be normalised")
        vec = vec / norm
    info |= {"normalize": bool(spec.get("normalize")), "shape": list(vec.shape),
             "norm": [float(x) for x in np.atleast_1d(np.linalg.norm(vec, axis=-1))]}
    return vec.astype(np.float32), info


def vector_at(vec: np.ndarray, layer: int) -> np.ndarray:
    """The vector to add at ``layer``: the file's one vector, or its row for that layer."""
    return vec if vec.ndim == 1 else vec[layer]
