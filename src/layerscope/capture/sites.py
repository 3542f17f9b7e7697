"""Where each capture site lives in a causal LM, and forward hooks that collect it.

Sites, per decoder layer:
  resid_post  output of the decoder layer (residual stream after the layer)
  attn_out    output of the attention block (after its output projection)
  mlp_out     output of the MLP block
  mlp_act     input of the MLP's down projection (the MLP's neurons)
  lora_a.M    output of the LoRA A projection of adapted module M (the rank-r "LoRA neurons")
  lora_delta.M  what the LoRA adds to M's output: scaling * B(A(x))

Architectures whose MLP is not a submodule (OPT, XGLM: ``fc1``/``fc2`` straight on the decoder
layer) take the MLP's output from ``fc2`` and its neurons from ``fc2``'s input. A sparse
mixture-of-experts MLP (Mixtral, Qwen-MoE, ...) has an output (mlp_out) but no single set of
neurons: every expert has its own, and each token passes through only a few experts, so
mlp_act is refused for it, at config time by ``check_sites`` and at capture time by ``attach``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from layerscope.models.adapters import LORA_SITES, split_site
from layerscope.models.architectures import SPARSE_MOE_HINT
from layerscope.errors import ModelError

ATTN_NAMES = ("self_attn", "attn", "self_attention", "attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
DOWN_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2", "fc_out")
# MLP projections that some architectures (OPT, XGLM) put straight on the decoder layer.
LAYER_UP_NAMES = ("fc1",)
LAYER_DOWN_NAMES = ("fc2",)
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


def first_tensor(x):
    """A module's output tensor: the first element where it returns a tuple (hidden, weights, ...)."""
    return x[0] if isinstance(x, (tuple, list)) else x


def _optional(parent: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for n in names:
        m = getattr(parent, n, None)
        if isinstance(m, nn.Module):
            return m
    return None


def _is_sparse_moe_module(mlp: nn.Module) -> bool:
    # Every sparse MoE block in transformers (and in common remote code) keeps its experts in
    # ``experts``: a ModuleList of MLPs, or one module holding stacked [expert, ...] weights.
    return isinstance(getattr(mlp, "experts", None), nn.Module)


class _Handles:
    """Several hook handles removed as one, so that ``attach`` always returns one handle."""

    def __init__(self, *handles) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _unflattener(layer_module: nn.Module):
    """A pre-hook on the decoder layer that remembers its input's [batch, seq] shape, and a function
    that gives a module's output back that shape where the module ran on flattened tokens
    [batch * seq, width] (OPT's MLP). Returns (hook handle, function)."""
    shape: list[torch.Size] = []

    def remember(m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        shape[:] = [x.shape[:-1]]

    def unflatten(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*shape[0], x.shape[-1]) if x.dim() == 2 else x

    return layer_module.register_forward_pre_hook(remember, with_kwargs=True), unflatten


def _layer_mlp_hook(layer_module: nn.Module, down: nn.Module, site: str, sink: Callable[[torch.Tensor], None]):
    """Hook an MLP down projection that sits on the decoder layer (OPT's ``fc2``), which runs on
    the tokens flattened to [batch * seq, width]."""
    pre, unflatten = _unflattener(layer_module)
    if site == "mlp_out":
        h = down.register_forward_hook(lambda m, a, o: sink(unflatten(o)))
    else:
        h = down.register_forward_pre_hook(lambda m, a: sink(unflatten(a[0])))
    return _Handles(pre, h)


def _lora_hook(layer_module: nn.Module, layer: int, site: str, sink: Callable[[torch.Tensor], None],
               adapter: str | None = None):
    """Hook the LoRA A (``lora_a``) or B (``lora_delta``, times the scaling) of an adapted module:
    those of PEFT adapter ``adapter`` (a LoraLayer keeps one A and B per loaded adapter, by name),
    or of the active one.

    In eval mode the dropout before A is the identity, so A's output is the LoRA neurons'
    activation. PEFT runs only the active adapter's A and B, so these hooks fire only in passes
    where ``adapter`` is active; with the adapter disabled (a base variant) nothing fires.
    """
    kind, path = split_site(site)
    try:
        mod = layer_module.get_submodule(path)
    except AttributeError:
        raise ModelError(f"layer {layer}: no module {path!r} for site {site}") from None
    if adapter is None:
        names = list(getattr(mod, "active_adapters", None) or [])
        if not names or not hasattr(mod, "lora_A") or names[0] not in mod.lora_A:
            raise ModelError(f"layer {layer}: {path} carries no active LoRA adapter (site {site})")
        name = names[0]
    elif not hasattr(mod, "lora_A") or adapter not in mod.lora_A:
        raise ModelError(f"layer {layer}: {path} carries no LoRA adapter {adapter!r} (site {site})")
    else:
        name = adapter
    if getattr(mod, "use_dora", {}).get(name):
        raise ModelError(f"layer {layer}: {path} is a DoRA module; its added output is not scaling * B(A(x))")
    pre, unflatten = _unflattener(layer_module)
    if kind == "lora_a":
        h = mod.lora_A[name].register_forward_hook(lambda m, a, o: sink(unflatten(o)))
    else:
        scaling = mod.scaling[name]
        h = mod.lora_B[name].register_forward_hook(lambda m, a, o: sink(unflatten(o * scaling)))
    return _Handles(pre, h)


def attach(layer_module: nn.Module, layer: int, site: str, sink: Callable[[torch.Tensor], None],
           adapter: str | None = None):
    """Register a hook that passes the site's [batch, seq, width] tensor to ``sink``; returns the handle.
    ``adapter``: the PEFT adapter whose A and B a LoRA site reads (default: the active one)."""
    if split_site(site)[0] in LORA_SITES:
        return _lora_hook(layer_module, layer, site, sink, adapter)
    if site == "resid_post":
        return layer_module.register_forward_hook(lambda m, a, o: sink(first_tensor(o)))
    if site == "attn_out":
        mod = _child(layer_module, ATTN_NAMES, "attention", layer)
        return mod.register_forward_hook(lambda m, a, o: sink(first_tensor(o)))
    if site not in ("mlp_out", "mlp_act"):
        raise ModelError(f"unknown site {site!r}")
    mlp = _optional(layer_module, MLP_NAMES)
    if mlp is None:
        down = _optional(layer_module, LAYER_DOWN_NAMES)
        if down is not None and _optional(layer_module, LAYER_UP_NAMES) is not None:
            return _layer_mlp_hook(layer_module, down, site, sink)
        mlp = _child(layer_module, MLP_NAMES, "MLP", layer)  # raises, naming what was looked for
    if site == "mlp_out":
        # A sparse MoE block may return (hidden, router_logits): the first element is its output.
        return mlp.register_forward_hook(lambda m, a, o: sink(first_tensor(o)))
    if _is_sparse_moe_module(mlp):
        raise ModelError(f"layer {layer}: mlp_act is not defined for {type(mlp).__name__} (a sparse "
                         f"mixture-of-experts MLP: each expert has its own neurons); {SPARSE_MOE_HINT}")
    down = _child(mlp, DOWN_NAMES, "MLP down projection", layer)
    return down.register_forward_pre_hook(lambda m, a: sink(a[0]))


class StopForward(Exception):
    """Raised by a hook after the last layer a job needs, to skip the rest of the model."""


def attach_stop(layer_module: nn.Module):
    def stop(m, a, o):
        raise StopForward

    return layer_module.register_forward_hook(stop)
