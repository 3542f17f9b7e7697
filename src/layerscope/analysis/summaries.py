"""Summaries for the dashboard: residual-stream norms per token x layer, and top/bottom-k tokens per neuron.

Everything is computed shard by shard, so memory stays bounded whatever the run's size.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from layerscope.store.reader import Run

log = logging.getLogger("layerscope.analysis.summaries")


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def pick_examples(run: Run, n: int) -> list[int]:
    """Up to ``n`` examples, taken round-robin across splits so that every split is represented."""
    queues = [list(range(a, b)) for a, b in run.splits.values()]
    out: list[int] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return sorted(out)


BLOCK = 16  # rows per block when pruning a shard by block maxima; small blocks keep few candidates
CHUNK_ELEMENTS = 1 << 19  # values keyed at a time: a few hundred KiB of buffers, cache-resident

# Stored dtype -> (integer type of the same width, bit pattern of +inf). A float's sign and
# magnitude bits, read as a two's complement integer (-magnitude for negative numbers), sort as the
# floats do, so every comparison below is an exact integer comparison with no float conversion.
_BITS = {"float16": (np.int16, 0x7C00), "bfloat16": (np.int16, 0x7F80), "float32": (np.int32, 0x7F800000)}


def order_keys(raw: np.ndarray, dtype: str, out: np.ndarray | None = None, tmp: np.ndarray | None = None,
               nan: bool = True) -> np.ndarray:
    """Integers that sort as the values do, with -0.0 equal to 0.0 and NaN counted as 0 (as torch.nan_to_num
    did); ``nan=False`` leaves NaN above +inf and below -inf, for a caller that checks less data for it."""
    itype, inf_bits = _BITS[dtype]
    b = raw.view(itype)
    key = np.bitwise_and(b, np.iinfo(itype).max, out=out)  # magnitude
    sign = np.right_shift(b, 8 * b.itemsize - 1, out=tmp)  # 0, or -1 for negative numbers
    key ^= sign
    key -= sign
    if nan and key.size and (key.max() > inf_bits or key.min() < -inf_bits):  # two reductions beat a mask
        key[np.abs(key) > inf_bits] = 0
    return key


def key_values(key: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values of ``order_keys`` output."""
    itype, _ = _BITS[dtype]
    utype = np.uint16 if itype is np.int16 else np.uint32
    key = key.astype(itype)
    bits = np.abs(key).astype(utype) | ((key < 0).astype(utype) << (8 * key.itemsize - 1))
    if dtype == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float16 if dtype == "float16" else np.float32).astype(np.float32)


def block_extremes(raw: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Per BLOCK rows (whole blocks only) and column, the largest and smallest ``order_keys``: [blocks, width] each.

    Keys are made a few thousand rows at a time into reused buffers: no shard-sized temporaries,
    and each pass stays in cache.
    """
    n, w = raw.shape
    nb = n // BLOCK
    itype, _ = _BITS[dtype]
    step = max(1, CHUNK_ELEMENTS // max(w * BLOCK, 1)) * BLOCK
    key, tmp = np.empty((min(step, n), w), itype), np.empty((min(step, n), w), itype)
    mx, mn = np.empty((nb, w), itype), np.empty((nb, w), itype)
    inf_bits = _BITS[dtype][1]
    for r in range(0, nb * BLOCK, step):
        m = min(step, nb * BLOCK - r)
        k = order_keys(raw[r:r + m], dtype, key[:m], tmp[:m], nan=False).reshape(m // BLOCK, BLOCK, w)
        hi, lo = mx[r // BLOCK:(r + m) // BLOCK], mn[r // BLOCK:(r + m) // BLOCK]
        for _ in range(2):
            np.max(k, axis=1, out=hi)
            np.min(k, axis=1, out=lo)
            if hi.max() <= inf_bits and lo.min() >= -inf_bits:  # NaN shows in the block extremes
                break
            k[np.abs(k) > inf_bits] = 0
    return mx, mn


def _candidates(raw: np.ndarray, dtype: str, m: np.ndarray, r0: int, k: int,
                largest: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, rows, columns) of one shard [n, width] that hold every column's k largest (smallest) entries.

    ``m`` holds the block maxima (minima). The k-th largest block maximum t is a lower bound of a
    column's k-th largest value, so only blocks whose maximum is above t, and the first k (in row
    order) whose maximum equals t, can hold its top k, ties broken by row as in a full sort; of their
    rows, only values at or above t are kept.
    """
    n, w = raw.shape
    nb = len(m)
    if nb <= k:
        return order_keys(raw, dtype).ravel(), np.repeat(np.arange(r0, r0 + n), w), np.tile(np.arange(w), n)
    t = np.partition(m, nb - k if largest else k - 1, axis=0)[nb - k if largest else k - 1]
    reach = m >= t if largest else m <= t
    beyond = m > t if largest else m < t
    over = np.flatnonzero(np.count_nonzero(reach, axis=0) > k)  # ties at t in more than k blocks
    if len(over):  # keep the first k of them
        reach[:, over] &= np.cumsum(reach[:, over], axis=0, dtype=np.int32) <= k
    bi, ci = np.nonzero(beyond | reach)
    rows = (bi[:, None] * BLOCK + np.arange(BLOCK)).ravel()
    cols = np.repeat(ci, BLOCK)
    if nb * BLOCK < n:  # rows after the last whole block are always candidates
        rows = np.concatenate([rows, np.repeat(np.arange(nb * BLOCK, n), w)])
        cols = np.concatenate([cols, np.tile(np.arange(w), n - nb * BLOCK)])
    keys = order_keys(raw[rows, cols], dtype)
    # Nothing beyond t can be in the top k (the k block maxima reach t): about k rows per column are left.
    keep = keys >= t[cols] if largest else keys <= t[cols]
    return keys[keep], rows[keep] + r0, cols[keep]


def _first_k(cols: np.ndarray, width: int, k: int) -> np.ndarray:
    """Mask of the first k entries of each column in ``cols`` (sorted by column, each column at least k)."""
    counts = np.bincount(cols, minlength=width)
    return np.arange(len(cols)) - np.repeat(np.cumsum(counts) - counts, counts) < k


def _best(keys: np.ndarray, rows: np.ndarray, cols: np.ndarray, width: int, k: int,
          largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the k largest (smallest) keys, earlier rows first among equal keys: [width, k] keys and rows.

    Each column's candidates come in increasing row order, so a stable sort on (column, key) alone
    breaks ties by row: one integer sort instead of a three-key lexsort.
    """
    bits = 8 * keys.itemsize
    oriented = (~keys if largest else keys).astype(np.int64) + (1 << (bits - 1))  # ~ reverses without overflow
    order = np.argsort((cols.astype(np.int64) << bits) | oriented, kind="stable")
    pick = order[_first_k(cols[order], width, k)]
    return keys[pick].reshape(width, k), rows[pick].reshape(width, k)


def neuron_extremes(acts, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per neuron, the k highest and k lowest values and their rows: (top_v, top_r, bot_v, bot_r), [width, k].

    Values are ordered as a full sort would order them (highest first, lowest first), equal values
    by row; NaN counts as 0. Shard by shard, with exact integer comparisons on the stored bits.
    """
    width = acts.width
    kind = acts.dtype if acts.dtype in _BITS else "float32"
    best: dict[bool, tuple[np.ndarray, np.ndarray]] = {}
    seen = 0
    for (r0, r1), block in acts.iter_shards(raw=kind == acts.dtype):
        if kind != acts.dtype:  # a dtype without a bit-order rule: compare as float32
            block = np.asarray(block, dtype=np.float32)
        extremes = block_extremes(block, kind)
        seen += r1 - r0
        kk = min(k, seen)
        for largest, m in zip((True, False), extremes):
            keys, rows, cols = _candidates(block, kind, m, r0, kk, largest)
            if largest in best:  # the running best so far competes with this shard's candidates
                bk, br = best[largest]
                keys = np.concatenate([bk.ravel(), keys])
                rows = np.concatenate([br.ravel(), rows])
                cols = np.concatenate([np.repeat(np.arange(width), bk.shape[1]), cols])
            best[largest] = _best(keys, rows, cols, width, kk, largest)
    if not best:
        empty_v, empty_r = np.zeros((width, 0), np.float32), np.zeros((width, 0), np.int64)
        return empty_v, empty_r, empty_v, empty_r
    (tk, tr), (bk, br) = best[True], best[False]
    return key_values(tk, kind), tr, key_values(bk, kind), br


def missing_heatmap(run: Run, heatmap_examples: int) -> str | None:
    """Why the run has no token x layer heatmap, naming the config keys that give one; None if it has one."""
    if heatmap_examples <= 0:
        return "No token x layer heatmap: dashboard.heatmap_examples is 0; set it above 0."
    resid = [L for L, s in run.arrays if s == "resid_post"]
    if not resid:
        return ("No token x layer heatmap: resid_post was not captured; add resid_post to capture.sites "
                "with capture.positions: all.")
    if not any(run.activations(L, "resid_post").positions == "all" for L in resid):
        return ("No token x layer heatmap: resid_post was captured at the last position only; capture it "
                "with capture.positions: all (or per layer in capture.overrides).")
    return None


def missing_neurons(run: Run, site: str) -> str | None:
    """Why the run has no neuron lists for ``site``, naming the config keys that give them; None if it has them."""
    if any(s == site for _, s in run.arrays):
        return None
    return (f"No neuron lists: {site} (dashboard.site) was not captured; add {site} to capture.sites, "
            f"or set dashboard.site to a captured site ({', '.join(run.sites) or 'none'}).")


def neuron_entries(run: Run, acts, extremes: tuple[np.ndarray, ...], neurons_per_layer: int, context: int,
                   doc: Callable[[int, int, int], int]) -> dict[str, Any] | None:
    """One layer's neuron lists: ids, and per id the top and bottom [doc, position in the doc, value]."""
    top_v, top_r, bot_v, bot_r = extremes
    if not top_v.shape[1]:  # no rows at all
        return None
    # Neurons with the largest activation range are the ones worth looking at first.
    with np.errstate(invalid="ignore", over="ignore"):
        spread = np.nan_to_num(top_v[:, 0].astype(np.float64) - bot_v[:, 0], nan=-1.0)
    ids = np.sort(np.argsort(-spread, kind="stable")[:neurons_per_layer])

    def entries(vals: np.ndarray, rows: np.ndarray) -> list[list[list[Any]]]:
        vals, rows = vals[ids], rows[ids]
        if acts.positions == "all":
            ex = np.searchsorted(run.offsets, rows, side="right") - 1
            pos = rows - run.offsets[ex]
        else:
            ex, pos = rows, run.offsets[rows + 1] - run.offsets[rows] - 1
        # the doc holds only the context window, so the page stays small for long examples
        w0 = np.maximum(0, pos - context)
        w1 = np.minimum(run.offsets[ex + 1] - run.offsets[ex], pos + context + 1)
        cols = (c.tolist() for c in (ex, w0, w1, pos, vals))
        return [[[doc(e, a, b), p - a, _finite(v)] for e, a, b, p, v in zip(*row)]  # inf shows as n/a
                for row in zip(*cols)]

    return {"ids": ids.tolist(), "top": entries(top_v, top_r), "bottom": entries(bot_v, bot_r)}


def summarize(run_dir: str, site: str = "mlp_act", top_k: int = 10, context: int = 8, neurons_per_layer: int = 64,
              heatmap_examples: int = 20, trust_remote_code: bool = False) -> dict[str, Any]:
    """Build the dashboard's summary dict (see layerscope.web.dashboard for its shape)."""
    from layerscope.fileio import read_json
    from layerscope.data.tokens import TokenTexts, load_decoder

    run = Run(run_dir)
    md = run.metadata
    pieces = TokenTexts(load_decoder(read_json(run.path / "model" / "manifest.json"), trust_remote_code))
    doc_index: dict[tuple[int, int, int], int] = {}
    docs: list[dict[str, Any]] = []
    text_index: dict[str, int] = {}
    token_cache: dict[int, list[int]] = {}

    def doc(e: int, start: int = 0, end: int | None = None) -> int:
        """Index of the doc holding tokens [start, end) of example e (the whole example by default).
        Neuron entries keep only their context window, so the page stays small for long examples."""
        if e not in token_cache:
            token_cache[e] = [text_index.setdefault(t, len(text_index)) for t in pieces(run.tokens(e))]
        toks = token_cache[e]
        key = (e, start, len(toks) if end is None else end)
        if key not in doc_index:
            ex = run.examples[e]
            doc_index[key] = len(docs)
            docs.append({"id": ex["id"], "split": ex["split"], "start": start, "toks": toks[key[1]:key[2]]})
        return doc_index[key]

    notes = {"heatmap": missing_heatmap(run, heatmap_examples), "neurons": missing_neurons(run, site)}
    for note in notes.values():
        if note:
            log.warning("%s", note)

    heatmap = None
    if notes["heatmap"] is None:
        resid_layers = [L for L, s in run.arrays if s == "resid_post" and run.activations(L, s).positions == "all"]
        chosen = pick_examples(run, heatmap_examples)
        norms: list[list[list[float | None]]] = [[[] for _ in resid_layers] for _ in chosen]
        for j, L in enumerate(tqdm(resid_layers, desc="heatmap", unit="layer", mininterval=1.0)):
            acts = run.activations(L, "resid_post")
            for i, e in enumerate(chosen):
                x = acts.example(e).astype(np.float32)
                norms[i][j] = [_finite(v) for v in np.linalg.norm(x, axis=1).tolist()]
        heatmap = {"site": "resid_post", "layers": resid_layers, "docs": [doc(e) for e in chosen], "norms": norms}

    neurons = None
    if notes["neurons"] is None:
        layers_out = {}
        for L in tqdm([L for L, s in run.arrays if s == site], desc=f"top-k {site}", unit="layer", mininterval=1.0):
            acts = run.activations(L, site)
            entries = neuron_entries(run, acts, neuron_extremes(acts, top_k), neurons_per_layer, context, doc)
            if entries is not None:
                layers_out[str(L)] = entries
        neurons = {"site": site, "k": top_k, "context": context, "layers": layers_out}

    adapter = md.get("adapter")
    meta = {"model": md["model_name"], "revision": md.get("model_revision"),
            "adapter": adapter["name"] if adapter else None, "dataset": md["dataset_name"],
            "examples": md["total_examples"], "tokens": md["total_tokens"],
            "splits": ", ".join(f"{k} ({v['examples']})" for k, v in md["splits"].items()),
            "layers": md["num_layers"], "hidden": md["hidden_dim"], "dtype": md["dtype"],
            "created": md["created"], "layerscope": md["layerscope_version"]}
    texts = list(text_index)
    log.info("summary: %d docs, %d distinct token texts", len(docs), len(texts))
    return {"title": f"LayerScope: {run.path.name}", "meta": meta, "texts": texts, "docs": docs,
            "heatmap": heatmap, "neurons": neurons, "notes": notes}
