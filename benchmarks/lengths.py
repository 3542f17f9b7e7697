"""Batching by length: a capture of mixed-length examples in data set order vs batched by length.

Examples of lengths drawn log-uniformly between ``--min-len`` and ``--max-len`` (the shape of
real chat and document data), the ``llama-512`` model (hidden 512, 8 layers), resid_post at
every layer and position, float16. For ``capture.length_window`` 1 (data set order) and each
of ``--windows``, interleaved and repeated in one process, prints the median capture time,
the padding share of the batches, and the speed-up over data set order; then one JSON line.

    python benchmarks/lengths.py [--sequences 128] [--repeats 3] [--windows 8 32]
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

from layerscope.capture.batches import padding, plan_windows
from layerscope.capture.run import run_capture
from layerscope.data.dataset import _save_npy
from layerscope.models.loading import fetch, load_model, parse_ref


def make_dataset(d: Path, n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lens = np.exp(rng.uniform(np.log(lo), np.log(hi), size=n)).astype(np.int64)
    offsets = np.r_[0, np.cumsum(lens)].astype(np.int64)
    d.mkdir(parents=True, exist_ok=True)
    _save_npy(d / "token_ids.npy", rng.integers(16, vocab, size=int(offsets[-1])).astype(np.int32))
    _save_npy(d / "offsets.npy", offsets)
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--windows", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="builtin:llama-512")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        m = fetch(parse_ref({"id": args.model}), scratch / "model")
        manifest = {"model": m, "adapter": None}
        model, tok = load_model(manifest, args.device, "float32")
        ds = make_dataset(scratch / "dataset", args.sequences, args.min_len, args.max_len, model.config.vocab_size)
        offsets = np.load(ds / "offsets.npy")
        L, n = m["num_layers"], args.sequences
        captures = [(i, "resid_post", "all") for i in range(L)]
        windows = [1] + args.windows
        times: dict[int, list[float]] = {w: [] for w in windows}
        for rep in range(args.repeats):
            for w in windows[rep % len(windows):] + windows[:rep % len(windows)]:
                params = {"block": [0, L - 1], "dtype": "float16", "batch_size": args.batch_size, "length_window": w,
                          "padding_side": "right", "parts": 1, "model_dtype": "float32", "trust_remote_code": False,
                          "store": {"chunk_mib": 2, "shard_mib": 64, "compression": "none", "compression_level": 3}}
                target = scratch / f"w{w}"
                shutil.rmtree(target, ignore_errors=True)
                t = time.perf_counter()
                run_capture(manifest, ds, target, params, 0, captures, device=args.device, group=f"w{w}",
                            loaded=(model, tok))
                times[w].append(time.perf_counter() - t)
                shutil.rmtree(target, ignore_errors=True)
    base = statistics.median(times[1])
    result = {"device": args.device, "model": args.model, "sequences": n, "tokens": int(offsets[-1]),
              "batch_size": args.batch_size, "repeats": args.repeats, "windows": {}}
    print(f"{'window':>6} {'median s':>9} {'min':>7} {'max':>7} {'padding':>8} {'speed-up':>9}")
    for w in windows:
        med = statistics.median(times[w])
        pad = padding(plan_windows([(0, n)], offsets, args.batch_size, w), offsets, args.batch_size)[0]
        result["windows"][w] = {"median_s": round(med, 3), "padding": round(pad, 4), "speedup": round(base / med, 3)}
        print(f"{w:>6} {med:9.3f} {min(times[w]):7.3f} {max(times[w]):7.3f} {100 * pad:7.1f}% {base / med:9.2f}x")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
