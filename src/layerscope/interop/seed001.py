"""Seed 001's layout ("Activation Data Guide"): the residual stream at the last token.

    OUT/{split}/metadata.json
    OUT/{split}/layer_XX/shard_NNN.pt     torch.save'd [N, hidden_dim] tensors, N = shard_size
                                          (the last shard of a split may be shorter)

OUT plays the guide's ``{model_name}/{dataset_name}`` directory. Shards hold plain tensors,
so ``torch.load(path, weights_only=True)`` reads them. ``layer_XX`` is LayerScope's
``resid_post`` of decoder layer XX (the layer's output, before the final norm for the last).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.errors import LayerScopeError
from layerscope.fileio import write_json
from layerscope.interop.common import check_split_names, last_rows, out_dtype, source_info
from layerscope.store.reader import Run

SITE = "resid_post"
DEFAULT_SHARD_SIZE = 512  # the guide's example metadata
MAX_SHARDS = 1000  # shard_NNN: past 999 the guide's sorted(glob) would put shard_1000 before shard_101


def check(run: Run, arrays: list[tuple[int, str]], shard_size: int) -> None:
    """Refuse what the layout cannot hold, before anything is written."""
    check_split_names(run, "seed001")
    if shard_size < 1:
        raise LayerScopeError(f"--shard-size must be 1 or more, not {shard_size}")
    for L, site in arrays:  # arrays at a span may leave an example's last token out
        run.activations(L, site).rows_at(run.offsets[1:] - 1, "the last token")
    for split, (e0, e1) in run.splits.items():
        if math.ceil((e1 - e0) / shard_size) > MAX_SHARDS:
            raise LayerScopeError(f"split {split!r}: {e1 - e0} examples make more than {MAX_SHARDS} shards of "
                                  f"{shard_size}, which seed 001's sorted shard names cannot order; "
                                  "raise --shard-size")


def split_metadata(run: Run, split: str, arrays: list[tuple[int, str]], shard_size: int,
                   variant: str | None) -> dict[str, Any]:
    """The guide's metadata.json fields for one split, then what LayerScope adds under ``layerscope``."""
    md = run.metadata
    e0, e1 = run.splits[split]
    return {
        "model_name": md["model_name"],
        "dataset_name": md["dataset_name"],
        "split": split,
        "load_in_4bit": bool(md.get("load_in_4bit", False)),
        "total_examples": e1 - e0,
        "shard_size": shard_size,
        "batch_size": md["batch_size"],
        "hidden_dim": md["hidden_dim"],
        "num_layers": md["num_layers"],
        "layerscope": {
            **source_info(run, variant),
            "site": SITE,
            "positions": "last",
            "layers": [L for L, _ in arrays],
            "captured_positions": {f"layer_{L:02d}": run.activations(L, SITE).positions for L, _ in arrays},
            "dtype": str(out_dtype(run.activations(arrays[0][0], SITE))),
            "example_ids": [ex["id"] for ex in run.examples[e0:e1]],
        },
    }


def write(run: Run, arrays: list[tuple[int, str]], dest: Path, shard_size: int = DEFAULT_SHARD_SIZE,
          variant: str | None = None) -> None:
    """Write every split's shards and metadata under ``dest``, one shard in memory at a time."""
    import torch

    for split, (e0, e1) in run.splits.items():
        d = dest / split
        n = e1 - e0
        for layer, site in arrays:
            view = run.activations(layer, site, split=split)
            ldir = d / f"layer_{layer:02d}"
            ldir.mkdir(parents=True, exist_ok=True)
            for k, a in enumerate(range(0, n, shard_size)):
                rows = last_rows(view, run.offsets, a, min(a + shard_size, n))
                # a fresh, exactly sized array: torch.save writes the tensor's whole storage
                torch.save(torch.from_numpy(np.array(rows, dtype=out_dtype(view), order="C")),
                           ldir / f"shard_{k:03d}.pt")
        write_json(d / "metadata.json", split_metadata(run, split, arrays, shard_size, variant))
