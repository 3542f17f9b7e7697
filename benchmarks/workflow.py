"""Whole-workflow CPU benchmark: what `snakemake --cores 2` costs on top of the bare forward pass.

Workload (one dict, CONFIG, below): model builtin:llama-512 (hidden 512, intermediate 1376, 8
layers), 64 random-text sequences that each hit dataset.max_length 256 tokens, resid_post at
every layer and position in float16, batch 8, one part. Measures in one run, interleaved and
repeated:

  forward   the bare decoder forward of the same tokens in-process (model.get_decoder() on
            batches of 8 under torch.inference_mode): the floor
  lpj=N     end-to-end `python -m snakemake --cores 2` from an empty scratch directory with
            capture.layers_per_job N (1, 2, 8); the built-in model is generated inside the
            workflow (fetch_model writes it under results/RUN/model), so that is included;
            ``--model local`` fetches the same weights from a directory instead (no torch)
  stale     after the lpj=1 run, capture.overrides gives layer 5 two sites and snakemake re-runs:
            the cost of re-capturing one stale layer (plus store, metadata, summaries, dashboard)

Per job it reads Snakemake's benchmark files (results/RUN/benchmarks/*.tsv, rules that declare
`benchmark:`) and the span between the first and last line of each job log (logs/RUN/**.log;
that span starts after the interpreter and the step's module are imported, so it misses
Python start-up). Prints a table, then one JSON line of medians and ratios:
``e2e_over_forward`` per layers_per_job, ``lpj1_over_all``, ``stale_layer_over_full``, and
``overhead_s``: each run's wall time less its capture jobs' (their benchmark files), the workflow's
own cost in seconds, which the machine's drift between the forward and the run does not skew.

Model jobs run in the warm worker (layerscope/worker.py) unless LAYERSCOPE_WORKER=0; ``--worker
both`` runs every workflow both ways, interleaved, and prints one table and JSON line per way
(``"worker": "off"``, and the ways below for on). A worker outlives its snakemake (LAYERSCOPE_WORKER_IDLE_S), so
with the worker on each run is measured ``--server cold`` (every server stopped first, with
``python -m layerscope worker stop``: the run imports torch once, as the first run of the day
does) and/or ``warm`` (the server an earlier run left is up, as for every later run); ``both``
(the default) runs each workflow cold, then at once warm, and reports each way (``"worker":
"cold"`` / ``"warm"``). The stale re-run follows its own way's full run.

``--device cuda`` runs the floor and the capture jobs on the GPU (the model's float32 weights).

    PYTHONPATH=$PWD/src python benchmarks/workflow.py [--repeats 2] [--lpj 1 2 8] [--worker on|off|both]
                                                      [--server cold|warm|both] [--model builtin|local] [--sequences N] [--device cpu|cuda] [--cores 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SEQUENCES, SEQ_LEN, STALE_LAYER = 64, 256, 5

# The whole workflow config, merged over config/config.yaml (lists replace, mappings merge).
# Keys change as the workflow grows: edit here only. dataset.path is filled in per scratch dir.
CONFIG: dict[str, Any] = {
    "run": "bench",
    "model": {"id": "builtin:llama-512", "seed": 0, "dtype": "float32"},
    "dataset": {"path": "data/bench.jsonl", "name": "bench", "max_length": SEQ_LEN},
    "capture": {"layers": "all", "sites": ["resid_post"], "positions": "all", "dtype": "float16",
                "layers_per_job": 8, "parts": 1, "batch_size": 8, "device": "cpu"},
    # The dashboard reads a captured site; the default (mlp_act) is not captured here.
    "dashboard": {"site": "resid_post"},
}
STALE_OVERRIDE = {str(STALE_LAYER): {"sites": ["resid_post", "mlp_out"]}}

_WORDS = ("the quick brown fox jumps over lazy dog language model predicts next token capture activations "
          "residual stream layer capital France Paris planet happiness sadness calm excitement neurons "
          "emotion forward return self drink water rest doctor fever Café naïve Zürich 東京 Москва π "
          "numbers 0 1 2 42 100 2024 3.5 answer options sure possibly true why when").split()


def env(worker: str | None = None) -> dict[str, str]:
    """The environment of every snakemake run: offline, this checkout's package first; ``worker``
    "on" or "off" sets LAYERSCOPE_WORKER (None leaves it as it is)."""
    src = str(REPO / "src")
    path = os.environ.get("PYTHONPATH", "")
    out = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": src if not path else (path if path.split(os.pathsep)[0] == src else f"{src}{os.pathsep}{path}")}
    if worker is not None:
        out["LAYERSCOPE_WORKER"] = "0" if worker == "off" else "1"
    return out


def stop_servers() -> None:
    """Stop every warm worker of this user (they outlive their snakemake): the next run starts cold."""
    subprocess.run([sys.executable, "-m", "layerscope", "worker", "stop"], env=env(), check=True,
                   capture_output=True, text=True)


def make_texts(tokenizer, n: int, seq: int, seed: int = 0) -> list[str]:
    """n random texts, each of which tokenizes to more than ``seq`` tokens (so each hits max_length)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words: list[str] = []
        while len(tokenizer(" ".join(words))["input_ids"]) <= seq:
            words += rng.choices(_WORDS, k=32)
        out.append(" ".join(words))
    return out


def write_inputs(scratch: Path, texts: list[str], cfg: dict[str, Any]) -> Path:
    """Give a scratch working directory the default config dir, the data set and the bench config."""
    shutil.copytree(REPO / "config", scratch / "config")
    data = scratch / cfg["dataset"]["path"]
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"id": f"s{i}", "text": t}, ensure_ascii=False) + "\n"
                            for i, t in enumerate(texts)), encoding="utf-8")
    return write_config(scratch, cfg)


def write_config(scratch: Path, cfg: dict[str, Any]) -> Path:
    p = scratch / "bench_config.yaml"
    p.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return p


CORES = 2  # snakemake --cores (--cores sets it)


def snakemake(scratch: Path, configfile: Path, worker: str | None = None) -> tuple[float, str]:
    """Run the real CLI, ``--cores CORES``; return its wall time and output; raise with its output tail if it fails."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(scratch),
           "--cores", str(CORES), "--configfile", str(configfile), "--nocolor"]
    if worker == "cold":
        stop_servers()
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(worker), cwd=scratch)
    wall = time.perf_counter() - t
    (scratch / f"snakemake_{time.time_ns()}.out").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"snakemake failed in {scratch}:\n{(res.stdout + res.stderr)[-4000:]}")
    return wall, res.stdout + res.stderr


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
# A job's stamp may follow a progress bar of a parallel job on the same line.
_SM_STAMP = re.compile(r"\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
_SM_START = re.compile(r"^(?:local)?rule (\S+):$")
_SM_DONE = re.compile(r"^Finished jobid: (\d+) \(Rule: (\S+)\)")


def snakemake_spans(text: str) -> dict[str, float]:
    """Per job, start to finish as Snakemake's own output stamps them (1 s resolution, includes the
    job's Python start-up), and ``(plan)``: snakemake start to the first job (parsing, DAG)."""
    out: dict[str, float] = {}
    starts: dict[str, tuple[str, float]] = {}
    stamp = begin = first = None
    block: tuple[str, float] | None = None
    jobid = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Date: ") and begin is None:
            begin = datetime.strptime(line[6:], "%Y-%m-%d %H:%M:%S").timestamp()
        elif m := _SM_STAMP.search(line):
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y").timestamp()
        elif (m := _SM_START.match(line)) and stamp is not None:
            block, jobid = (m.group(1), stamp), None
            first = stamp if first is None else first
        elif line.startswith("jobid:") and block is not None:
            jobid = line.split(":", 1)[1].strip()
            starts[jobid] = block
        elif line.startswith("wildcards:") and jobid is not None:  # named like the benchmark files
            name, t0 = starts[jobid]
            starts[jobid] = (name + "_" + line.split(":", 1)[1].strip().replace("=", ""), t0)
        elif (m := _SM_DONE.match(line)) and stamp is not None and m.group(1) in starts:
            name, t0 = starts[m.group(1)]
            out[name] = stamp - t0
    if begin is not None and first is not None:
        out["(plan)"] = first - begin
    return out


def job_times(scratch: Path, run: str, since: float = 0.0, output: str = "") -> dict[str, dict[str, float]]:
    """Per job: ``bench`` (Snakemake benchmark file, s), ``log`` (first to last line of the job's log,
    s) and ``sm`` (Snakemake's start and finish stamps, s; see snakemake_spans).

    Only files written after ``since`` (epoch seconds) count, so a re-run reports its own jobs.
    """
    out: dict[str, dict[str, float]] = {}
    for name, span in snakemake_spans(output).items():
        out.setdefault(name, {})["sm"] = span
    for f in sorted((scratch / "results" / run / "benchmarks").glob("*.tsv")):
        if f.stat().st_mtime >= since:
            with open(f, newline="") as fh:
                row = next(csv.DictReader(fh, delimiter="\t"))
            out.setdefault(f.stem, {})["bench"] = float(row["s"])
    for f in sorted((scratch / "logs" / run).rglob("*.log")):
        if f.stat().st_mtime < since:
            continue
        stamps = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                  for line in f.read_text(errors="replace").splitlines() if (m := _STAMP.match(line))]
        if stamps:
            name = str(f.relative_to(scratch / "logs" / run).with_suffix("")).replace(os.sep, "_")
            out.setdefault(name, {})["log"] = stamps[-1] - stamps[0]
    return out


def forward_seconds(model, ids, offsets, bs: int) -> float:
    """The bare decoder forward over every sequence, batches of ``bs`` (all sequences are SEQ_LEN long
    here), on the model's device; the token ids start on the host, as a capture job's do."""
    import numpy as np
    import torch

    lengths = np.diff(offsets)
    assert (lengths == lengths[0]).all(), "the bench data set should hit max_length on every sequence"
    x = torch.from_numpy(ids[:offsets[-1]].astype(np.int64)).view(len(lengths), int(lengths[0]))
    decoder = model.get_decoder()
    t = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(x), bs):
            decoder(input_ids=x[b:b + bs].to(model.device), use_cache=False)  # as the capture runs it: no KV cache
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    global CORES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lpj", type=int, nargs="+", default=[1, 2, 8], help="capture.layers_per_job values")
    ap.add_argument("--sequences", type=int, default=SEQUENCES, help="examples in the data set (each 256 tokens)")
    ap.add_argument("--no-stale", action="store_true", help="skip the stale-layer re-run (and the lpj 1 run it needs)")
    ap.add_argument("--worker", choices=["on", "off", "both"], default=None,
                    help="model jobs in the warm worker or not (default: as LAYERSCOPE_WORKER says; both: each way)")
    ap.add_argument("--server", choices=["cold", "warm", "both"], default="both",
                    help="with the worker on: every server stopped before each run, one left up by the run before, "
                         "or each run both ways (cold, then warm)")
    ap.add_argument("--keep", default=None, help="scratch root to keep (default: a temp dir, removed)")
    ap.add_argument("--device", default="cpu", help="capture.device of the workflow and the floor's device (cpu, cuda)")
    ap.add_argument("--cores", type=int, default=CORES, help="snakemake --cores")
    ap.add_argument("--model", choices=["builtin", "local"], default="builtin",
                    help="the workflow generates the built-in model (fetch_model needs torch), or fetches the "
                         "same weights from a local directory (as a downloaded model: no torch)")
    args = ap.parse_args(argv)
    CORES = args.cores
    CONFIG["capture"]["device"] = args.device
    root = Path(args.keep or tempfile.mkdtemp(prefix="ls-wfbench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def run(args, root: Path) -> int:
    os.environ.update(env())
    import torch

    from layerscope.data.dataset import load_tokens, prepare
    from layerscope.models.loading import fetch, load_model, parse_ref

    if 1 not in args.lpj and not args.no_stale:
        args.lpj = [1, *args.lpj]  # the stale-layer re-run needs the layers_per_job 1 run
    # The floor: the same built-in model (same seed) and the same tokens, in this process.
    t = time.perf_counter()
    model_dir = root / "model"
    manifest = {"model": fetch(parse_ref(CONFIG["model"]), model_dir / "weights"), "adapter": None}
    if args.model == "local":  # the same weights as a model directory, as a downloaded model is fetched
        CONFIG["model"] = {"id": manifest["model"]["path"], "dtype": CONFIG["model"]["dtype"]}
    model, tok = load_model(manifest, device=args.device, dtype=CONFIG["model"]["dtype"])
    texts = make_texts(tok, args.sequences, SEQ_LEN)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{i}", "text": s}) + "\n" for i, s in enumerate(texts)))
    prepare(data, tok, model_dir / "dataset", max_length=SEQ_LEN)
    ids, offsets = load_tokens(model_dir / "dataset")
    setup = time.perf_counter() - t
    print(f"setup (model, data, tokens: {len(offsets) - 1} x {SEQ_LEN}) {setup:.1f} s; "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, device {args.device}", flush=True)
    forward_seconds(model, ids, offsets[:3], CONFIG["capture"]["batch_size"])  # warm-up, two sequences

    on = args.worker in ("on", "both") or (args.worker is None and os.environ.get("LAYERSCOPE_WORKER", "").strip() != "0")
    servers = ["cold", "warm"] if args.server == "both" else [args.server]
    modes = (["off"] if args.worker in ("off", "both") else []) + (servers if on else [])
    if modes == ["warm"]:  # a server for the first measured run
        warmup = _fresh(root / "warmup")
        snakemake(warmup, write_inputs(warmup, texts, CONFIG), "warm")
        shutil.rmtree(warmup, ignore_errors=True)
    times: dict[str, dict[str, list[float]]] = {m: {"forward": []} for m in modes}
    jobs: dict[str, dict[str, dict[str, dict[str, list[float]]]]] = {m: {} for m in modes}
    for r in range(args.repeats):
        fwd = forward_seconds(model, ids, offsets, CONFIG["capture"]["batch_size"])
        for m in modes:
            times[m]["forward"].append(fwd)
        print(f"[{r}] forward {fwd:.2f} s", flush=True)
        for lpj in args.lpj:
            for mode in modes:
                tag = f" (worker {mode})"
                cfg = copy.deepcopy(CONFIG)
                cfg["capture"]["layers_per_job"] = lpj
                scratch = _fresh(root / f"r{r}-lpj{lpj}-{mode}")
                cfgfile = write_inputs(scratch, texts, cfg)
                t0 = time.time()
                key = f"lpj={lpj}"
                wall, text = snakemake(scratch, cfgfile, mode)
                times[mode].setdefault(key, []).append(wall)
                print(f"[{r}] {key}{tag} {wall:.2f} s", flush=True)
                record(jobs[mode], key, job_times(scratch, cfg["run"], t0, text))
                if lpj == 1 and not args.no_stale:
                    cfg["capture"].setdefault("overrides", {}).update(STALE_OVERRIDE)
                    write_config(scratch, cfg)
                    time.sleep(1.0)  # mtimes: the re-run's files must be newer than the full run's
                    t0 = time.time()
                    wall, text = snakemake(scratch, cfgfile, mode)
                    times[mode].setdefault("stale", []).append(wall)
                    print(f"[{r}] stale layer {STALE_LAYER} re-run{tag} {wall:.2f} s", flush=True)
                    record(jobs[mode], "stale", job_times(scratch, cfg["run"], t0, text))
                if r + 1 < args.repeats or not args.keep:
                    shutil.rmtree(scratch / "results", ignore_errors=True)  # disk: keep only the last run's
    for mode in modes:
        print(f"\n=== model jobs: {WAYS[mode]} ===")
        report(times[mode], jobs[mode], args.lpj, mode)
    return 0


WAYS = {"off": "each in its own process (LAYERSCOPE_WORKER=0)",
        "cold": "in the warm worker, every server stopped before the run",
        "warm": "in the warm worker, the server of the run before still up"}


def _fresh(d: Path) -> Path:
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    return d


def record(jobs: dict, key: str, per_job: dict[str, dict[str, float]]) -> None:
    for name, d in per_job.items():
        for kind, v in d.items():
            jobs.setdefault(key, {}).setdefault(name, {}).setdefault(kind, []).append(v)


def report(times: dict[str, list[float]], jobs: dict, lpjs: list[int], worker: str) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    fwd = med["forward"]
    print(f"\n{'measure':<14}{'median s':>10}{'x forward':>11}   runs")
    for k, v in times.items():
        print(f"{k:<14}{med[k]:>10.2f}{med[k] / fwd:>11.2f}   " + " ".join(f"{x:.2f}" for x in v))
    kinds = (("sm", "snakemake s"), ("bench", "benchmark s"), ("log", "log span s"))
    capture_sums: dict[str, float] = {}
    for key, per in jobs.items():
        print(f"\njobs of {key:<10}{'job':<26}" + "".join(f"{h:>13}" for _, h in kinds))
        sums = dict.fromkeys((k for k, _ in kinds), 0.0)
        for name in sorted(per, key=lambda n: (n != "(plan)", n)):
            cells = []
            for kind, _ in kinds:
                v = statistics.median(per[name][kind]) if kind in per[name] else None
                if v is not None and name != "(plan)":
                    sums[kind] += v
                cells.append("" if v is None else f"{v:.2f}")
            print(f"{'':<18}{name:<26}" + "".join(f"{c:>13}" for c in cells))
        print(f"{'':<18}{'sum of jobs':<26}" + "".join(f"{sums[k]:>13.2f}" for k, _ in kinds))
        capture_sums[key] = sum(statistics.median(d["bench"]) for n, d in per.items()
                                if n.startswith("capture_") and "bench" in d)
    print("\n(snakemake s: Snakemake's own job start/finish stamps, 1 s resolution, Python start-up included; "
          "(plan): from snakemake's start to its first job. benchmark s: the rule's benchmark file. "
          "log span s: first to last line of the job log.)")
    all_key = f"lpj={max(lpjs)}"
    out = {
        "forward_s": round(fwd, 3),
        "e2e_s": {k: round(v, 3) for k, v in med.items() if k.startswith("lpj=")},
        "e2e_over_forward": {k.split("=")[1]: round(v / fwd, 2) for k, v in med.items() if k.startswith("lpj=")},
        "lpj1_over_all": round(med["lpj=1"] / med[all_key], 3) if "lpj=1" in med else None,
        "stale_layer_over_full": round(med["stale"] / med["lpj=1"], 3) if "stale" in med else None,
        "capture_jobs_s": {k: round(v, 2) for k, v in capture_sums.items()},
        # what the workflow adds to its capture jobs, both timed in the same run: steadier than the
        # ratio to a forward timed minutes earlier on a machine whose speed drifts
        "overhead_s": {k: round(med[k] - capture_sums[k], 2) for k in capture_sums if k in med},
        "repeats": len(times["forward"]),
        "device": CONFIG["capture"]["device"],
        "cores": CORES,
        "model": "builtin" if str(CONFIG["model"]["id"]).startswith("builtin:") else "local",
        "worker": worker,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
