"""Loading only the part of a model that one capture job runs.

A job for layers ``start..stop`` needs those decoder layers, the small modules the model's own
forward runs before its first layer (position embeddings, rotary tables, input projections),
and the token embeddings only where the chain starts (``start == 0``). The model is built with
its parameters on the meta device (no memory, no random init), the decoder layers outside the
range are replaced by pass-throughs, and only the needed tensors are read from the safetensors
files. The model's own forward stays in charge of masks, position embeddings and per-layer
attention types, so every architecture Hugging Face supports works the same way.

A PEFT adapter goes onto the pruned model, so it too is loaded only for the layers the job runs.
Where a checkpoint's tensor names do not match the model's (older layouts that Hugging Face
converts on load, fused experts), or an adapter touches a module the job does not load, the
whole model is loaded the usual way and pruned.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerscope.capture import sites as S
from layerscope.errors import ModelError
from layerscope.models.loading import add_adapters, check_tokenizer_choice, load_model, resolve_dtype

log = logging.getLogger("layerscope.capture.partial")


class PassThrough(nn.Module):
    """Stands in for a decoder layer that this job does not run: hands its input back unchanged."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        # Models that pick a mask per layer read this attribute from the layer itself.
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            out.update((k, f) for k in st.keys())
    return out


def _skipped_modules(model: nn.Module, layers: nn.ModuleList, start: int, stop: int) -> list[nn.Module]:
    """Modules whose weights the job never uses: layers outside the range, the unembedding,
    and the token embeddings above the chain's start."""
    skip = [layers[i] for i in range(len(layers)) if not start <= i <= stop]
    out_emb = model.get_output_embeddings()
    if out_emb is not None:
        skip.append(out_emb)
    if start > 0:
        skip.append(model.get_input_embeddings())
    return skip


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers that hold real memory (not on the meta device)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta" and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _prune(model: nn.Module, num_layers: int, start: int, stop: int) -> nn.Module:
    layers = S.decoder_layers(model, num_layers)
    for i in range(num_layers):
        if not start <= i <= stop:
            layers[i] = PassThrough(layers[i])
    return model


def _load_partial(m: dict[str, Any], device: str, dtype: torch.dtype, trust_remote_code: bool, start: int,
                  stop: int) -> nn.Module | None:
    """The model with only the needed weights loaded, or None where the checkpoint's names do not match."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(m["path"])
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    # Parameters on meta (no memory, no init); buffers such as rotary tables are real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    layers = S.decoder_layers(model, m["num_layers"])
    skipped = {id(p) for mod in _skipped_modules(model, layers, start, stop) for p in mod.parameters()}
    _prune(model, m["num_layers"], start, stop)
    needed = [n for n, p in model.named_parameters() if id(p) not in skipped]
    files = _weight_files(path)
    missing = [n for n in needed if n not in files]
    if missing:
        log.info("checkpoint names differ from the model's (%d, e.g. %s): loading the whole model", len(missing),
                 missing[0])
        return None
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for n in needed:
        by_file.setdefault(files[n], []).append(n)
    for f, names in by_file.items():
        with safe_open(f, framework="pt", device="cpu") as st:
            for n in names:
                t = st.get_tensor(n)
                state[n] = (t.to(dtype) if t.is_floating_point() else t).to(device)
    model.load_state_dict(state, strict=False, assign=True)
    for mod in model.modules():
        for k, b in mod._buffers.items():
            if b is not None and b.device.type != "meta":
                mod._buffers[k] = b.to(device)
    return model


def _with_adapter(model: nn.Module, a: dict[str, Any], more: dict[str, Any] | None = None) -> nn.Module | None:
    """The pruned model with its PEFT adapter (and the ``more`` adapters that are variants) on the
    layers it kept; None where that cannot be done exactly (an adapter on a module this job holds
    no weights for, such as the embeddings)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, a["path"], is_trainable=False)
    add_adapters(model, more)
    if any(p.device.type == "meta" for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n):
        log.info("the adapter touches modules this job does not load: loading the whole model")
        return None
    return model


def load_block(manifest: dict[str, Any], device: str, dtype: str, trust_remote_code: bool, start: int,
               stop: int) -> tuple[nn.Module, Any]:
    """(model, tokenizer) ready to run decoder layers ``start..stop``; other layers pass their input through."""
    from transformers import AutoTokenizer

    m, a = manifest["model"], manifest.get("adapter")
    tdtype = resolve_dtype(dtype, device)
    try:
        model = _load_partial(m, device, tdtype, trust_remote_code, start, stop)
        if model is not None and a:
            model = _with_adapter(model, a, manifest.get("adapters"))
    except Exception as e:  # an architecture the skeleton path cannot build: the usual loader still can
        log.info("partial loading failed (%s: %s): loading the whole model", type(e).__name__, e)
        model = None
    if model is None:
        model, tokenizer = load_model(manifest, device, dtype, trust_remote_code)
        model = _prune(model, m["num_layers"], start, stop)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(m["path"], trust_remote_code=trust_remote_code)
        except Exception as e:
            raise ModelError(f"model.id: cannot load the tokenizer of {m['id']} from {m['path']}: {e}") from e
        model.eval()
        torch.set_grad_enabled(False)
    check_tokenizer_choice(m, tokenizer)
    return model, tokenizer
