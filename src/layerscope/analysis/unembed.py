"""What an MLP neuron writes to the output vocabulary, from the checkpoint's weights alone.

A neuron n of layer L adds ``a * W_down[:, n]`` to the residual stream. Read through the final
norm's weight and the unembedding, that direction raises the logits ``W_U (g * W_down[:, n])``:
the tokens it promotes (largest) and suppresses (smallest), as sae_vis' logit effects. The norm's
per-token scale and the layers above L are ignored: this is the direct path only.

The summarize step runs without loading the model: safetensors headers say where each tensor
lies, and only the unembedding, the final norm and the needed down projections are read
(memory-mapped), with no torch import. A LoRA adapter's deltas on those weights are merged.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}

# Down projection of layer N: Llama/Qwen/Mistral ``mlp.down_proj``, GPT-2 ``mlp.c_proj``
# (a Conv1D, stored [in, out]), OPT ``fc2`` on the layer itself.
_DOWN = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.(mlp\.down_proj|mlp\.c_proj|fc2)\.weight$")
_UNEMBED = ("lm_head.weight",)
_TIED = ("embed_tokens.weight", "wte.weight")
_FINAL_NORM = ("model.norm.weight", "ln_f.weight", "final_layer_norm.weight", "norm.weight")


class SafetensorsDir:
    """Tensors of every ``*.safetensors`` file in a directory, by name, read lazily without torch."""

    def __init__(self, path: str | Path) -> None:
        self.where: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, info in header.items():
                if name != "__metadata__":
                    self.where[name] = (f, 8 + n, info)

    def names(self) -> list[str]:
        return list(self.where)

    def find(self, suffixes: tuple[str, ...]) -> str | None:
        """The first tensor whose name ends with one of ``suffixes`` (in their order)."""
        for s in suffixes:
            for name in self.where:
                if name == s or name.endswith("." + s):
                    return name
        return None

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (bfloat16 widened exactly)."""
        f, base, info = self.where[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{name}: dtype {info['dtype']} not supported")
        a, b = info["data_offsets"]
        raw = np.memmap(f, dtype=_DTYPES[info["dtype"]], mode="r", offset=base + a,
                        shape=tuple(info["shape"]) or (1,))
        if info["dtype"] == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(raw, dtype=np.float32)


class LoraDeltas:
    """``scale * B @ A`` per base weight name, from a PEFT LoRA adapter directory (none: empty)."""

    def __init__(self, path: str | Path | None) -> None:
        self.pairs: dict[str, dict[str, str]] = {}
        self.scale = 1.0
        if path is None:
            return
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        self.scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
        self.st = SafetensorsDir(path)
        for name in self.st.names():
            m = re.match(r"(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.default)?\.weight$", name)
            if m:
                self.pairs.setdefault(m.group(1) + ".weight", {})[m.group(2)] = name

    def delta(self, base_name: str) -> np.ndarray | None:
        """The adapter's change to base weight ``base_name`` ([out, in], as nn.Linear stores it), if any."""
        for key, ab in self.pairs.items():
            if (key == base_name or base_name.endswith("." + key) or key.endswith("." + base_name)) and len(ab) == 2:
                return self.scale * (self.st.get(ab["B"]) @ self.st.get(ab["A"]))
        return None


class Unembedding:
    """Logit effects of MLP neurons, for a model (and adapter) manifest as fetch_model writes it."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        m = manifest["model"]
        self.st = SafetensorsDir(m["path"])
        adapter = manifest.get("adapter")
        self.lora = LoraDeltas(adapter["path"] if adapter else None)
        self.downs = {int(g.group(1)): (name, g.group(2)) for name in self.st.names() if (g := _DOWN.search(name))}
        unembed = self.st.find(_UNEMBED) or self.st.find(_TIED)
        if unembed is None:
            raise ValueError("no unembedding (lm_head or tied token embeddings) in the checkpoint")
        self.unembed = self._weight(unembed)  # [vocab, hidden]
        norm = self.st.find(_FINAL_NORM)
        self.gain = self.st.get(norm) if norm else None
        # Gemma-style norms scale by (1 + weight); their config says so by model_type
        if norm and m.get("model_type", "").startswith("gemma"):
            self.gain = 1.0 + self.gain

    def _weight(self, name: str) -> np.ndarray:
        w = self.st.get(name)
        d = self.lora.delta(name)
        return w if d is None else w + d

    def down(self, layer: int) -> np.ndarray:
        """Layer ``layer``'s down projection as [hidden, neurons]."""
        if layer not in self.downs:
            raise KeyError(f"no down projection for layer {layer} in the checkpoint")
        name, kind = self.downs[layer]
        w = self.st.get(name)
        if kind == "mlp.c_proj":  # GPT-2 Conv1D: [in=neurons, out=hidden]
            d = self.lora.delta(name)  # LoRA on a Conv1D: PEFT stores it as [out, in] (fan_in_fan_out)
            return (w if d is None else w + d.T).T
        return self._weight(name)

    def logit_effects(self, layer: int, neurons: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        """For each neuron, the ``k`` most promoted and most suppressed token ids and their logit
        change per unit of activation: (up_ids, up_values, down_ids, down_values), each [neurons, k]."""
        w = self.down(layer)[:, np.asarray(neurons, dtype=np.int64)]  # [hidden, n]
        if self.gain is not None:
            w = w * self.gain[:, None]
        logits = (self.unembed @ w).T  # [n, vocab]
        k = min(k, logits.shape[1])
        up = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        down = np.argsort(logits, axis=1, kind="stable")[:, :k]
        return (up, np.take_along_axis(logits, up, 1), down, np.take_along_axis(logits, down, 1))
