"""``python -m layerscope export RUN[:VARIANT] --format seed001|seed004|npy --out DIR``.

Reads through the public reader (``layerscope.open``), so an unfinished or re-running store is
refused; checks everything the format cannot hold before writing a byte; writes into a hidden
temporary directory beside ``--out`` and renames it into place at the end, so ``--out`` is
either the old directory or the whole export, never a part of one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from layerscope.errors import LayerScopeError
from layerscope.interop import npy, seed001, seed004
from layerscope.interop.common import check_out, select_arrays, staged_dir
from layerscope.store.reader import Run
from layerscope.store.variants import open_ref

FORMATS = ("seed001", "seed004", "npy")


def export(run: Run | str | os.PathLike, fmt: str, out: str | os.PathLike, *, layers: Sequence[int] | None = None,
           sites: Sequence[str] | None = None, force: bool = False, shard_size: int = seed001.DEFAULT_SHARD_SIZE,
           padding: str = "left") -> Path:
    """Export ``run`` (a Run or ``RUN[:VARIANT]``) as ``fmt`` into ``out``; returns the output directory.

    ``layers`` (negative counts from the model's last) and ``sites`` restrict what is written; the
    seed formats hold the residual stream (``resid_post``) only. seed004 writes a run's prompted
    passes, one directory each, where it has them (see interop/seed004.py), else its splits. ``shard_size`` (examples per
    shard) is seed001's; ``padding`` (``left``/``right``) is seed004's.
    """
    if fmt not in FORMATS:
        raise LayerScopeError(f"unknown export format {fmt!r} (formats: {', '.join(FORMATS)})")
    run, variant = (run, None) if isinstance(run, Run) else open_ref(run)
    passes = seed004.passes_of(run, variant) if fmt == "seed004" else []
    if passes:  # seed 004's own experiment: one directory per prompted pass
        plan = seed004.check_passes(passes, layers, sites, padding)
    elif fmt == "npy":
        arrays = select_arrays(run, fmt, layers, sites)
    else:
        arrays = select_arrays(run, fmt, layers, sites, format_sites=(seed001.SITE,))
    if fmt == "seed001":
        seed001.check(run, arrays, shard_size)
    elif fmt == "seed004" and not passes:
        seed004.check(run, arrays, padding)
    dest = check_out(run, Path(out), force)
    with staged_dir(dest) as tmp:
        if fmt == "seed001":
            seed001.write(run, arrays, tmp, shard_size=shard_size, variant=variant)
        elif passes:
            seed004.write_passes(run, plan, tmp, padding=padding, variant=variant)
        elif fmt == "seed004":
            seed004.write(run, arrays, tmp, padding=padding, variant=variant)
        else:
            npy.write(run, arrays, tmp, variant=variant)
    return dest
