"""Per-neuron statistics for the neuron index and neuron cards, shard by shard.

``scan`` reads a (layer, site) array once and keeps, per neuron: the largest and smallest value,
mean and standard deviation, the mean of each split, and the k examples with the highest (lowest)
activation, one entry per example (an example's value is its maximum (minimum) over its tokens),
and, asked for, the L2 norm of every row (a norm site's heatmap: one read of the array for both).
``histograms`` and ``contexts`` then read only what the neurons that get a card need. NaN and
infinite values (float16 overflow) are left out of every statistic.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from layerscope.analysis.blocks import chunks, square_norms
from layerscope.store.reader import Run


@dataclass
class Scan:
    """What one pass over a (layer, site) array keeps: [width] vectors, [splits, width] per-split
    means, [width, k] top/bottom example values and indices (best first; -1 where fewer), and the
    rows' norms (float32, as norms.row_norms gives them) where asked for, else None."""

    max: np.ndarray
    min: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    split_mean: np.ndarray
    top_v: np.ndarray
    top_e: np.ndarray
    bot_v: np.ndarray
    bot_e: np.ndarray
    norms: np.ndarray | None = None

    def selectivity(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per neuron, the split whose mean is highest and (its mean - the other splits' mean) / sd:
        how strongly the neuron picks out one split (0 with one split or a constant neuron)."""
        sm = np.nan_to_num(self.split_mean.astype(np.float64))
        best = np.argmax(sm, axis=0)
        if len(sm) < 2:
            return best, np.zeros(sm.shape[1], np.float32)
        w = counts.astype(np.float64)[:, None]
        total = (sm * w).sum(0)
        best_mean = np.take_along_axis(sm, best[None], 0)[0]
        best_w = w[best, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            rest = (total - best_mean * best_w) / (w.sum() - best_w)
            sel = np.where(self.sd > 0, (best_mean - rest) / self.sd, 0.0)
        return best, np.nan_to_num(sel).astype(np.float32)


def _merge_best(best_v: np.ndarray | None, best_e: np.ndarray | None, v: np.ndarray, e: np.ndarray,
                k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """The k best of a running [k', width] best and new [n, width] candidates (one row per example)."""
    e = np.broadcast_to(e[:, None], v.shape)
    if best_v is not None:
        v, e = np.concatenate([best_v, v]), np.concatenate([best_e, e])
    fill = -np.inf if largest else np.inf
    v = np.where(np.isnan(v), fill, v)
    if len(v) > k:
        key = -v if largest else v
        idx = np.argpartition(key, k - 1, axis=0)[:k]
        # argpartition takes any of the values tied with the k-th (examples sharing a prompt prefix
        # tie exactly): where one was left out, take the lowest examples, as _ordered breaks ties
        picked = np.take_along_axis(key, idx, 0)
        kth = picked.max(0)
        for j in np.flatnonzero((key == kth).sum(0) != (picked == kth).sum(0)):
            idx[:, j] = np.lexsort((e[:, j], key[:, j]))[:k]
        v, e = np.take_along_axis(v, idx, 0), np.take_along_axis(e, idx, 0)
    return v, np.ascontiguousarray(e)


def scan(run: Run, acts, k: int, norms: bool = False) -> Scan:
    """One pass over ``acts`` (a whole-run Activations view): see the module docstring."""
    width = acts.width
    splits = list(run.splits.values())
    rows = acts.map
    bounds = [(int(rows.offsets[a]), int(rows.offsets[b])) for a, b in splits]
    s1 = np.zeros((len(splits), width)); s2 = np.zeros(width); cnt = np.zeros((len(splits), width))
    mx = np.full(width, -np.inf, np.float32); mn = np.full(width, np.inf, np.float32)
    top = bot = (None, None)
    carry: tuple[int, np.ndarray, np.ndarray] | None = None  # an example that may go on in the next shard
    norm_rows = np.empty(acts.shape[0], np.float32) if norms else None
    for (r0, r1), block in acts.iter_shards():
        ex = rows.examples(r0, r1)
        starts = np.flatnonzero(np.diff(ex, prepend=-1))
        ends = np.append(starts[1:], r1 - r0)
        seg_e = ex[starts]
        # per example (per row where there is one row an example) its extremes over its rows
        hi_v = np.empty((len(starts) if acts.per_token else r1 - r0, width), np.float32)
        lo_v = np.empty_like(hi_v) if acts.per_token else hi_v
        for c0, c1, x in chunks(block):
            g0, g1 = r0 + c0, r0 + c1
            sq = np.square(x)
            if norm_rows is not None:
                norm_rows[g0:g1] = square_norms(sq)
            # a NaN or an infinity makes its column's float64 sum non-finite: mask only then
            total = x.sum(0, dtype=np.float64)
            clean = bool(np.isfinite(total).all())
            if not clean:
                finite = np.isfinite(x)
                x[~finite] = np.nan
            for i, (a, b) in enumerate(bounds):
                lo, hi = max(a, g0), min(b, g1)
                if lo >= hi:
                    continue
                if clean:  # the common case: plain sums, float64 accumulators, no NaN masking
                    whole = hi - lo == g1 - g0
                    s1[i] += total if whole else x[lo - g0:hi - g0].sum(0, dtype=np.float64)
                    s2 += sq[lo - g0:hi - g0].sum(0, dtype=np.float64)
                    cnt[i] += hi - lo
                else:
                    part = x[lo - g0:hi - g0]
                    s1[i] += np.nansum(part, 0, dtype=np.float64)
                    s2 += np.nansum(np.square(part, dtype=np.float64), 0)
                    cnt[i] += np.count_nonzero(finite[lo - g0:hi - g0], 0)
            if not acts.per_token:
                hi_v[c0:c1] = x
                continue
            # one reduction per example piece: ~15x faster than ufunc.reduceat along axis 0
            big, small = (np.max, np.min) if clean else (np.fmax.reduce, np.fmin.reduce)
            for j in range(np.searchsorted(starts, c0, "right") - 1, np.searchsorted(starts, c1, "left")):
                a, b = max(starts[j], c0), min(ends[j], c1)
                if a == starts[j]:  # the example's first piece
                    hi_v[j], lo_v[j] = big(x[a - c0:b - c0], 0), small(x[a - c0:b - c0], 0)
                else:
                    np.fmax(hi_v[j], big(x[a - c0:b - c0], 0), out=hi_v[j])
                    np.fmin(lo_v[j], small(x[a - c0:b - c0], 0), out=lo_v[j])
        mx = np.fmax(mx, np.fmax.reduce(hi_v, 0))  # the extremes of the per-example extremes
        mn = np.fmin(mn, np.fmin.reduce(lo_v, 0))
        if carry is not None and carry[0] == seg_e[0]:
            hi_v[0], lo_v[0] = np.fmax(hi_v[0], carry[1]), np.fmin(lo_v[0], carry[2])
        elif carry is not None:
            top = _merge_best(*top, carry[1][None], np.array([carry[0]]), k, True)
            bot = _merge_best(*bot, carry[2][None], np.array([carry[0]]), k, False)
        carry = (int(seg_e[-1]), hi_v[-1].copy(), lo_v[-1].copy())
        if len(seg_e) > 1:
            top = _merge_best(*top, hi_v[:-1], seg_e[:-1], k, True)
            bot = _merge_best(*bot, lo_v[:-1], seg_e[:-1], k, False)
    if carry is not None:
        top = _merge_best(*top, carry[1][None], np.array([carry[0]]), k, True)
        bot = _merge_best(*bot, carry[2][None], np.array([carry[0]]), k, False)
    n = cnt.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1.sum(0) / n
        sd = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
        split_mean = s1 / cnt
    return Scan(mx, mn, mean.astype(np.float32), sd.astype(np.float32), split_mean.astype(np.float32),
                *_ordered(*top, width, True), *_ordered(*bot, width, False), norm_rows)


def _ordered(v: np.ndarray | None, e: np.ndarray | None, width: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """[width, k] values and examples, best first, ties by example; examples without a value dropped (-1)."""
    if v is None:
        return np.zeros((width, 0), np.float32), np.zeros((width, 0), np.int64)
    v, e = v.T, e.T
    order = np.lexsort((e, -v if largest else v), axis=1)
    v, e = np.take_along_axis(v, order, 1), np.take_along_axis(e, order, 1).astype(np.int64)
    e[~np.isfinite(v)] = -1  # an example whose every value is NaN/inf
    return v.astype(np.float32), e


def pick_cards(scan: Scan, sel: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` neurons that get a card, best first: alternately the next by largest activation and
    by selectivity, so that both orders of the index start with neurons that have cards."""
    by_max = np.argsort(-np.nan_to_num(scan.max, nan=-np.inf), kind="stable")
    by_sel = np.argsort(-np.abs(sel), kind="stable")
    out: dict[int, None] = {}
    for a, b in zip(by_max, by_sel):
        if len(out) >= n:
            break
        out.setdefault(int(a))
        if len(out) < n:
            out.setdefault(int(b))
    return np.fromiter(out, dtype=np.int64, count=len(out))  # rank order: a page budget keeps the first


def histograms(acts, cols: np.ndarray, lo: np.ndarray, hi: np.ndarray, bins: int) -> np.ndarray:
    """[len(cols), bins] counts of each column's finite values in ``bins`` equal bins over [lo, hi]."""
    counts = np.zeros(len(cols) * bins, np.int64)
    if not len(cols):
        return counts.reshape(0, bins)
    lo = np.asarray(lo, np.float64)
    scale = bins / np.where(hi > lo, hi - lo, 1.0).astype(np.float64)
    which = np.arange(len(cols)) * bins
    for _, block in acts.iter_shards():
        for _, _, x in chunks(np.take(block, cols, axis=1)):
            t = (x - lo) * scale  # float64: a value's bin as numpy.histogram computes it, up to rounding
            ok = np.isfinite(t)
            every = bool(ok.all())
            b = t.astype(np.int64) if every else np.floor(np.where(ok, t, 0)).astype(np.int64)
            np.clip(b, 0, bins - 1, out=b)
            b += which
            counts += np.bincount(b.ravel() if every else b[ok], minlength=len(cols) * bins)
    return counts.reshape(len(cols), bins)


def range_samples(run: Run, acts, cards: np.ndarray, ranges: int) -> np.ndarray:
    """sae_vis's samples across activation ranges: for each card, [ranges] examples (-1: none), the
    first example (lowest index) whose peak, its maximum over its tokens, falls in each of
    ``ranges`` equal slices of [lowest peak, highest peak] of that neuron."""
    n_ex = len(run.offsets) - 1
    out = np.full((len(cards), ranges), -1, np.int64)
    if not len(cards) or not n_ex:
        return out
    peaks = np.empty((n_ex, len(cards)), np.float64)
    for e in range(n_ex):
        x = np.asarray(acts.example(e)[..., cards], dtype=np.float64)  # the cards' columns, then widen
        peaks[e] = np.nanmax(np.atleast_2d(x), axis=0) if np.isfinite(x).any() else np.nan
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):  # a neuron without a value (no rows): no sample
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanmin(peaks, axis=0), np.nanmax(peaks, axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        b = np.floor((np.nan_to_num(peaks, nan=-np.inf) - lo) / span * ranges)
    b = np.clip(np.nan_to_num(b, nan=-1.0, neginf=-1.0), -1, ranges - 1).astype(np.int64)
    for c in range(len(cards)):
        for r in range(ranges):
            hit = np.flatnonzero(b[:, c] == r)
            if len(hit):
                out[c, r] = hit[0]
    return out


def contexts(run: Run, acts, cards: np.ndarray, examples: np.ndarray, largest: bool,
             context: int) -> dict[tuple[int, int], dict[str, Any]]:
    """For each card c and each example listed in ``examples[c]`` (-1: none), the token where the
    neuron peaks (``largest``) or dips, and its values over ``context`` tokens each side:
    {(c, j): {"e", "pos", "value", "start", "values"}} (``values`` float32, NaN where not captured)."""
    wanted: dict[int, list[tuple[int, int]]] = {}
    for c in range(len(cards)):
        for j, e in enumerate(examples[c]):
            if e >= 0:
                wanted.setdefault(int(e), []).append((c, j))
    out = {}
    rows = acts.map
    for e, uses in sorted(wanted.items()):
        x = np.atleast_2d(acts.example(e))  # the example's rows: every token, a span's, or its one row
        n_tok = int(run.offsets[e + 1] - run.offsets[e])
        at = rows.positions_of(np.arange(rows.offsets[e], rows.offsets[e + 1]))  # each row's token
        # one series per use (its card's neuron over the example's tokens), all uses of the example at once
        cols = np.asarray(x[:, cards[[c for c, _ in uses]]], dtype=np.float32).T
        series = np.full((len(uses), n_tok), np.nan, np.float32)
        series[:, at] = np.where(np.isfinite(cols), cols, np.nan)
        if acts.per_token:
            peaks = np.nanargmax(series, axis=1) if largest else np.nanargmin(series, axis=1)
        else:
            peaks = np.full(len(uses), at[0])
        for (c, j), s, pos in zip(uses, series, peaks.tolist()):
            a, b = max(0, pos - context), min(n_tok, pos + context + 1)
            out[(c, j)] = {"e": e, "pos": pos, "value": float(s[pos]), "start": a, "values": s[a:b]}
    return out


def card_entries(run: Run, acts, cards: np.ndarray, top_e: np.ndarray, bot_e: np.ndarray, context: int,
                 doc: Callable[[int, int, int], int], range_e: np.ndarray | None = None
                 ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The examples shown on cards, columnar: for card c, its top (``kind`` 0, from ``top_e[c]``),
    bottom (``kind`` 1, ``bot_e[c]``) and activation-range samples (``kind`` 2, ``range_e[c]``, at
    their peak) examples (-1: none), each with ``doc`` (``doc(e, start, end)``
    names the span of tokens shown), ``pos`` (the peak's token in it), ``value`` and ``ctx_off`` into
    the returned context values (one float32 per token of the span, NaN where not captured)."""
    cols: dict[str, list] = {k: [] for k in ("card", "kind", "doc", "pos", "value", "ctx_off")}
    ctx: list[np.ndarray] = []
    n_ctx = 0
    lists = [(top_e, True), (bot_e, False)] + ([(range_e, True)] if range_e is not None else [])
    for kind, (ex, largest) in enumerate(lists):
        found = contexts(run, acts, cards, ex, largest, context)
        for (c, _), f in sorted(found.items()):
            d = doc(f["e"], f["start"], f["start"] + len(f["values"]))
            for name, v in (("card", c), ("kind", kind), ("doc", d), ("pos", f["pos"] - f["start"]),
                            ("value", f["value"]), ("ctx_off", n_ctx)):
                cols[name].append(v)
            ctx.append(f["values"])
            n_ctx += len(f["values"])
    entries = {k: np.array(v, np.float32 if k == "value" else np.int64) for k, v in cols.items()}
    return entries, np.concatenate(ctx).astype(np.float32) if ctx else np.zeros(0, np.float32)


def token_top(acts, examples: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` most active neurons at each token of ``examples`` (rows concatenated in order):
    ids and values, [tokens, n] each, highest first."""
    ids, vals = [], []
    for e in examples:
        x = np.nan_to_num(np.asarray(acts.example(e), dtype=np.float32), nan=-np.inf)
        m = min(n, x.shape[1])
        # partition first: sorting every neuron of every token costs ~10x more
        part = np.argpartition(-x, m - 1, axis=1)[:, :m] if m < x.shape[1] else np.argsort(-x, axis=1)
        v = np.take_along_axis(x, part, 1)
        order = np.lexsort((part, -v), axis=1)  # highest first, ties by neuron id
        ids.append(np.take_along_axis(part, order, 1))
        vals.append(np.take_along_axis(v, order, 1))
    width = min(n, acts.width)
    return (np.concatenate(ids) if ids else np.zeros((0, width), np.int64),
            np.concatenate(vals) if vals else np.zeros((0, width), np.float32))
