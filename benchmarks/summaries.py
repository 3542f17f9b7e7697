"""Summaries against the capture they summarise: ``summarize`` should cost a fraction of the capture.

Builds finished run directories without Snakemake (capture, finalize, metadata, the dataset's
examples and the model manifest, as the workflow lays them out) for a model of a realistic CPU
shape (builtin:llama-512: hidden 512, intermediate 1376, 8 layers; 64 sequences x 256 tokens,
all positions, float16), and times in one process, repeated:

  capture    LayerScope's capture job plus finalize (the work ``summarize`` reads back)
  summarize  ``layerscope.analysis.summaries.summarize`` with the dashboard's default settings
  cold       the same in a fresh interpreter, imports included, as the workflow's job runs it

for two workloads: ``resid`` (resid_post at every layer: the heatmap only) and ``everything``
(resid_post, attn_out, mlp_out, mlp_act: the heatmap and the mlp_act neuron lists). Prints a
table, then one JSON line with the medians, ``ratio = summarize / capture`` and
``ratio_cold = cold / capture`` per workload. ``--workers 1 8`` also times ``summarize`` with its
layers computed in 8 processes (``summarize_w8``, ``ratio_w8``), as the workflow's job does with
``--cores 8``. ``--device cuda`` captures on the GPU (summaries stay on the CPU).

    python benchmarks/summaries.py [--sequences 64] [--seq-len 256] [--repeats 2] [--workers 1 8]
                                   [--device cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from layerscope.capture.run import run_capture
from layerscope.data.dataset import _save_npy
from layerscope.fileio import write_json
from layerscope.data.metadata import write_metadata
from layerscope.models.loading import fetch, load_model, parse_ref
from layerscope.store.layout import finalize
from layerscope.analysis.summaries import summarize
from layerscope.packed import pack

WORKLOADS = {"resid": ["resid_post"], "everything": ["resid_post", "attn_out", "mlp_out", "mlp_act"]}
DASHBOARD = {"site": "mlp_act", "top_k": 10, "context": 8, "neurons_per_layer": 64, "heatmap_examples": 20}


def make_dataset(d: Path, tok, n: int, seq: int, vocab: int, seed: int = 0) -> Path:
    """Random token ids in two contiguous splits, with the examples.jsonl a prepared data set has."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(16, vocab, size=n * seq).astype(np.int32)
    d.mkdir(parents=True, exist_ok=True)
    _save_npy(d / "token_ids.npy", ids)
    _save_npy(d / "offsets.npy", np.arange(0, n * seq + 1, seq, dtype=np.int64))
    with open(d / "examples.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            text = tok.decode(ids[i * seq:(i + 1) * seq].tolist())
            rec = {"id": f"ex{i}", "split": "a" if i < n // 2 else "b", "index": i, "rendered": text,
                   "n_tokens": seq, "n_tokens_full": seq, "truncated": False, "char_length": len(text),
                   "source_line": i + 1}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return d


def config_for(params: dict, max_length: int) -> dict:
    """The parts of a resolved workflow config that write_metadata reads."""
    return {"model": {"dtype": params["model_dtype"]}, "dataset": {"name": "bench", "max_length": max_length},
            "capture": {"batch_size": params["batch_size"], "dtype": params["dtype"], "parts": params["parts"],
                        "padding_side": params["padding_side"], "layers_per_job": len(params["layers"])}}


def capture_run(run_dir: Path, scratch: Path, ds: Path, params: dict, loaded, seq: int, device: str) -> None:
    """Capture and finalize into ``run_dir``, laid out as the workflow's results/{run}."""
    store = run_dir / "activations.zarr"
    arrays = [(int(L), s, v["positions"]) for L, v in params["layers"].items() for s in v["sites"]]
    job = {k: v for k, v in params.items() if k != "layers"} | {"block": [0, max(int(L) for L in params["layers"])]}
    run_capture(json.loads((scratch / "manifest.json").read_text()), ds, store, job, 0, arrays, device=device,
                group=run_dir.name, loaded=loaded)
    ids, offsets = np.load(ds / "token_ids.npy"), np.load(ds / "offsets.npy")
    finalize(store, arrays, params["parts"], ids, offsets, {"run": run_dir.name})


def add_metadata(run_dir: Path, scratch: Path, ds: Path, params: dict, seq: int) -> None:
    """What the metadata rule and the earlier rules leave next to the store."""
    (run_dir / "dataset").mkdir(exist_ok=True)
    (run_dir / "model").mkdir(exist_ok=True)
    shutil.copy(ds / "examples.jsonl", run_dir / "dataset" / "examples.jsonl")
    shutil.copy(scratch / "manifest.json", run_dir / "model" / "manifest.json")
    write_metadata(config_for(params, seq), json.loads((scratch / "manifest.json").read_text()), str(ds / "examples.jsonl"),
                   str(run_dir / "activations.zarr"), str(run_dir / "metadata.json"), str(run_dir / "run_config.json"))


COLD = ("import json, sys; from layerscope.analysis.summaries import summarize; "
        "summarize(sys.argv[1], **json.loads(sys.argv[2]))")


def summarize_cold(run_dir: Path, workers: int) -> float:
    """Seconds for summarize in a new interpreter (start-up and imports included)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", COLD, str(run_dir), json.dumps(DASHBOARD | {"workers": workers})], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="builtin:llama-512")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of: "
                    + ", ".join(WORKLOADS))
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="summarize's processes (each value timed)")
    ap.add_argument("--device", default="cpu", help="the capture's device (cpu, cuda)")
    ap.add_argument("--out", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (its results/ for profiling)")
    args = ap.parse_args(argv)
    if args.sequences < 2 or args.repeats < 1:
        ap.error("--sequences must be at least 2 and --repeats at least 1")
    workloads = [w for w in args.workloads.split(",") if w]
    if not set(workloads) <= set(WORKLOADS):
        ap.error(f"--workloads: choose from {', '.join(WORKLOADS)}")
    scratch = Path(args.out or tempfile.mkdtemp(prefix="ls-bench-sum-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, workloads, scratch)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


def run(args, workloads: list[str], scratch: Path) -> int:
    m = fetch(parse_ref({"id": args.model}), scratch / "weights")
    manifest = {"model": m, "adapter": None}
    write_json(scratch / "manifest.json", manifest)
    model, tok = load_model(manifest, args.device, "float32")
    n, seq = args.sequences, args.seq_len
    # ids the tokenizer knows (the built-in models have more embeddings than trained tokens)
    ds = make_dataset(scratch / "dataset", tok, n, seq, min(model.config.vocab_size, len(tok)))
    runs = {k: "summarize" if k == args.workers[0] else f"summarize_w{k}" for k in args.workers}
    times: dict[str, dict[str, list[float]]] = {w: {"capture": [], **{r: [] for r in runs.values()}, "cold": []}
                                                for w in workloads}
    with torch.inference_mode():  # warm-up: the first forward pass in a process pays one-time costs
        b = min(n, args.batch_size)
        model(input_ids=torch.from_numpy(np.load(ds / "token_ids.npy")[:b * seq].astype(np.int64)).view(b, seq)
              .to(model.device), use_cache=False)
    sizes: dict[str, int] = {}
    for rep in range(args.repeats):
        for w in workloads:
            params = {"layers": {str(i): {"sites": WORKLOADS[w], "positions": "all"} for i in range(m["num_layers"])},
                      "dtype": "float16", "batch_size": args.batch_size, "length_window": 8, "padding_side": "right",
                      "parts": 1,
                      "model_dtype": "float32", "trust_remote_code": False,
                      "store": {"chunk_mib": 2, "shard_mib": 64, "compression": "none", "compression_level": 3}}
            run_dir = scratch / "results" / w
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            t = time.perf_counter()
            capture_run(run_dir, scratch, ds, params, (model, tok), seq, args.device)
            times[w]["capture"].append(time.perf_counter() - t)
            add_metadata(run_dir, scratch, ds, params, seq)
            for k, name in runs.items():
                t = time.perf_counter()
                summary = summarize(str(run_dir), **DASHBOARD, workers=k)
                times[w][name].append(time.perf_counter() - t)
            times[w]["cold"].append(summarize_cold(run_dir, args.workers[0]))
            sizes[w] = len(json.dumps(pack(summary)))
    result = {"model": args.model, "tokens": n * seq, "seq_len": seq, "repeats": args.repeats, "dashboard": DASHBOARD,
              "device": args.device, "workers": args.workers}
    print(f"{'workload':<11} {'step':<10} {'median s':>9} {'min':>7} {'max':>7}")
    for w in workloads:
        med = {k: statistics.median(v) for k, v in times[w].items()}
        for k, v in times[w].items():
            print(f"{w:<11} {k:<10} {med[k]:9.3f} {min(v):7.3f} {max(v):7.3f}")
        ratio, cold = med["summarize"] / med["capture"], med["cold"] / med["capture"]
        print(f"{w:<11} ratio summarize/capture {ratio:.3f}, cold {cold:.3f}  (summary {sizes[w] / 1e6:.2f} MB of JSON)")
        result[w] = {"median_s": {k: round(v, 4) for k, v in med.items()},
                     "spread_s": {k: [round(min(v), 4), round(max(v), 4)] for k, v in times[w].items()},
                     "ratio": round(ratio, 3), "ratio_cold": round(cold, 3), "summary_bytes": sizes[w],
                     **{f"ratio_w{k}": round(med[name] / med["capture"], 3) for k, name in runs.items()
                        if name != "summarize"}}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
