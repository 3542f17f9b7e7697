"""What a PEFT LoRA adapter adapts, read from its safetensors header alone (no torch).

Per decoder layer, each adapted module (its path inside the layer, e.g. ``mlp.down_proj``)
with its rank ``r`` (the width of the ``lora_a`` site: the A projection's output, the LoRA
neurons) and its output width (the width of ``lora_delta``: the module's added output,
``scaling * B(A(x))``).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from layerscope.errors import ModelError

LORA_SITES = ("lora_a", "lora_delta")
# ...layers.3.mlp.down_proj.lora_A.weight (Llama-like), ...h.3.attn.c_attn.lora_A.weight (GPT-2);
# older PEFT versions put the adapter name before ".weight".
_KEY = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file: tensor names, dtypes and shapes."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def lora_modules(adapter_dir: str | os.PathLike) -> dict[int, dict[str, list[int]]]:
    """{layer: {module path in the layer: [r, out_features]}} of a saved LoRA adapter."""
    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"adapter.id: {d} is a {cfg.get('peft_type')} adapter; LoRA sites need a LoRA adapter")
    files = sorted(d.glob("adapter_model*.safetensors"))
    if not files:
        raise ModelError(f"adapter.id: {d} has no adapter_model.safetensors")
    shapes: dict[tuple[int, str], dict[str, list[int]]] = {}
    for f in files:
        for key, spec in safetensors_header(f).items():
            m = _KEY.search(key)
            if m and key != "__metadata__":
                shapes.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = spec["shape"]
    out: dict[int, dict[str, list[int]]] = {}
    for (layer, module), ab in sorted(shapes.items()):
        if "A" not in ab or "B" not in ab:
            raise ModelError(f"adapter.id: {d}: layer {layer} {module} has lora_{'AB'['A' in ab]} but not both")
        out.setdefault(layer, {})[module] = [int(ab["A"][0]), int(ab["B"][0])]
    return out


_BUILTIN_MODULES: dict[tuple[str, int], dict[int, dict[str, list[int]]]] = {}


def builtin_lora_modules(model_name: str, seed: int = 0) -> dict[int, dict[str, list[int]]]:
    """``lora_modules`` of the built-in adapter on a built-in model (built in a scratch directory,
    once per process: a plan with several built-in adapters builds each model once)."""
    import copy
    import tempfile

    from layerscope.models import builtin

    if (model_name, seed) not in _BUILTIN_MODULES:
        with tempfile.TemporaryDirectory() as tmp:
            base = builtin.build_model(model_name, 0, Path(tmp) / "model")
            _BUILTIN_MODULES[model_name, seed] = lora_modules(builtin.build_adapter(base, seed, Path(tmp) / "adapter"))
    return copy.deepcopy(_BUILTIN_MODULES[model_name, seed])


def split_site(site: str) -> tuple[str, str | None]:
    """``lora_a.mlp.down_proj`` -> (``lora_a``, ``mlp.down_proj``); other sites -> (site, None)."""
    kind, _, module = site.partition(".")
    return (kind, module or None) if kind in LORA_SITES else (site, None)


def matches(module: str, name: str) -> bool:
    """Whether a module path matches a configured name: the whole path or its last parts."""
    return module == name or module.endswith("." + name)


def _base_shapes(model_dir: Path) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        shapes |= {k: v["shape"] for k, v in safetensors_header(f).items() if k != "__metadata__"}
    return shapes


def check_fits(adapter_dir: str | os.PathLike, model_dir: str | os.PathLike) -> None:
    """Refuse an adapter trained on another base model: every LoRA pair must fit the weight of the
    module it adapts (A [r, in], B [out, r] against the weight's [out, in], or GPT-2's Conv1D [in, out])."""
    base = _base_shapes(Path(model_dir))
    for f in sorted(Path(adapter_dir).glob("adapter_model*.safetensors")):
        header = safetensors_header(f)
        for key, spec in header.items():
            if ".lora_A." not in key or key == "__metadata__":
                continue
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key not in header:
                continue
            r, n_in = spec["shape"]
            n_out = header[b_key]["shape"][0]
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            weight = next((base[k] for k in (f"{module}.weight", f"{module.split('.', 1)[-1]}.weight") if k in base),
                          None)
            if weight is None:
                continue  # a module without a plain weight here (fused or renamed): PEFT's own load decides
            if sorted(weight) != sorted([n_out, n_in]) or len(weight) != 2:
                raise ModelError(f"adapter.id: {Path(adapter_dir).name} does not fit model {Path(model_dir).name}: "
                                 f"{module} takes {n_in} -> {n_out} in the adapter (lora_A {spec['shape']}, lora_B "
                                 f"{header[b_key]['shape']}) but its weight in the model is {weight}; the adapter "
                                 "was trained on another base model")
