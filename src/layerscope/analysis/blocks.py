"""Stored blocks widened to float32 a cache-sized chunk at a time, for the passes over every value.

numpy's float16 -> float32 cast is the slowest step of such a pass (about 1.7 ns a value on this
project's CPUs), and a whole shard widened at once also pays a page fault for every page of each
fresh temporary, then reads each temporary back from memory. Chunks of about 1 MiB widened into
one reused buffer keep the cast's output, and what is computed from it, in cache: a pass over a
shard costs about half as much.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

CHUNK_BYTES = 1 << 20
MIN_ROWS = 16  # very wide rows: a few rows at a time still, so that numpy's per-call cost stays small


def chunks(block: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """(c0, c1, x) over ``block``'s rows: x holds rows [c0, c1) as float32, in a buffer the next chunk
    overwrites (copy what must outlive it; writing into it is fine)."""
    n, width = block.shape
    step = max(MIN_ROWS, CHUNK_BYTES // (4 * max(width, 1)))
    buf = np.empty((min(step, n), width), np.float32)
    for c0 in range(0, n, step):
        c1 = min(c0 + step, n)
        x = buf[:c1 - c0]
        np.copyto(x, block[c0:c1], casting="unsafe")
        yield c0, c1, x


def square_norms(squares: np.ndarray) -> np.ndarray:
    """L2 norm of every row from its float32 squares, summed in float64 (a 4096-wide float32 sum
    loses digits otherwise); a row with a NaN (infinity) gets NaN (infinity)."""
    return np.sqrt(squares.sum(1, dtype=np.float64))


def block_norms(x: np.ndarray) -> np.ndarray:
    """``square_norms`` of a float32 block."""
    return square_norms(np.square(x))
