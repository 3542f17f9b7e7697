"""What every export format shares: choosing arrays, staging the output directory so that a
killed export never looks finished, streaming ``.npy`` files, and bounded reads of a run."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from layerscope.errors import LayerScopeError
from layerscope.store.reader import Activations, Run

BLOCK_BYTES = 32 << 20  # activation bytes read or built at once
TOKEN_BLOCK = 1 << 22  # token ids read at once


def select_arrays(run: Run, fmt: str, layers: Sequence[int] | None, sites: Sequence[str] | None,
                  format_sites: Sequence[str] | None = None) -> list[tuple[int, str]]:
    """The (layer, site) arrays to export, in order. ``format_sites`` are the only sites the format
    has a place for (None: any). Refuses other sites, and layers or sites the run does not hold."""
    if sites is not None and format_sites is not None:
        for s in sites:
            if s not in format_sites:
                raise LayerScopeError(f"{fmt} has a place only for {', '.join(format_sites)}, not {s!r}: "
                                      "use --format npy for other sites")
    want_sites = list(sites) if sites is not None else (list(format_sites) if format_sites is not None else None)
    for s in want_sites or []:
        if s not in run.sites:
            raise LayerScopeError(f"{run.path}: no {s} arrays to export as {fmt} (the run stores "
                                  f"{', '.join(run.sites)})")
    want_layers = None if layers is None else [run.layer_index(L) for L in layers]
    arrays = [(L, s) for L, s in run.arrays
              if (want_sites is None or s in want_sites) and (want_layers is None or L in want_layers)]
    for L in want_layers or []:
        if all(x != L for x, _ in arrays):
            raise LayerScopeError(f"{run.path}: nothing to export at layer {L} "
                                  f"(layers with {'/'.join(want_sites or run.sites)}: "
                                  f"{sorted({x for x, s in run.arrays if want_sites is None or s in want_sites})})")
    return arrays


def check_split_names(run: Run, fmt: str, reserved: Sequence[str] = ()) -> None:
    """Formats with a directory per split need split names that are plain directory names, other
    than the files the format keeps beside them (``reserved``)."""
    for name in run.splits:
        if name in ("", ".", "..", *reserved) or any(c in name for c in "/\\\0"):
            raise LayerScopeError(f"{run.path}: split {name!r} cannot be a directory name, which {fmt} "
                                  "needs; use --format npy, whose index holds the splits")


def check_out(run: Run, out: Path, force: bool) -> Path:
    """The absolute output directory; refuses one that would replace the run or a non-empty one without force."""
    out = Path(os.path.abspath(out))
    real, src = Path(os.path.realpath(out)), Path(os.path.realpath(run.path))
    if real == src or real in src.parents:
        raise LayerScopeError(f"--out {out} holds the run itself; choose a directory outside {src}")
    if out.exists() and not out.is_dir():
        raise LayerScopeError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LayerScopeError(f"--out {out} exists and is not empty; pass --force to replace it")
    return out


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out`` that replaces it only once the block succeeds: a killed
    or failed export leaves ``out`` as it was (and, if killed, a hidden ``.NAME.export-*`` to delete)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        yield tmp
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 would make the export private
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class NpyWriter:
    """A ``.npy`` file written front to back in blocks, so no array is ever whole in memory;
    ``np.load`` reads it like one written by ``np.save``."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype | str) -> None:
        self.path, self.shape, self.dtype = Path(path), tuple(int(x) for x in shape), np.dtype(dtype)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._f, header)
        self._left = int(np.prod(self.shape, dtype=np.int64))

    def write(self, block: np.ndarray) -> None:
        if block.dtype != self.dtype:
            raise TypeError(f"{self.path}: block of {block.dtype}, file of {self.dtype}")
        if block.size > self._left:
            raise ValueError(f"{self.path}: more values than its shape {self.shape}")
        self._f.write(np.ascontiguousarray(block).data)
        self._left -= block.size

    def close(self) -> None:
        self._f.close()
        if self._left:
            raise ValueError(f"{self.path}: {self._left} values short of its shape {self.shape}")


def narrow(x: np.ndarray, dtype: np.dtype | str, what: str, fmt: str) -> np.ndarray:
    """``x`` as ``dtype``; refuses values that are finite in the run but would overflow to inf."""
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    with np.errstate(over="ignore"):
        y = x.astype(dtype)
    bad = int(np.count_nonzero(np.isinf(y) & np.isfinite(x)))
    if bad:
        raise LayerScopeError(f"{what}: {bad} values beyond {dtype}'s range, which {fmt} stores; "
                              "use --format npy, which keeps the run's own precision")
    return y


def out_dtype(view: Activations) -> np.dtype:
    """The dtype values leave the reader in: bfloat16 is widened (exactly) to float32."""
    return np.dtype(np.float32) if view.dtype == "bfloat16" else np.dtype(view.dtype)


def last_rows(view: Activations, offsets: np.ndarray, a: int, b: int) -> np.ndarray:
    """Examples [a, b) of the view at their last token, from any array that holds it (``last``,
    ``all``, a span that reaches it); refuses one that leaves it out."""
    return view.take(view.rows_at(offsets[view.e0 + a + 1:view.e0 + b + 1] - 1, "the last token"))


def example_blocks(offsets: np.ndarray, e0: int, e1: int, per_example_bytes: int | np.ndarray,
                   budget: int | None = None) -> Iterator[tuple[int, int]]:
    """Consecutive example ranges [a, b) within [e0, e1) of at most ``budget`` bytes each (default
    BLOCK_BYTES; at least one example)."""
    budget = BLOCK_BYTES if budget is None else budget
    sizes = np.broadcast_to(np.asarray(per_example_bytes, dtype=np.int64), (e1 - e0,))
    a = e0
    while a < e1:
        total, b = 0, a
        while b < e1 and (b == a or total + sizes[b - e0] <= budget):
            total += int(sizes[b - e0])
            b += 1
        yield a, b
        a = b


def token_blocks(run: Run, e0: int, e1: int) -> Iterator[tuple[int, np.ndarray]]:
    """(example index, token ids) for examples [e0, e1), reading the ids in bounded blocks."""
    off = run.offsets
    ids = run.group["tokens/ids"]
    lengths = np.diff(off[e0:e1 + 1])
    for a, b in example_blocks(off, e0, e1, lengths * 4, TOKEN_BLOCK * 4):
        block = ids[int(off[a]):int(off[b])]
        for e in range(a, b):
            yield e, block[int(off[e] - off[a]):int(off[e + 1] - off[a])]


def source_info(run: Run, variant: str | None) -> dict[str, Any]:
    """Where an export came from, for the formats that have room to say so."""
    md = run.metadata
    return {"run": str(Path(os.path.abspath(run.path))), "variant": variant,
            "model_revision": md.get("model_revision"),
            "adapter": (md.get("adapter") or {}).get("name"), "layerscope_version": md.get("layerscope_version")}
