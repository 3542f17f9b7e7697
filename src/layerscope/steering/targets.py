"""The ``steering:`` config section: concept vectors, and the steered runs they expand to.

Every run of the sweep (concept x layer x strength) is its own target, named
``{concept}_L{layer:02d}_s{strength}``, so adding one strength runs only it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.errors import ConfigError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Target:
    """One steered run: add ``strength`` x the concept's vector to the residual stream leaving
    ``layer`` (its resid_post), at ``positions`` (every real token, or each example's last)."""

    name: str
    concept: str
    layer: int
    strength: float
    positions: str

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "concept": self.concept, "layer": self.layer, "strength": self.strength,
                "positions": self.positions}


def _fmt(x: float) -> str:
    return f"{x:g}"


def targets(steering: dict[str, Any], num_layers: int, base: Path, captured: dict[int, list[str]]) -> list[Target]:
    """Check the section and expand its runs into targets (a ConfigError names the key and the problem)."""
    vectors = steering["vectors"]
    for concept, spec in vectors.items():
        key = f"steering.vectors.{concept}"
        if not NAME.match(concept):
            raise ConfigError(f"config error: {key}: a concept name takes letters, digits, '_', '.', '-'")
        if ("file" in spec) == ("contrast" in spec):
            raise ConfigError(f"config error: {key}: give either file (a .npy or .safetensors vector) or contrast "
                              "(two splits of this run)")
        if "file" in spec:
            check_vector_file(resolve(spec["file"], base), num_layers, key + ".file")
        else:
            c = spec["contrast"]
            L = c["layer"] % num_layers if -num_layers <= c["layer"] < num_layers else None
            if L is None:
                raise ConfigError(f"config error: {key}.contrast.layer: {c['layer']} is out of range for a model "
                                  f"with {num_layers} layers")
            if "resid_post" not in captured.get(L, []):
                raise ConfigError(f"config error: {key}.contrast.layer: the contrastive direction is read from "
                                  f"resid_post at layer {L}, which capture does not store; add it")
            if c["split_a"] == c["split_b"]:
                raise ConfigError(f"config error: {key}.contrast: split_a and split_b are both {c['split_a']!r}")
    out: dict[str, Target] = {}
    for i, run in enumerate(steering["runs"]):
        key = f"steering.runs[{i}]"
        if run["concept"] not in vectors:
            raise ConfigError(f"config error: {key}.concept: no vector {run['concept']!r} in steering.vectors "
                              f"({', '.join(vectors) or 'none'})")
        layers = run["layer"] if isinstance(run["layer"], list) else [run["layer"]]
        strengths = run["strength"] if isinstance(run["strength"], list) else [run["strength"]]
        for layer in layers:
            if not -num_layers <= layer < num_layers:
                raise ConfigError(f"config error: {key}.layer: {layer} is out of range for a model with "
                                  f"{num_layers} layers")
            for s in strengths:
                t = Target(f"{run['concept']}_L{layer % num_layers:02d}_s{_fmt(float(s))}", run["concept"],
                           layer % num_layers, float(s), run["positions"])
                if t.name in out:
                    raise ConfigError(f"config error: {key}: steered run {t.name} is listed twice")
                out[t.name] = t
    return list(out.values())


def resolve(path: str, base: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base / p


def check_vector_file(path: Path, num_layers: int, key: str) -> None:
    """Refuse a vector file that is missing, unreadable or of the wrong shape, before any job runs."""
    if not path.is_file():
        raise ConfigError(f"config error: {key}: file {path} does not exist")
    try:
        shape = vector_shape(path)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"config error: {key}: cannot read {path} as a vector ({e})") from e
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[0] != num_layers):
        raise ConfigError(f"config error: {key}: {path.name} holds an array of shape {list(shape)}; a steering "
                          f"vector is [hidden] or one per layer, [{num_layers}, hidden]")


def vector_shape(path: Path) -> tuple[int, ...]:
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False).shape
    if path.suffix == ".safetensors":
        from layerscope.models.adapters import safetensors_header

        tensors = {k: v for k, v in safetensors_header(path).items() if k != "__metadata__"}
        if len(tensors) != 1:
            raise ValueError(f"{len(tensors)} tensors; a steering vector file holds one")
        return tuple(next(iter(tensors.values()))["shape"])
    raise ValueError("not .npy or .safetensors")
