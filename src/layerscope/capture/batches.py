"""Which examples go into which batch: windows of consecutive examples, batched by length.

Padding costs compute for nothing; batching examples of similar length cuts it, while the rows
still reach the store in data set order (routers take a window's rows in any order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Window:
    """Consecutive examples [e0, e1) of span ``span``, run as batches of similar length: each
    batch holds the examples it holds in data set order, and its rows reach the store in place."""

    span: int
    e0: int
    e1: int
    batches: list[np.ndarray]


def plan_windows(spans: list[tuple[int, int]], offsets: np.ndarray, batch_size: int, window: int) -> list[Window]:
    """Cut each span into windows of ``window`` batches and batch each window's examples by length.

    Only the examples and settings decide the batches (never what a job captures), so every
    job layout computes the same rows from the same batches. ``window`` 1 keeps data set order.
    """
    lens = np.diff(offsets)
    out = []
    for sa, sb in spans:
        for w0 in range(sa, sb, window * batch_size):
            w1 = min(w0 + window * batch_size, sb)
            order = w0 + np.argsort(-lens[w0:w1], kind="stable")  # longest first: memory peaks at the start
            out.append(Window(sa, w0, w1, [np.sort(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]))
    return out


def padding(windows: list[Window], offsets: np.ndarray, bs: int) -> tuple[float, float]:
    """The share of batch positions that are padding: in the batches the job runs, and in
    batches taken in data set order."""
    lens = np.diff(offsets)
    real = sum(int(lens[b].sum()) for w in windows for b in w.batches)
    if not real:
        return 0.0, 0.0
    ran = sum(int(lens[b].max()) * len(b) for w in windows for b in w.batches)
    in_order = sum(int(lens[b0:min(b0 + bs, w.e1)].max()) * (min(b0 + bs, w.e1) - b0)
                   for w in windows for b0 in range(w.e0, w.e1, bs))
    return 1 - real / ran, 1 - real / in_order


def batch_arrays(token_ids: np.ndarray, offsets: np.ndarray, examples: np.ndarray, pad_id: int, left: bool):
    lens = (offsets[examples + 1] - offsets[examples]).astype(np.int64)
    T = int(lens.max())
    ids = np.full((len(examples), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(examples), T), dtype=np.int64)
    for k, e in enumerate(examples):
        row = token_ids[offsets[e]:offsets[e + 1]]
        sl = slice(T - len(row), T) if left else slice(0, len(row))
        ids[k, sl] = row
        mask[k, sl] = 1
    return ids, mask, lens


def runs(examples: np.ndarray, offsets: np.ndarray) -> list[tuple[int, int, int, int]]:
    """A batch's examples as runs of consecutive ones: (first example, batch index of it,
    first and end row of the run in the batch's flat real tokens)."""
    cut = np.flatnonzero(np.diff(examples) != 1) + 1
    runs, flat = [], 0
    for k0, k1 in zip(np.r_[0, cut], np.r_[cut, len(examples)]):
        e0, e1 = int(examples[k0]), int(examples[k1 - 1]) + 1
        n = int(offsets[e1] - offsets[e0])
        runs.append((e0, int(k0), flat, flat + n))
        flat += n
    return runs
