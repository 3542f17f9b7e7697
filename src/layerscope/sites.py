"""Where each capture site lives in a causal LM, and forward hooks that collect it.

Sites, per decoder layer:
  resid_post  output of the decoder layer (residual stream after the layer)
  attn_out    output of the attention block (after its output projection)
  mlp_out     output of the MLP block
  mlp_act     input of the MLP's down projection (the MLP's neurons)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from layerscope.errors import ModelError

ATTN_NAMES = ("self_attn", "attn", "self_attention", "attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
DOWN_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2", "fc_out")


def base_model(model: nn.Module) -> nn.Module:
    """Unwrap a PEFT model: hooks go on the (LoRA-wrapped) modules of the underlying transformer."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The ModuleList of decoder layers (``model.layers``, ``transformer.h``, ...)."""
    best = None
    for name, mod in base_model(model).named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == num_layers:
            if best is None or name.count(".") < best[0].count("."):
                best = (name, mod)
    if best is None:
        raise ModelError(f"cannot find the {num_layers} decoder layers in {type(model).__name__}")
    return best[1]


def _child(parent: nn.Module, names: tuple[str, ...], what: str, layer: int) -> nn.Module:
    for n in names:
        m = getattr(parent, n, None)
        if isinstance(m, nn.Module):
            return m
    raise ModelError(f"layer {layer}: no {what} module (looked for {', '.join(names)}) in {type(parent).__name__}")


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def attach(layer_module: nn.Module, layer: int, site: str, sink: Callable[[torch.Tensor], None]):
    """Register a hook that passes the site's [batch, seq, width] tensor to ``sink``; returns the handle."""
    if site == "resid_post":
        return layer_module.register_forward_hook(lambda m, a, o: sink(_first(o)))
    if site == "attn_out":
        mod = _child(layer_module, ATTN_NAMES, "attention", layer)
        return mod.register_forward_hook(lambda m, a, o: sink(_first(o)))
    mlp = _child(layer_module, MLP_NAMES, "MLP", layer)
    if site == "mlp_out":
        return mlp.register_forward_hook(lambda m, a, o: sink(_first(o)))
    if site == "mlp_act":
        down = _child(mlp, DOWN_NAMES, "MLP down projection", layer)
        return down.register_forward_pre_hook(lambda m, a: sink(a[0]))
    raise ModelError(f"unknown site {site!r}")


class StopForward(Exception):
    """Raised by a hook after the last layer a job needs, to skip the rest of the model."""


def attach_stop(layer_module: nn.Module):
    def stop(m, a, o):
        raise StopForward

    return layer_module.register_forward_hook(stop)
