"""Reading back: LayerScope's reader against numpy on the same bytes.

Writes, through LayerScope's own shard writer and layout, a ``last`` array
([examples, hidden]) and an ``all`` array ([tokens, hidden] plus offsets), and the same data
as .npy files; then measures, interleaved and repeated:

  layer     one whole layer into memory        reader .numpy()   vs numpy.load
  last1000  1000 random rows of a last array   reader .take()    vs np.memmap fancy indexing
  all100    the rows of 100 random examples    reader [i]        vs np.memmap slices by offsets

and, for reference, zarr-python's own reads of the same arrays. The reader checks the array's
completion marker on every read, as it does in an opened run. Prints a table, then one JSON
line with medians and ``speed = numpy time / reader time`` per case.

    python benchmarks/read.py [--examples 20000] [--hidden 4096] [--tokens 50000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from layerscope.capture.router import ArrayJob, BufferPool, Router
from layerscope.store.reader import Activations, PartMarkers
from layerscope.store.rows import array_rows
from layerscope.store.shards import chunk_encoder
from layerscope.store.layout import array_metadata, make_layout, marker_path
from layerscope.store.writer import ShardWriter

STORE = {"chunk_mib": 2, "shard_mib": 64, "compression": "none", "compression_level": 3}


def write_array(d: Path, data: np.ndarray, positions: str) -> Path:
    lay = make_layout(data.shape[0], data.shape[1], 2, 1, STORE["chunk_mib"], STORE["shard_mib"])
    d.mkdir(parents=True)
    attrs = {"layer": 0, "site": "resid_post", "positions": positions, "parts": 1}
    (d / "zarr.json").write_bytes(array_metadata(lay, "float16", STORE, attrs, ("row", "hidden")))
    w = ShardWriter(threads=0)
    r = Router(ArrayJob(0, "resid_post", positions, lay, 0, lay.rows, array_dir=d), BufferPool(torch.float16, False),
               w, chunk_encoder(STORE, 2))
    step = 65536
    for g0 in range(0, lay.rows, step):
        r.add(g0, torch.from_numpy(data[g0:g0 + step]))
    r.done()
    w.close()
    marker = marker_path(d.parents[1], 0, "resid_post", 0, positions)
    marker.parent.mkdir()
    marker.write_text(json.dumps({"part": 0, "job": "bench"}))
    return d


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=20000)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if min(args.examples, args.hidden, args.tokens, args.repeats) < 1 or args.examples < 1000:
        ap.error("--examples must be at least 1000, the others at least 1")
    scratch = Path(args.out or tempfile.mkdtemp(prefix="ls-read-"))
    try:
        return run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args, scratch: Path) -> int:
    rng = np.random.default_rng(0)
    H = args.hidden
    last = rng.standard_normal((args.examples, H), dtype=np.float32).astype(np.float16)
    lengths = rng.integers(16, 512, size=max(1, args.tokens // 264))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    alltok = rng.standard_normal((int(offsets[-1]), H), dtype=np.float32).astype(np.float16)
    # laid out as a store: STORE_ROOT/layer_00/resid_post/parts/0-POSITIONS.json marks the part done
    last_dir = write_array(scratch / "last" / "layer_00" / "resid_post", last, "last")
    all_dir = write_array(scratch / "all" / "layer_00" / "resid_post", alltok, "all")
    np.save(scratch / "last.npy", last)
    np.save(scratch / "all.npy", alltok)
    del alltok
    za, zl = zarr.open_array(str(all_dir), mode="r"), zarr.open_array(str(last_dir), mode="r")
    acts_last = Activations(zl, array_rows("last", np.arange(args.examples + 1)), 0, args.examples, array_dir=last_dir,
                            markers=PartMarkers(scratch / "last", "layer_00/resid_post", ["bench"], "last"))
    acts_all = Activations(za, array_rows("all", offsets), 0, len(lengths), array_dir=all_dir,
                           markers=PartMarkers(scratch / "all", "layer_00/resid_post", ["bench"], "all"))
    assert acts_last._direct is not None and acts_all._direct is not None
    mm_last = np.load(scratch / "last.npy", mmap_mode="r")
    mm_all = np.load(scratch / "all.npy", mmap_mode="r")

    cases = {
        "layer": {"reader": lambda: acts_all.numpy(), "numpy": lambda: np.load(scratch / "all.npy"),
                  "zarr": lambda: za[:]},
        "last1000": {"reader": lambda: acts_last.take(idx_last), "numpy": lambda: mm_last[idx_last],
                     "zarr": lambda: zl.get_orthogonal_selection((idx_last, slice(None)))},
        "all100": {"reader": lambda: [acts_all[int(i)] for i in idx_all],
                   "numpy": lambda: [np.array(mm_all[offsets[i]:offsets[i + 1]]) for i in idx_all],
                   "zarr": lambda: [za[offsets[i]:offsets[i + 1]] for i in idx_all]},
    }
    # correctness first: the reader returns exactly what numpy does
    idx_last = rng.choice(args.examples, 1000, replace=False)
    idx_all = rng.choice(len(lengths), 100, replace=False)
    assert np.array_equal(cases["last1000"]["reader"](), cases["last1000"]["numpy"]())
    assert all(np.array_equal(a, b) for a, b in zip(cases["all100"]["reader"](), cases["all100"]["numpy"]()))
    times = {c: {m: [] for m in fns} for c, fns in cases.items()}
    for rep in range(args.repeats):
        idx_last = rng.choice(args.examples, 1000, replace=False)
        idx_all = rng.choice(len(lengths), 100, replace=False)
        for c, fns in cases.items():
            methods = list(fns)
            methods = methods[rep % 3:] + methods[:rep % 3]  # interleaved order
            for m in methods:
                times[c][m].append(timed(fns[m]))
    result = {"examples": args.examples, "hidden": H, "tokens": int(offsets[-1]), "repeats": args.repeats}
    print(f"{'case':<9} {'method':<7} {'median s':>9} {'min':>8} {'max':>8}")
    for c in cases:
        med = {m: statistics.median(v) for m, v in times[c].items()}
        for m, v in times[c].items():
            print(f"{c:<9} {m:<7} {med[m]:9.4f} {min(v):8.4f} {max(v):8.4f}")
        result[c] = {"median_s": {m: round(v, 5) for m, v in med.items()},
                     "spread_s": {m: [round(min(v), 5), round(max(v), 5)] for m, v in times[c].items()},
                     "speed": round(med["numpy"] / med["reader"], 3),
                     "zarr_speed": round(med["numpy"] / med["zarr"], 3)}
        print(f"{c:<9} reader speed vs numpy {result[c]['speed']:.3f}  (zarr-python: {result[c]['zarr_speed']:.3f})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
