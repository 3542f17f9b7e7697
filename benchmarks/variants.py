"""Paired variants: base and adapter from one load vs two separate captures.

The ``llama-512`` model (hidden 512, 8 layers) with the built-in LoRA adapter (q/v/down, r 4),
``--sequences`` x 256 tokens, resid_post at every layer and position, float16, one block. In one
process, interleaved and repeated, each timed from the model load on (what a job pays):

  paired    one capture job with ``variants`` base + adapter: one load, two passes per batch
  adapter   a capture job of the adapter's model alone (load + one pass)
  base      a capture job of the model alone (load + one pass)

Prints the medians, ``ratio = paired / (adapter + base)`` (the issue's target: <= 0.6 on CPU)
and the share of a separate job that is loading; then one JSON line. A separate workflow job
also pays its process start and imports (about 5 s here, see benchmarks/workflow.py), which
``--job-overhead`` adds to each separate job and to the paired one once.

    python benchmarks/variants.py [--sequences 32] [--repeats 3] [--job-overhead 0]
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

from layerscope.capture.partial import load_block
from layerscope.capture.run import run_capture
from layerscope.data.dataset import _save_npy
from layerscope.models.loading import fetch, parse_ref


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--job-overhead", type=float, default=0.0, help="seconds a workflow job pays before loading")
    ap.add_argument("--model", default="builtin:llama-512")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        m = fetch(parse_ref({"id": args.model}), scratch / "model")
        a = fetch(parse_ref({"id": "builtin:lora", "seed": 1}), scratch / "adapter", what="adapter", base_dir=m["path"])
        n, seq = args.sequences, args.seq_len
        ds = scratch / "dataset"
        ds.mkdir()
        rng = np.random.default_rng(0)
        _save_npy(ds / "token_ids.npy", rng.integers(16, 1000, size=n * seq).astype(np.int32))
        _save_npy(ds / "offsets.npy", np.arange(0, n * seq + 1, seq, dtype=np.int64))
        L = m["num_layers"]
        captures = [(i, "resid_post", "all") for i in range(L)]
        params = {"block": [0, L - 1], "dtype": "float16", "batch_size": 8, "length_window": 8, "padding_side": "right",
                  "parts": 1, "model_dtype": "float32", "trust_remote_code": False,
                  "store": {"chunk_mib": 2, "shard_mib": 64, "compression": "none", "compression_level": 3}}
        times: dict[str, list[float]] = {"paired": [], "adapter": [], "base": [], "load": []}
        for rep in range(args.repeats):
            order = ["paired", "adapter", "base", "load"]
            for method in order[rep % 4:] + order[:rep % 4]:
                out = scratch / f"out-{method}"
                shutil.rmtree(out, ignore_errors=True)
                t = time.perf_counter()
                if method == "paired":
                    run_capture({"model": m, "adapter": a}, ds, out / "a.zarr", params, 0, captures, device="cpu",
                                group="paired", variants={"base": {"store_root": out / "b.zarr", "captures": captures}})
                elif method == "load":
                    load_block({"model": m, "adapter": a}, "cpu", "float32", False, 0, L - 1)
                else:
                    run_capture({"model": m, "adapter": a if method == "adapter" else None}, ds, out / "s.zarr",
                                params, 0, captures, device="cpu", group=method)
                times[method].append(time.perf_counter() - t)
                shutil.rmtree(out, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    o = args.job_overhead
    ratio = (med["paired"] + o) / (med["adapter"] + med["base"] + 2 * o)
    result = {"model": args.model, "tokens": n * seq, "repeats": args.repeats, "job_overhead_s": o,
              "median_s": {k: round(v, 3) for k, v in med.items()}, "ratio": round(ratio, 3),
              "load_share": round(med["load"] / med["adapter"], 3)}
    for k, v in times.items():
        print(f"{k:<8} median {med[k]:7.3f} s  (min {min(v):.3f}, max {max(v):.3f})")
    print(f"paired / (adapter + base) = {ratio:.3f}; loading is {100 * result['load_share']:.0f}% of a separate job")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
