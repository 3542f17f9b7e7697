"""Layer groups chained by their residual stream.

A capture job for layers ``a..b`` starts from the residual stream entering layer ``a``, which
the job below wrote for the same part of the examples, and writes the stream entering ``b + 1``
for the job above. Boundaries hold the real tokens of the part's examples (ragged, flat, in
example order) in the model's compute dtype, so a chain of jobs computes exactly what one whole
forward pass does.

A boundary is a safetensors file (one tensor ``hidden`` [tokens, hidden] plus string metadata),
streamed batch by batch into a temporary file and renamed into place when complete: any
safetensors reader can open it, and no pickle is involved.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from layerscope.errors import IncompleteRunError
from layerscope.fileio import PendingFile
from layerscope.store.layout import STORAGE_DTYPES, make_layout
from layerscope.store.rows import span_names, span_tokens

FORMAT = "layerscope-boundary-1"
# safetensors dtype names, and the numpy dtype that holds each one's bytes (bfloat16 as raw bits).
ST_DTYPES = {"float32": ("F32", np.float32), "float16": ("F16", np.float16), "bfloat16": ("BF16", np.uint16)}


def boundary_path(results: str | os.PathLike, layer: int, part: int | str, variant: str = "") -> Path:
    """The residual stream entering ``layer`` for ``part`` of the examples (of ``variant``, where
    it is not the main one)."""
    return Path(results) / "boundaries" / f"L{layer:02d}_part{part}{'.' + variant if variant else ''}.safetensors"


def part_examples(offsets: np.ndarray, widths: set[int], dtype: str, parts: int,
                  store_cfg: dict[str, Any], part: int,
                  spans: Sequence[dict[str, Any] | None] | None = None) -> list[tuple[int, int]]:
    """The examples a part's jobs compute, whatever they capture: sorted, disjoint [start, end) ranges.

    A part of an array is a whole number of shards, so its rows can begin or end inside an
    example, and arrays of other widths or position modes split differently. Every job of a
    part computes the examples of every layout an array could have in this run (one row per
    example, one per token, or one per token of each span the examples record in ``spans``, each
    of ``widths``), so its boundary serves every job above it, including ones for layers, sites
    or positions added later. The ranges are kept apart rather than spanned: a part's ``last``
    rows and its ``all`` rows can lie far apart in the data set.
    """
    n_ex = len(offsets) - 1
    itemsize = STORAGE_DTYPES[dtype].itemsize
    layouts = [np.arange(n_ex + 1), np.asarray(offsets)]
    layouts += [span_tokens(name, offsets, spans)[0] for name in sorted(span_names(spans or []))]
    ranges = []
    for width in sorted(widths):
        for rows in layouts:
            lay = make_layout(int(rows[-1]), width, itemsize, parts, store_cfg["chunk_mib"], store_cfg["shard_mib"])
            r0, r1 = lay.part_range(part)
            if r0 >= r1:
                continue
            # the examples holding rows [r0, r1): from the one holding r0 to the last starting before r1
            ranges.append((int(np.searchsorted(rows, r0, side="right")) - 1, int(np.searchsorted(rows, r1, side="left"))))
    merged: list[tuple[int, int]] = []
    for e0, e1 in sorted(ranges):
        if merged and e0 <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e1))
        else:
            merged.append((e0, e1))
    return merged


def _header(n_tokens: int, hidden: int, dtype: str, meta: dict[str, Any]) -> bytes:
    st, np_dtype = ST_DTYPES[dtype]
    nbytes = n_tokens * hidden * np.dtype(np_dtype).itemsize
    head = {"hidden": {"dtype": st, "shape": [n_tokens, hidden], "data_offsets": [0, nbytes]},
            "__metadata__": {"format": FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}}
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def _starts_with(path: Path, head: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(head)) == head


class BoundaryWriter(PendingFile):
    """Streams the residual stream of a part's examples into a boundary file, rows at their token offset."""

    def __init__(self, path: str | os.PathLike, n_tokens: int, hidden: int, dtype: str, meta: dict[str, Any],
                 partial: str | os.PathLike | None = None) -> None:
        """``partial``: where to write it until complete, keeping the rows a killed attempt wrote there
        (``self.resumed`` says whether it did; a file of another shape or header starts over)."""
        super().__init__(path, tmp=partial)
        self.hidden, self.dtype = hidden, dtype
        self.itemsize = np.dtype(ST_DTYPES[dtype][1]).itemsize
        header = _header(n_tokens, hidden, dtype, meta)
        self.base = len(header)
        size = self.base + n_tokens * hidden * self.itemsize
        self.resumed = partial is not None and os.fstat(self.fd).st_size == size and _starts_with(self.tmp, header)
        if not self.resumed:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, header, 0)
            os.ftruncate(self.fd, size)

    def write(self, t0: int, rows) -> None:
        """Write ``rows`` (a CPU tensor [n, hidden] in the boundary dtype) at token ``t0`` of the part."""
        import torch

        if rows.dtype == torch.bfloat16:
            rows = rows.view(torch.int16)
        data = memoryview(rows.contiguous().numpy()).cast("B")
        off = self.base + t0 * self.hidden * self.itemsize
        while data.nbytes:
            n = os.pwrite(self.fd, data, off)
            data, off = data[n:], off + n

    close = PendingFile.commit


class Boundary:
    """A boundary file, memory-mapped: rows of its part's examples, by token offset within the part."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                head = json.loads(f.read(n))
            spec = head["hidden"]
            meta = head["__metadata__"]
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
        except (OSError, ValueError, KeyError, struct.error) as e:
            raise IncompleteRunError(f"{self.path}: not a readable LayerScope boundary ({e}); delete it and re-run")
        self.meta = {k: json.loads(v) for k, v in meta.items() if k != "format"}
        self.dtype = next(k for k, (st, _) in ST_DTYPES.items() if st == spec["dtype"])
        tokens, self.hidden = spec["shape"]
        self._data = np.memmap(self.path, dtype=ST_DTYPES[self.dtype][1], mode="r", offset=8 + n,
                               shape=(tokens, self.hidden)) if tokens else np.zeros((0, self.hidden))

    def check(self, **expected: Any) -> None:
        """Refuse a boundary written for other examples, another layer or another model shape."""
        for k, v in expected.items():
            if self.meta.get(k) != v:
                raise IncompleteRunError(
                    f"{self.path}: boundary was written for {k}={self.meta.get(k)!r}, this job needs {v!r} "
                    "(a stale file from another configuration); delete it and re-run")

    def rows(self, t0: int, t1: int):
        """Rows [t0, t1) as a torch tensor in the boundary's dtype (a copy, safe to move to a device)."""
        import torch

        block = torch.from_numpy(np.array(self._data[t0:t1]))
        return block.view(torch.bfloat16) if self.dtype == "bfloat16" else block
