"""Compare two runs (or variants) captured on the same tokens: per layer x site x split.

    rows = compare("results/base", "results/tuned", positions="last")

For each array both runs hold and each split (or the whole run: ``by_split=False``), but LoRA
arrays of different ranks (the LoRA neurons of two adapters, which do not pair up), over the
vectors a_i (run A) and b_i (run B) at the chosen positions (``last``: each example's last token;
``all``: every token; ``answer``: each example's answer position, where a prompted pass read the
model's answer, the last token elsewhere; a span, ``prompt``, ``response``, ``role:NAME``: the
span's tokens; see store/rows.py). An array takes part where it holds every token compared:

- ``cosine``: mean over i of cos(a_i, b_i) (1 where both are zero, 0 where one is);
- ``rel_l2``: sqrt(sum ||a_i - b_i||^2) / sqrt(sum ||a_i||^2), the relative L2 distance of the
  whole split, so that a few near-zero vectors cannot dominate it;
- ``norm_a``, ``norm_b``: mean ||a_i||, mean ||b_i||; ``norm_change`` = mean(||b_i|| - ||a_i||)
  and ``norm_change_rel`` = that over mean ||a_i||.

Everything accumulates in float64, block by block, so memory stays bounded whatever the run.

Runs must hold the same tokens, with one exception: at ``answer`` positions only the tokens up to
and with each example's answer position must agree. A prompted pass that generates appends the
model's own reply to each prompt, so a base and a fine-tuned run differ in their tokens after it;
the activations at the answer position, in a causal model, depend on the prompt alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from layerscope.data.dataset import load_answer_index
from layerscope.errors import LayerScopeError
from layerscope.models.adapters import LORA_SITES, split_site
from layerscope.store.reader import Activations, Run
from layerscope.store.rows import RowMap, is_span
from layerscope.store.variants import open_ref

POSITIONS = ("last", "all", "answer")  # and any span (store/rows.py)
BLOCK_BYTES = 16 << 20  # float64 rows held per side at once
TOKEN_BLOCK = 1 << 22  # token ids compared at once


@dataclass
class CompareRow:
    layer: int
    site: str
    split: str | None  # None: every example of the run (by_split=False)
    positions: str
    n: int  # vectors compared: examples ("last") or tokens ("all", a span)
    cosine: float
    rel_l2: float
    norm_a: float
    norm_b: float
    norm_change: float
    norm_change_rel: float

    def to_json(self) -> dict[str, Any]:
        """The row with NaN/inf as None, which JSON cannot spell."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _as_run(run: Run | str | os.PathLike) -> Run:
    return run if isinstance(run, Run) else open_ref(run)[0]


def _describe(run: Run, e: int) -> str:
    ex = run.examples[e]
    return f"example {e} (id {ex['id']!r}, split {ex['split']!r})"


def check_same_tokens(a: Run, b: Run) -> None:
    """Raise LayerScopeError naming the first example whose tokens differ between the runs."""
    oa, ob = a.offsets, b.offsets
    n = min(len(oa), len(ob)) - 1
    longer = np.flatnonzero(np.diff(oa[:n + 1]) != np.diff(ob[:n + 1]))
    first = int(longer[0]) if longer.size else (n if len(oa) != len(ob) else None)
    # Up to the first length difference the offsets agree, so the flat token axes line up.
    end = int(oa[first]) if first is not None else int(oa[-1])
    ids_a, ids_b = a.group["tokens/ids"], b.group["tokens/ids"]
    token = None
    for t0 in range(0, end, TOKEN_BLOCK):
        t1 = min(t0 + TOKEN_BLOCK, end)
        diff = np.flatnonzero(ids_a[t0:t1] != ids_b[t0:t1])
        if diff.size:
            token = t0 + int(diff[0])
            first = int(np.searchsorted(oa, token, side="right")) - 1
            break
    if first is None:
        if a.splits != b.splits:
            raise LayerScopeError(f"{a.path} and {b.path} hold the same tokens but group them into different "
                                  f"splits ({a.splits} vs {b.splits}); compare needs the same splits")
        return
    if first >= n:
        has, lacks = (a, b) if len(oa) > len(ob) else (b, a)
        raise LayerScopeError(f"runs differ in tokens: {_describe(has, first)} is in {has.path} only "
                              f"({len(a)} examples in {a.path}, {len(b)} in {b.path}); compare needs the same tokens")
    what = _describe(a, first)
    if b.examples[first]["id"] != a.examples[first]["id"]:
        what += f" / id {b.examples[first]['id']!r} in {b.path}"
    if token is not None:
        pos = token - int(oa[first])
        detail = f"token {pos} is {int(ids_a[token])} in {a.path} and {int(ids_b[token])} in {b.path}"
    else:
        detail = f"{int(oa[first + 1] - oa[first])} tokens in {a.path}, {int(ob[first + 1] - ob[first])} in {b.path}"
    raise LayerScopeError(f"runs differ in tokens: first at {what}: {detail}; compare needs the same tokens")


def answer_index(run: Run) -> np.ndarray:
    """Per example, the index within it of its answer position (a prompted pass's
    ``dataset/answer_index.npy``; the last token for any other run)."""
    return load_answer_index(run.path / "dataset", run.offsets)


def check_same_prompts(a: Run, b: Run, ia: np.ndarray, ib: np.ndarray) -> None:
    """Raise LayerScopeError naming the first example whose tokens up to and with its answer position
    (``ia``, ``ib``: indices within each example) differ between the runs; what follows may differ."""
    if len(a) != len(b):
        has = a if len(a) > len(b) else b
        raise LayerScopeError(f"runs differ in examples: {_describe(has, min(len(a), len(b)))} is in {has.path} only "
                              f"({len(a)} examples in {a.path}, {len(b)} in {b.path}); compare needs the same prompts")
    oa, ob = a.offsets, b.offsets
    ids_a, ids_b = a.group["tokens/ids"], b.group["tokens/ids"]
    e = 0
    while e < len(a):  # blocks of examples holding at most TOKEN_BLOCK tokens in each run
        f = e + 1
        while f < len(a) and max(oa[f + 1] - oa[e], ob[f + 1] - ob[e]) <= TOKEN_BLOCK:
            f += 1
        xa, xb = ids_a[int(oa[e]):int(oa[f])], ids_b[int(ob[e]):int(ob[f])]
        for k in range(e, f):
            pa, pb = xa[oa[k] - oa[e]:oa[k] - oa[e] + ia[k] + 1], xb[ob[k] - ob[e]:ob[k] - ob[e] + ib[k] + 1]
            if ia[k] != ib[k] or not np.array_equal(pa, pb):
                what = _describe(a, k)
                if b.examples[k]["id"] != a.examples[k]["id"]:
                    what += f" / id {b.examples[k]['id']!r} in {b.path}"
                diff = np.flatnonzero(pa[:len(pb)] != pb[:len(pa)])
                detail = (f"token {int(diff[0])} is {int(pa[diff[0]])} in {a.path} and {int(pb[diff[0]])} in {b.path}"
                          if diff.size else f"the answer is read at token {int(ia[k])} in {a.path} and "
                                            f"{int(ib[k])} in {b.path}")
                raise LayerScopeError(f"runs differ in their prompts: first at {what}: {detail}; comparing at the "
                                      "answer position needs the same tokens up to it")
        e = f
    if a.splits != b.splits:
        raise LayerScopeError(f"{a.path} and {b.path} hold the same prompts but group them into different "
                              f"splits ({a.splits} vs {b.splits}); compare needs the same splits")


def compared_arrays(a: Run, b: Run, layers: Sequence[int] | None = None, sites: Sequence[str] | None = None
                    ) -> tuple[list[tuple[int, str]], list[tuple[int, str]], list[tuple[int, str]]]:
    """(arrays in both, only in A, only in B), restricted to ``layers`` and ``sites`` when given."""
    want_layers = None if layers is None else {a.layer_index(L) for L in layers}

    def keep(arrays: list[tuple[int, str]]) -> set[tuple[int, str]]:
        return {(L, s) for L, s in arrays
                if (want_layers is None or L in want_layers) and (sites is None or s in sites)}

    sa, sb = keep(a.arrays), keep(b.arrays)
    return sorted(sa & sb), sorted(sa - sb), sorted(sb - sa)


def unpaired(a: Run, b: Run, arrays: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    """The LoRA arrays among ``arrays`` that differ in width between the runs: the sites of two
    adapters of different ranks (a run's variants of more adapters), with no vectors to pair."""
    return [(L, s) for L, s in arrays if split_site(s)[0] in LORA_SITES
            and a.activations(L, s).width != b.activations(L, s).width]


def _wanted(run: Run, positions: str) -> RowMap:
    """The tokens compared: every token, each example's last or answer token, or a span's."""
    return run.rows(positions)


def _blocks(view: Activations, rows: np.ndarray) -> Iterator[np.ndarray]:
    """The view's ``rows`` (view-relative, increasing) in bounded float64 blocks: a contiguous run
    of rows read as one range, any other picked row by row."""
    step = max(1, BLOCK_BYTES // (8 * view.width))
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        r0 = int(rows[0])
        for r in range(r0, r0 + len(rows), step):
            yield view.rows(r, min(r + step, r0 + len(rows))).astype(np.float64)
        return
    for i in range(0, len(rows), step):
        yield view.take(rows[i:i + step]).astype(np.float64)


def _held(layer: int, site: str, run: Run, view: Activations, want: RowMap, positions: str) -> np.ndarray:
    """The rows of ``view`` (the whole run's) holding the tokens compared; refuses an array that
    leaves some out, naming the first."""
    rows = view.map.rows_of(want.tokens)
    missing = np.flatnonzero(rows < 0)
    if not missing.size:
        return rows
    name = f"layer_{layer:02d}/{site}"
    held = f"{view.positions} position{'s' if is_span(view.positions) else ''}"
    if positions == "all":
        raise LayerScopeError(f"{name} holds the {held} only in {run.path}; compare it with --positions "
                              f"{view.positions}, or leave it out (--layers/--sites)")
    e = int(want.examples_of(missing[:1])[0])
    if is_span(positions):
        what = f"leaves out {positions} token {int(want.positions_of(missing[:1])[0])} of {_describe(run, e)}"
    else:
        what = (f"that is not the {positions} position of {_describe(run, e)} (a prompted pass that generates "
                "reads its answer before the reply)")
    raise LayerScopeError(f"{name} holds the {held} only in {run.path}, and {what}; compare it with --positions "
                          f"{view.positions}, or leave it out (--layers/--sites)")


def _row(layer: int, site: str, split: str | None, positions: str, va: Activations, vb: Activations,
         rows_a: np.ndarray, rows_b: np.ndarray) -> CompareRow:
    n = 0
    cos = sq_diff = sq_a = norm_a = norm_b = 0.0
    for xa, xb in zip(_blocks(va, rows_a), _blocks(vb, rows_b), strict=True):
        na, nb = np.linalg.norm(xa, axis=1), np.linalg.norm(xb, axis=1)
        dot = np.einsum("ij,ij->i", xa, xb)
        denom = na * nb
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), (na == nb).astype(np.float64))
        n += len(xa)
        cos += float(c.sum())
        sq_diff += float(np.square(xa - xb).sum())
        sq_a += float(np.square(na).sum())
        norm_a += float(na.sum())
        norm_b += float(nb.sum())
    nan = float("nan")
    if not n:  # a split without a row at these positions (a span none of its examples has): nothing to say
        return CompareRow(layer, site, split, positions, 0, nan, nan, nan, nan, nan, nan)

    def div(x: float, y: float) -> float:
        return x / y if y else (0.0 if x == 0 else nan)

    mean_a, mean_b = div(norm_a, n), div(norm_b, n)
    return CompareRow(layer, site, split, positions, n, div(cos, n), div(math.sqrt(sq_diff), math.sqrt(sq_a)),
                      mean_a, mean_b, mean_b - mean_a, div(mean_b - mean_a, mean_a))


def check_same_spans(a: Run, b: Run, wa: RowMap, wb: RowMap, positions: str) -> None:
    """Two runs of the same tokens compared at a span must record the same span."""
    if np.array_equal(wa.offsets, wb.offsets) and np.array_equal(wa.tokens, wb.tokens):
        return
    diff = np.flatnonzero(np.diff(wa.offsets) != np.diff(wb.offsets))
    e = int(diff[0]) if diff.size else int(wa.examples_of(np.flatnonzero(wa.tokens != wb.tokens)[:1])[0])
    raise LayerScopeError(f"{a.path} and {b.path} hold the same tokens but record different {positions} spans: "
                          f"first at {_describe(a, e)}; compare needs the same tokens")


def compare(run_a: Run | str | os.PathLike, run_b: Run | str | os.PathLike, positions: str = "last",
            layers: Sequence[int] | None = None, sites: Sequence[str] | None = None,
            splits: Sequence[str] | None = None, by_split: bool = True) -> list[CompareRow]:
    """One row per layer x site both runs hold, per split (``splits``: all by default), or over
    the whole run (``by_split=False``: one row per layer x site, ``split`` None); LoRA arrays of
    different widths in the two (two adapters' ranks, see ``unpaired``) are left out.

    Runs are Run objects or ``RUN[:VARIANT]`` references. ``positions="last"`` compares each
    example's last token (from ``last`` or ``all`` arrays alike); ``"answer"`` each example's
    answer position (from ``answer`` or ``all`` arrays, or ``last`` arrays where it is the last
    token); ``"all"`` every token, which needs ``all`` arrays in both runs; a span (``response``)
    its tokens, from ``all`` arrays or arrays captured at a span that holds them. An array
    missing a compared token is refused, naming it. Refuses runs whose tokens differ (at
    ``answer``: whose tokens up to the answer position differ).
    """
    if positions not in POSITIONS and not is_span(positions):
        raise LayerScopeError(f"positions must be one of {', '.join(POSITIONS)}, or a span (prompt, response, "
                              f"role:NAME), not {positions!r}")
    a, b = _as_run(run_a), _as_run(run_b)
    want_a, want_b = _wanted(a, positions), _wanted(b, positions)
    if positions == "answer":
        check_same_prompts(a, b, want_a.tokens - a.offsets[:-1], want_b.tokens - b.offsets[:-1])
    else:
        check_same_tokens(a, b)
        check_same_spans(a, b, want_a, want_b, positions)
    both, only_a, only_b = compared_arrays(a, b, layers, sites)
    skipped = unpaired(a, b, both)
    both = [x for x in both if x not in skipped]
    if not both:
        raise LayerScopeError(f"{a.path} and {b.path} share no layer x site to compare (A has "
                              f"{_names(only_a) or 'none selected'}; B has {_names(only_b) or 'none selected'}"
                              + (f"; LoRA arrays of different ranks: {_names(skipped)}" if skipped else "") + ")")
    names = list(a.splits) if splits is None else list(splits)
    for s in names:
        if s not in a.splits:
            raise LayerScopeError(f"{a.path}: no split {s!r} (splits: {', '.join(a.splits)})")
    plan = []
    for layer, site in both:
        va, vb = a.activations(layer, site), b.activations(layer, site)
        if va.width != vb.width:
            raise LayerScopeError(f"layer_{layer:02d}/{site} is {va.width} wide in {a.path} and {vb.width} in "
                                  f"{b.path}: not the same model shape")
        plan.append((layer, site, _held(layer, site, a, va, want_a, positions),
                     _held(layer, site, b, vb, want_b, positions)))
    rows = []
    for layer, site, held_a, held_b in plan:
        for s in (names if by_split else [None]):
            e0, e1 = a.splits[s] if s is not None else (0, len(a))
            va, vb = a.activations(layer, site, split=s), b.activations(layer, site, split=s)
            ra = held_a[want_a.offsets[e0]:want_a.offsets[e1]] - va.row_range[0]
            rb = held_b[want_b.offsets[e0]:want_b.offsets[e1]] - vb.row_range[0]
            rows.append(_row(layer, site, s, positions, va, vb, ra, rb))
    return rows


def _names(arrays: list[tuple[int, str]]) -> str:
    return ", ".join(f"layer_{L:02d}/{s}" for L, s in arrays)
