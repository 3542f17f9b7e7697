"""LoRA neurons for seed 002's view: the ``lora_a.*`` sites, each adapted module's A projection
outputs (rank r, one column per "LoRA neuron").

For every layer and adapted module, one pass over the array (neurons.scan, shard by shard) gives
each neuron's statistics and its k highest and k lowest examples, one entry per example; the
contexts of those entries are then read example by example (neurons.contexts). The positive list
keeps only values above 0 and the negative list only values below 0: an entry with the wrong sign
would say the opposite of its panel's title.

Each neuron also gets its interpretation key stem, seed 002's ``layer_{L}_{module}`` for a rank-1
module (``layer_10_gate_proj``) and ``layer_{L}_{module}_{n}`` for neuron n of a higher rank; the
page appends ``_positive`` or ``_negative`` (layerscope.web.interpretations reads and merges them).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from layerscope.analysis import neurons as nz
from layerscope.store.reader import Run

log = logging.getLogger("layerscope.analysis.lora")

PREFIX = "lora_a."
# seed 002 shows gate/up/down side by side; modules are ordered as a layer runs them
ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "query_key_value", "dense", "out_proj", "gate_proj",
         "up_proj", "fc1", "c_fc", "w1", "w3", "fc2", "c_proj", "down_proj", "w2")


def key_stem(layer: int, module: str, neuron: int, rank: int) -> str:
    """The interpretation key of a neuron's panels without their ``_positive``/``_negative`` suffix."""
    return f"layer_{layer}_{module}" if rank == 1 else f"layer_{layer}_{module}_{neuron}"


def lora_modules(run: Run) -> dict[int, list[str]]:
    """Layer -> the adapted modules whose ``lora_a`` site the run holds, in ``ORDER``."""
    out: dict[int, list[str]] = {}
    for L, site in run.arrays:
        if site.startswith(PREFIX):
            out.setdefault(L, []).append(site[len(PREFIX):])
    return {L: sorted(ms, key=_order) for L, ms in sorted(out.items())}


def _order(module: str) -> tuple[int, str]:
    short = module.rsplit(".", 1)[-1]
    return (ORDER.index(short) if short in ORDER else len(ORDER), module)


def module_names(modules: list[str]) -> dict[str, str]:
    """Module path -> its name in interpretation keys: the last part (``gate_proj``, as seed 002 writes
    it), or the whole path with ``_`` for ``.`` where two modules share a last part (GPT-2's
    ``attn.c_proj`` and ``mlp.c_proj``)."""
    short = {m: m.rsplit(".", 1)[-1] for m in modules}
    counts: dict[str, int] = {}
    for s in short.values():
        counts[s] = counts.get(s, 0) + 1
    return {m: s if counts[s] == 1 else m.replace(".", "_") for m, s in short.items()}


def lora_summaries(run: Run, doc: Callable[[int, int, int], int], top_k: int, context: int) -> dict[str, Any] | None:
    """Every LoRA neuron of every layer (None without ``lora_a`` sites): ``layers`` {"L": {"modules":
    [paths], module path: {site, width, positions, max, min, mean, sd, split_mean [splits, width],
    entries (columnar, ``card`` = neuron), ctx, keys [width]}}}. ``doc`` names a span of an example's
    tokens (summaries.Texts.doc)."""
    mods = lora_modules(run)
    if not mods:
        return None
    names = module_names(sorted({m for ms in mods.values() for m in ms}))
    layers: dict[str, Any] = {}
    for L, modules in mods.items():
        out: dict[str, Any] = {"modules": modules}
        for m in modules:
            acts = run.activations(L, PREFIX + m)
            sc = nz.scan(run, acts, top_k)
            neurons = np.arange(acts.width)
            # sign filter: a neuron never above 0 has an empty positive list, not its least negative values
            top = np.where(sc.top_v > 0, sc.top_e, -1)
            bot = np.where(sc.bot_v < 0, sc.bot_e, -1)
            entries, ctx = nz.card_entries(run, acts, neurons, top, bot, context, doc)
            out[m] = {"site": PREFIX + m, "width": acts.width, "positions": acts.positions, "max": sc.max,
                      "min": sc.min, "mean": sc.mean, "sd": sc.sd, "split_mean": sc.split_mean,
                      "entries": entries, "ctx": ctx,
                      "keys": [key_stem(L, names[m], n, acts.width) for n in range(acts.width)]}
        layers[str(L)] = out
    log.info("LoRA neurons: %d layers, %d modules", len(layers), sum(len(v) for v in mods.values()))
    return {"k": top_k, "context": context, "layers": layers}
