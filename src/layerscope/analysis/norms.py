"""L2 norms of the residual-stream sites, per token, per example and per split.

One pass over each (layer, site) array gives the norm of every row; everything the heatmaps
show is derived from those norms: the token x layer view of a few examples, the norm at each
example's last token (the layer x example view, defined for ``last`` and ``all`` captures
alike), and per-split means, by position for ``all`` captures and at the last token for both.
A span capture (``response``) counts as a token capture whose tokens outside the span, its last
token among them, are missing (NaN, left out of means).
The same summaries of ``||a - b||``, two variants of a run on the same tokens (adapter and base),
give the difference view (``diff_norms``).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

from layerscope.analysis.blocks import block_norms, chunks
from layerscope.store.reader import Run

NORM_SITES = ("resid_post", "attn_out", "mlp_out")


def row_norms(acts) -> np.ndarray:
    """float32 L2 norm of every row of an Activations view, shard by shard (NaN rows stay NaN)."""
    out = np.empty(acts.shape[0], dtype=np.float32)
    for (r0, r1), block in acts.iter_shards():  # rows relative to the view
        for c0, c1, x in chunks(block):
            out[r0 + c0:r0 + c1] = block_norms(x)
    return out


def diff_row_norms(a, b) -> np.ndarray:
    """float32 L2 norm of every row of ``a - b``, two views of the same rows (variants of a run),
    block by block (a's shards)."""
    out = np.empty(a.shape[0], dtype=np.float32)
    for (r0, r1), block in a.iter_shards():
        out[r0:r1] = block_norms(np.asarray(block, dtype=np.float32) - np.asarray(b.rows(r0, r1), dtype=np.float32))
    return out


def diff_norms(run: Run, other: Run, site: str, token_examples: list[int],
               columns: list[int]) -> dict[str, Any] | None:
    """``site_norms`` of ``||run - other||`` (two variants, same tokens) at the layers both hold at the
    same positions, labelled for the page; None where they share none."""
    layers = [L for L, s in run.arrays if s == site and (L, s) in other.arrays
              and run.activations(L, s).positions == other.activations(L, s).positions]
    out = site_norms(run, site, token_examples, columns, layers=layers,
                     norms_of=lambda L: diff_row_norms(run.activations(L, site), other.activations(L, site)))
    if out is not None:
        a, b = run.variant, other.variant
        out.update(label=f"{site}: {a} \u2212 {b}", unit=f"L2 norm of ({a} \u2212 {b}) at {site}", diff=[a, b])
    return out


def site_norms(run: Run, site: str, token_examples: list[int], columns: list[int], layers: list[int] | None = None,
               norms_of: Callable[[int], np.ndarray] | None = None) -> dict[str, Any] | None:
    """Norm summaries of one site over every layer that captured it, or ``layers`` (None if none).
    ``norms_of(layer)`` gives the per-row norms (default: of the array itself).

    ``layers``/``positions``: the layers and each one's positions; ``last``: [layers, columns]
    norm at the last token of the ``columns`` examples; ``split_last``: {split: [layers]} mean of
    that over every example of the split; for the layers with a row per token (``token_layers``:
    ``all``, or a span, NaN at the tokens outside it): ``tokens``, per token example a
    [token_layers, tokens] array, and ``split_pos``/``pos_count``: {split: [token_layers,
    positions]} mean norm at each position over the split's examples that reach it (with a value
    there), and their count in the layer that has most.
    """
    if layers is None:
        layers = [L for L, s in run.arrays if s == site]
    if not layers:
        return None
    offsets = run.offsets
    n_ex = len(offsets) - 1
    lengths = np.diff(offsets)
    width = int(lengths.max()) if n_ex else 0
    columns_a = np.asarray(columns, dtype=np.int64)
    positions, last, split_last = [], [], {s: [] for s in run.splits}
    token_layers: list[int] = []
    tokens: list[list[np.ndarray]] = [[] for _ in token_examples]
    split_pos: dict[str, list[np.ndarray]] = {s: [] for s in run.splits}
    pos_count: dict[str, np.ndarray] = {}
    pos_of: dict[str, np.ndarray] = {}  # positions mode -> each row's position in its example
    for L in layers:
        acts = run.activations(L, site)
        rows = acts.map
        norms = row_norms(acts) if norms_of is None else norms_of(L)
        positions.append(acts.positions)
        if acts.per_token:  # at the example's last token, where the array holds it (a span may not)
            held = rows.rows_of(offsets[1:] - 1)
            at_last = np.where(held >= 0, norms[np.maximum(held, 0)] if len(norms) else np.nan, np.nan)
        else:  # the example's one row: its last token, or its answer position
            at_last = norms
        last.append(at_last[columns_a])
        for s, (a, b) in run.splits.items():
            with warnings.catch_warnings():  # a split whose every value is missing: NaN, said once here
                warnings.simplefilter("ignore", RuntimeWarning)
                split_last[s].append(float(np.nanmean(at_last[a:b])) if b > a else np.nan)
        if not acts.per_token:
            continue
        token_layers.append(L)
        if acts.positions not in pos_of:
            pos_of[acts.positions] = rows.positions_of(np.arange(rows.n_rows))
        pos_of_row = pos_of[acts.positions]
        for i, e in enumerate(token_examples):  # every token of the example, NaN where not captured
            t = np.full(int(lengths[e]), np.nan, np.float32)
            r0, r1 = rows.offsets[e], rows.offsets[e + 1]
            t[pos_of_row[r0:r1]] = norms[r0:r1]
            tokens[i].append(t)
        for s, (a, b) in run.splits.items():
            r0, r1 = rows.offsets[a], rows.offsets[b]
            ok = np.isfinite(norms[r0:r1])
            p = pos_of_row[r0:r1][ok]
            count = np.bincount(p, minlength=width)
            total = np.bincount(p, weights=norms[r0:r1][ok], minlength=width)
            with np.errstate(invalid="ignore", divide="ignore"):
                split_pos[s].append((total / count).astype(np.float32))
            # the examples reaching each position in any layer: a span layer reaches fewer
            pos_count[s] = np.maximum(pos_count.get(s, 0), count).astype(np.int64)
    out: dict[str, Any] = {"layers": layers, "positions": positions, "last": np.array(last, dtype=np.float32),
                           "split_last": {s: np.array(v, dtype=np.float32) for s, v in split_last.items()}}
    if token_layers:
        out.update(token_layers=token_layers, tokens=[np.array(t, dtype=np.float32) for t in tokens],
                   split_pos={s: np.array(v, dtype=np.float32) for s, v in split_pos.items()}, pos_count=pos_count)
    return out
