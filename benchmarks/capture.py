"""Capture throughput: LayerScope against the bare forward pass, a naive synchronous capture, and the disk;
and what capturing two variants from one load saves over two separate runs.

For one token set and a model of a realistic CPU shape (hidden 512, intermediate 1376, 8
layers; 256-token sequences, batch 8), measures in one process, interleaved and repeated:

  1. forward   the bare forward pass (no hooks, nothing kept)
     body      the same without the final norm and LM head (a capture stops before them)
  2. capture   LayerScope's capture job into a Zarr store on disk
  3. naive     output_hidden_states / plain hooks per batch, torch.save per layer per batch
  4. npsave    numpy.save of the same bytes (the storage limit of this disk)

for two workloads: ``resid`` (resid_post, every layer, all positions, float16) and
``everything`` (resid_post, attn_out, mlp_out, mlp_act, every layer, all positions, float16).

The ``paired`` workload (the model with the built-in LoRA adapter, q/v/down r 4; resid_post,
every layer, all positions, float16) compares ``capture.variants: [adapter, base]``, one run that
loads the model once and runs two forward passes per batch, with two separate runs, one per
model (the adapter's, and the model alone). It measures two ways:

  in_process   one Python process, imports done and the data set tokenized: each run timed from
               the model load on (load + capture). ``ratio = paired / (adapter + base)``. What
               pairing saves here is one load of the weights; the two forward passes per batch
               remain, so on a CPU, where the forward is nearly the whole cost, this stays near 1.
  processes    each run as its own fresh ``python -c`` process through the package, timed from
               the parent: interpreter start, imports (torch, transformers, peft), model load,
               tokenizing the data set from a JSONL file, capture. ``ratio = paired / (adapter +
               base)``: what a user pays for one paired run against two plain ones. It also
               times ``startup``, a process that only does the imports, to show the fixed cost.

Each ratio is given from the medians (``ratio``) and from the fastest run of each method
(``ratio_best``), which a machine busy with other work disturbs less.

Neither counts Snakemake's own cost per job (scheduling, job start, the store and metadata
steps), which a workflow run of separate variants would pay twice too (benchmarks/workflow.py).
The issue's target is a ratio <= 0.6 on CPU.

Prints a table, then one JSON line with the medians, ``overhead = capture / max(forward,
npsave)``, ``overhead_body = capture / max(body, npsave)`` and ``vs_naive = naive / capture``
per workload, and for ``paired`` both ratios.

    python benchmarks/capture.py [--workloads resid everything paired] [--sequences 64] [--repeats 3]
                                 [--device cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from layerscope.capture.partial import load_block
from layerscope.capture.run import run_capture
from layerscope.data.dataset import _save_npy, prepare
from layerscope.models.loading import fetch, load_model, load_tokenizer, parse_ref

WORKLOADS = {"resid": ["resid_post"], "everything": ["resid_post", "attn_out", "mlp_out", "mlp_act"]}
PAIRED = "paired"


def make_dataset(d: Path, n: int, seq: int, vocab: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    ids = rng.integers(16, vocab, size=n * seq).astype(np.int32)
    d.mkdir(parents=True, exist_ok=True)
    _save_npy(d / "token_ids.npy", ids)
    _save_npy(d / "offsets.npy", np.arange(0, n * seq + 1, seq, dtype=np.int64))
    return d


def batches(ids: np.ndarray, n: int, seq: int, bs: int, device: str):
    x = torch.from_numpy(ids[:n * seq].astype(np.int64)).view(n, seq)
    for b in range(0, n, bs):
        yield b // bs, x[b:b + bs].to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_forward(model, ids, n, seq, bs, device, body_only: bool = False) -> None:
    """The model's forward pass; ``body_only`` skips the final norm and LM head, as a capture does."""
    net = model.get_decoder() if body_only else model
    with torch.inference_mode():
        for _, x in batches(ids, n, seq, bs, device):
            net(input_ids=x, use_cache=False)
    sync(device)


def naive(model, ids, n, seq, bs, device, sites, out: Path) -> None:
    """What researchers usually write: gather per batch, torch.save each layer, then the next batch."""
    from layerscope.capture.sites import decoder_layers

    layers = decoder_layers(model, model.config.num_hidden_layers)
    got: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(layers):
        if "attn_out" in sites:
            hooks.append(layer.self_attn.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(f"attn_out{i}", o[0])))
        if "mlp_out" in sites:
            hooks.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(f"mlp_out{i}", o)))
        if "mlp_act" in sites:
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
                lambda m, a, i=i: got.__setitem__(f"mlp_act{i}", a[0])))
    out.mkdir(parents=True, exist_ok=True)
    try:
        with torch.inference_mode():
            for b, x in batches(ids, n, seq, bs, device):
                got.clear()
                hs = model(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states
                for i in range(len(layers)):
                    torch.save(hs[i + 1].half().cpu(), out / f"resid_post_{i:02d}_{b:04d}.pt")
                    for s in sites:
                        if s != "resid_post":
                            torch.save(got[f"{s}{i}"].half().cpu(), out / f"{s}_{i:02d}_{b:04d}.pt")
    finally:
        for h in hooks:
            h.remove()


def npsave(arrays: list[tuple[str, tuple[int, int]]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, shape in arrays:
        a = rng.standard_normal(shape[1], dtype=np.float32).astype(np.float16)
        np.save(out / f"{name}.npy", np.broadcast_to(a, shape).copy())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", choices=[*WORKLOADS, PAIRED], default=[*WORKLOADS, PAIRED])
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="builtin:llama-512")
    ap.add_argument("--out", default=None, help="scratch directory on the disk to measure (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.sequences < 1 or args.repeats < 1:
        ap.error("--sequences and --repeats must be at least 1")
    scratch = Path(args.out or tempfile.mkdtemp(prefix="ls-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def store_params(block: list[int], bs: int) -> dict:
    return {"block": block, "dtype": "float16", "length_window": 8, "batch_size": bs, "padding_side": "right",
            "parts": 1, "model_dtype": "float32", "trust_remote_code": False,
            "store": {"chunk_mib": 2, "shard_mib": 64, "compression": "none", "compression_level": 3}}


def run(args, scratch: Path) -> int:
    m = fetch(parse_ref({"id": args.model}), scratch / "model")
    result = {"device": args.device, "model": args.model, "tokens": args.sequences * args.seq_len,
              "seq_len": args.seq_len, "batch_size": args.batch_size, "repeats": args.repeats}
    print(f"{'workload':<11} {'method':<18} {'median s':>9} {'min':>7} {'max':>7} {'tokens/s':>10}")
    if any(w in WORKLOADS for w in args.workloads):
        result |= run_capture_workloads(args, scratch, m)
    if PAIRED in args.workloads:
        result[PAIRED] = run_paired(args, scratch, m)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result))
    return 0


def row(w: str, method: str, v: list[float], tokens: int) -> None:
    med = statistics.median(v)
    print(f"{w:<11} {method:<18} {med:9.3f} {min(v):7.3f} {max(v):7.3f} {tokens / med:10.0f}")


def run_capture_workloads(args, scratch: Path, m: dict) -> dict:
    manifest = {"model": m, "adapter": None}
    model, tok = load_model(manifest, args.device, "float32")
    n, seq, bs = args.sequences, args.seq_len, args.batch_size
    ds = make_dataset(scratch / "dataset", n, seq, model.config.vocab_size)
    ids = np.load(ds / "token_ids.npy")
    L, H, I = m["num_layers"], m["hidden_size"], m["intermediate_size"]
    tokens = n * seq
    workloads = [w for w in WORKLOADS if w in args.workloads]
    methods = ("forward", "body", "capture", "naive", "npsave")
    times: dict[str, dict[str, list[float]]] = {w: {k: [] for k in methods} for w in workloads}
    nbytes = {}
    store_bytes = {}
    bare_forward(model, ids, min(n, bs), seq, bs, args.device)  # warm-up
    for rep in range(args.repeats):
        for w in workloads:
            sites = WORKLOADS[w]
            arrays = [(f"{s}_{i:02d}", (tokens, I if s == "mlp_act" else H)) for i in range(L) for s in sites]
            nbytes[w] = sum(a * b * 2 for _, (a, b) in arrays)
            captures = [(i, s, "all") for i in range(L) for s in sites]
            params = store_params([0, L - 1], bs)
            order = list(methods)
            order = order[rep % 5:] + order[:rep % 5]  # interleave: no method always runs first
            for method in order:
                target = scratch / f"{w}-{method}"
                shutil.rmtree(target, ignore_errors=True)
                t = time.perf_counter()
                if method in ("forward", "body"):
                    bare_forward(model, ids, n, seq, bs, args.device, body_only=method == "body")
                elif method == "capture":
                    run_capture(manifest, ds, target, params, 0, captures, device=args.device,
                                group=w, loaded=(model, tok))
                elif method == "naive":
                    naive(model, ids, n, seq, bs, args.device, sites, target)
                else:
                    npsave(arrays, target)
                times[w][method].append(time.perf_counter() - t)
                if method == "capture":
                    store_bytes[w] = sum(f.stat().st_size for f in target.rglob("c/*/*") if f.is_file())
                shutil.rmtree(target, ignore_errors=True)
    result = {}
    for w in workloads:
        med = {k: statistics.median(v) for k, v in times[w].items()}
        for k, v in times[w].items():
            row(w, k, v, tokens)
        result[w] = {"bytes": nbytes[w], "store_bytes": store_bytes[w], "disk_ratio": round(store_bytes[w] / nbytes[w], 4),
                     "median_s": {k: round(v, 4) for k, v in med.items()},
                     "spread_s": {k: [round(min(v), 4), round(max(v), 4)] for k, v in times[w].items()},
                     "overhead": round(med["capture"] / max(med["forward"], med["npsave"]), 3),
                     "overhead_body": round(med["capture"] / max(med["body"], med["npsave"]), 3),
                     "vs_naive": round(med["naive"] / med["capture"], 3)}
        print(f"{w:<11} overhead {result[w]['overhead']:.3f} (body only {result[w]['overhead_body']:.3f})  "
              f"vs_naive {result[w]['vs_naive']:.3f}  "
              f"disk/raw {result[w]['disk_ratio']:.4f}")
    del model
    return result


# One run of the paired workload in a fresh process: everything a user's run pays, through the package.
CHILD = """
import json, sys, time
spec = json.loads(sys.argv[1])
from layerscope.capture.run import run_capture
from layerscope.data.dataset import prepare
from layerscope.models.loading import load_tokenizer
import peft, torch, transformers  # what a capture job imports before it loads the model
if spec["method"] != "startup":
    manifest = spec["manifest"]
    prepare(spec["jsonl"], load_tokenizer(manifest), spec["out"] + "/dataset", max_length=spec["seq_len"])
    run_capture(manifest, spec["out"] + "/dataset", spec["out"] + "/a.zarr", spec["params"], 0, spec["captures"],
                device=spec["device"], group=spec["method"], variants=spec["variants"])
"""


def write_texts(path: Path, n: int, seq: int, seed: int = 0) -> Path:
    """``n`` records of random words, each longer than ``seq`` tokens (truncated to ``seq`` by tokenizing)."""
    rng = np.random.default_rng(seed)
    words = ["the", "model", "layer", "token", "residual", "stream", "adapter", "capture", "neuron", "attention",
             "Paris", "answer", "question", "why", "because", "seven", "42", "café", "dog", "over"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"x{i}", "text": " ".join(rng.choice(words, size=2 * seq))}) + "\n")
    return path


def run_paired(args, scratch: Path, m: dict) -> dict:
    a = fetch(parse_ref({"id": "builtin:lora", "seed": 1}), scratch / "adapter", what="adapter", base_dir=m["path"])
    n, seq, bs, dev = args.sequences, args.seq_len, args.batch_size, args.device
    jsonl = write_texts(scratch / "paired.jsonl", n, seq)
    ds = scratch / "paired-dataset"
    info = prepare(jsonl, load_tokenizer({"model": m}), ds, max_length=seq)
    tokens = int(np.load(ds / "offsets.npy")[-1])
    L = m["num_layers"]
    captures = [(i, "resid_post", "all") for i in range(L)]
    params = store_params([0, L - 1], bs)
    with_adapter, alone = {"model": m, "adapter": a}, {"model": m, "adapter": None}

    def in_process(method: str, out: Path) -> None:
        if method == "paired":
            run_capture(with_adapter, ds, out / "a.zarr", params, 0, captures, device=dev, group=method,
                        variants={"base": {"store_root": out / "b.zarr", "captures": captures}})
        elif method == "load":
            load_block(with_adapter, dev, "float32", False, 0, L - 1)
        else:
            run_capture(with_adapter if method == "adapter" else alone, ds, out / "a.zarr", params, 0, captures,
                        device=dev, group=method)

    def process(method: str, out: Path) -> None:
        spec = {"method": method, "manifest": alone if method == "base" else with_adapter, "jsonl": str(jsonl),
                "out": str(out), "seq_len": seq, "params": params, "captures": captures, "device": dev,
                "variants": {"base": {"store_root": str(out / "b.zarr"), "captures": captures}}
                if method == "paired" else None}
        out.mkdir(parents=True, exist_ok=True)
        res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"the {method} process failed:\n{res.stderr[-3000:]}")

    ways = {"in_process": (in_process, ["paired", "adapter", "base", "load"]),
            "processes": (process, ["paired", "adapter", "base", "startup"])}
    times = {way: {k: [] for k in methods} for way, (_, methods) in ways.items()}
    load_block(with_adapter, dev, "float32", False, 0, L - 1)  # warm-up: first imports (peft) and file cache
    for rep in range(args.repeats):
        for way, (fn, methods) in ways.items():
            for method in methods[rep % 4:] + methods[:rep % 4]:  # interleaved: no method always runs first
                out = scratch / f"paired-{way}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                t = time.perf_counter()
                fn(method, out)
                times[way][method].append(time.perf_counter() - t)
                shutil.rmtree(out, ignore_errors=True)
    result = {"tokens": tokens, "examples": info["examples"]}
    for way in ways:
        med = {k: statistics.median(v) for k, v in times[way].items()}
        for k, v in times[way].items():
            row(PAIRED, f"{way}:{k}", v, tokens)
        ratio = med["paired"] / (med["adapter"] + med["base"])
        t = times[way]
        best = min(t["paired"]) / (min(t["adapter"]) + min(t["base"]))  # fastest runs: less noise from other work
        result[way] = {"median_s": {k: round(v, 3) for k, v in med.items()},
                       "spread_s": {k: [round(min(v), 3), round(max(v), 3)] for k, v in t.items()},
                       "ratio": round(ratio, 3), "ratio_best": round(best, 3)}
        print(f"{PAIRED:<11} {way}: paired / (adapter + base) = {ratio:.3f} (medians), {best:.3f} (fastest runs)")
    result["ratio_in_process"] = result["in_process"]["ratio"]
    result["ratio_processes"] = result["processes"]["ratio"]
    result["load_share"] = round(statistics.median(times["in_process"]["load"])
                                 / statistics.median(times["in_process"]["adapter"]), 3)
    return result


if __name__ == "__main__":
    sys.exit(main())
