"""Plain ``.npy`` files, for anyone with numpy:

    OUT/index.json                   what is where (below)
    OUT/layer_XX.SITE.npy            one per array: [examples, width] ("last") or [tokens, width] ("all"),
                                     or [span tokens, width] (a span, "response")
    OUT/offsets.npy                  int64 [examples + 1]: example i is rows offsets[i]:offsets[i+1] of "all" files
    OUT/rows.SPAN.offsets.npy        (arrays at a span) the same for its files; rows.SPAN.tokens.npy: each
                                     row's token, an index into token_ids.npy
    OUT/token_ids.npy                int32 [tokens]: the token ids, in the same order
    OUT/examples.jsonl               one record per example, row order (the run's examples.jsonl)

Values keep the run's dtype (float16 or float32); bfloat16, which ``.npy`` cannot spell, is
widened to float32 exactly. ``index.json`` lists each file's layer, site, positions, shape and
dtype, and each split's example and token ranges (and, under ``spans``, each span's files and
row ranges), so ``np.load(..., mmap_mode="r")[a:b]`` reads a split.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from layerscope.fileio import write_json
from layerscope.interop import common
from layerscope.interop.common import NpyWriter, out_dtype, source_info
from layerscope.store.reader import Run
from layerscope.store.rows import RowMap, is_span

FORMAT = "layerscope-npy/1"


def file_name(layer: int, site: str) -> str:
    return f"layer_{layer:02d}.{site}.npy"


def write(run: Run, arrays: list[tuple[int, str]], dest: Path, variant: str | None = None) -> None:
    """Write the arrays, token ids, offsets, examples and index under ``dest``, in bounded blocks."""
    off = run.offsets
    np.save(dest / "offsets.npy", off.astype(np.int64))
    ids = run.group["tokens/ids"]
    tok = NpyWriter(dest / "token_ids.npy", (int(off[-1]),), np.int32)
    for t in range(0, int(off[-1]), common.TOKEN_BLOCK):
        tok.write(np.asarray(ids[t:min(t + common.TOKEN_BLOCK, int(off[-1]))], dtype=np.int32))
    tok.close()
    with open(dest / "examples.jsonl", "w", encoding="utf-8") as f:
        for ex in run.examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    entries, spans = [], {}
    for layer, site in arrays:
        view = run.activations(layer, site)
        dtype = out_dtype(view)
        npy = NpyWriter(dest / file_name(layer, site), view.shape, dtype)
        step = max(1, common.BLOCK_BYTES // (view.width * dtype.itemsize))
        for r in range(0, view.shape[0], step):
            npy.write(view.rows(r, min(r + step, view.shape[0])))
        npy.close()
        entries.append({"file": file_name(layer, site), "layer": layer, "site": site, "positions": view.positions,
                        "shape": list(view.shape), "dtype": str(dtype), "run_dtype": view.dtype})
        if is_span(view.positions) and view.positions not in spans:
            spans[view.positions] = span_rows(view.map, run, dest)
    md = run.metadata
    write_json(dest / "index.json", {
        "format": FORMAT,
        **source_info(run, variant),
        "model_name": md["model_name"], "dataset_name": md["dataset_name"],
        "num_layers": md["num_layers"], "hidden_dim": md["hidden_dim"],
        "examples": len(run), "tokens": int(off[-1]),
        "splits": {s: {"examples": [e0, e1], "tokens": [int(off[e0]), int(off[e1])]}
                   for s, (e0, e1) in run.splits.items()},
        "offsets": "offsets.npy", "token_ids": "token_ids.npy", "examples_file": "examples.jsonl",
        "arrays": entries, "spans": spans,
    })


def span_rows(rows: RowMap, run: Run, dest: Path) -> dict:
    """Write where the rows of arrays at a span are (``rows.SPAN.offsets.npy``: example i's rows are
    offsets[i]:offsets[i+1]; ``rows.SPAN.tokens.npy``: each row's index into token_ids.npy) and
    return their index entry, with each split's rows."""
    stem = "rows." + re.sub(r"\W", "_", rows.positions)
    np.save(dest / f"{stem}.offsets.npy", rows.offsets)
    np.save(dest / f"{stem}.tokens.npy", rows.tokens)
    return {"offsets": f"{stem}.offsets.npy", "tokens": f"{stem}.tokens.npy",
            "splits": {s: [int(rows.offsets[e0]), int(rows.offsets[e1])] for s, (e0, e1) in run.splits.items()}}
