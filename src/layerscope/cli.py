"""Command line: ``python -m layerscope inspect RUN_DIR [--show-examples N]`` and
``python -m layerscope plan [--configfile FILE] [--directory DIR] [--json]``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from layerscope.errors import LayerScopeError


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def inspect_run(run_dir: str, show_examples: int = 0, out=sys.stdout) -> None:
    """Print a summary of a run: model, splits, arrays with shapes and bytes on disk, and some examples."""
    from layerscope.store.reader import Run

    run = Run(run_dir)
    md = run.metadata
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"run        {run.path}")
    p(f"model      {md['model_name']}" + (f" @ {md['model_revision']}" if md.get("model_revision") else "")
      + (f"  + adapter {md['adapter']['name']}" if md.get("adapter") else ""))
    p(f"dataset    {md['dataset_name']}: {md['total_examples']} examples, {md['total_tokens']} tokens")
    for name, s in md["splits"].items():
        a, b = run.splits[name]
        p(f"  split {name!r}: {s['examples']} examples (rows {a}..{b - 1}), {s['tokens']} tokens, "
          f"{s['truncated']} truncated")
    p(f"layers     {run.layers} of {md['num_layers']}; sites {', '.join(run.sites)}; dtype {md['dtype']}")
    p("arrays")
    total = 0
    for L, s in run.arrays:
        a = run.activations(L, s)
        nbytes = run.bytes_on_disk(L, s)
        total += nbytes
        bad = md.get("arrays", {}).get(f"layer_{L:02d}/{s}", {})
        warn = (f"  ! {bad['nonfinite']} NaN/inf ({bad['clipped']} out of {md['dtype']} range)"
                if bad.get("nonfinite") else "")
        p(f"  layer_{L:02d}/{s:<11} {a.positions:<4} shape {list(a.shape)!s:<14} {_human(nbytes)}{warn}")
    p(f"bytes on disk (activations) {_human(total)}")
    if show_examples:
        from layerscope.data.dataset import example_text
        from layerscope.fileio import read_json
        from layerscope.models.loading import load_tokenizer
        from layerscope.data.tokens import token_texts

        tok = load_tokenizer(read_json(run.path / "model" / "manifest.json"))
        for ex in run.examples[:show_examples]:
            ids = run.tokens(ex["index"])
            pieces = token_texts(tok, ids)
            p(f"\n[{ex['index']}] id={ex['id']} split={ex['split']} tokens={ex['n_tokens']}"
              + (" (truncated)" if ex["truncated"] else ""))
            p(f"  text:   {example_text(ex)!r}")
            p("  tokens: " + " ".join(f"{i}:{t!r}" for i, t in zip(ids.tolist(), pieces)))
            extra = {k: v for k, v in ex.items() if k not in ("index", "id", "split", "text", "rendered", "n_tokens",
                                                               "n_tokens_full", "truncated", "source_line")}
            if extra:
                p(f"  fields: {extra}")


def plan_run(configfile: str | None, directory: str, as_json: bool = False, out=sys.stdout) -> dict:
    """Print what the workflow would capture from ``configfile`` (default: the embedded demo config) and
    what it would cost: jobs, bytes per site, boundaries, and the weights each capture job holds."""
    import json
    from pathlib import Path

    import yaml

    from layerscope.config import build_plan
    from layerscope.analysis.costs import estimate, plan_offsets
    from layerscope.errors import ConfigError
    from layerscope.models.loading import resolve_device, resolve_dtype

    repo = Path(__file__).resolve().parents[2]
    schema = repo / "workflow" / "schemas" / "config.schema.yaml"
    if not schema.is_file():
        raise ConfigError(f"plan: no workflow schema at {schema}; run from a LayerScope checkout")
    base = Path(directory).resolve()
    cfg_path = Path(configfile) if configfile else base / "config" / "config.yaml"
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"plan: cannot read config file {cfg_path}: {e.strerror}") from e
    plan = build_plan(cfg, schema, base)
    device = resolve_device(plan.config["capture"]["device"])
    dtype = str(resolve_dtype(plan.config["model"]["dtype"], device)).removeprefix("torch.")
    est = estimate(plan, plan_offsets(plan, base / "results" / plan.config["run"]), dtype)
    if as_json:
        print(json.dumps(est), file=out)
        return est
    p = lambda *a: print(*a, file=out)  # noqa: E731
    cap = plan.config["capture"]
    p(f"run        {plan.config['run']}: {plan.model.label}, {plan.dims.num_layers} layers, hidden "
      f"{plan.dims.hidden_size}, compute {dtype} on {device}")
    p(f"data       {est['examples']} examples, {est['tokens']} tokens, {cap['parts']} part(s)")
    p(f"jobs       {est['jobs']} capture jobs ({len(est['blocks'])} blocks of up to {cap['layers_per_job']} layers "
      f"x {cap['parts']} parts)")
    blocks = est["blocks"]
    shown = blocks if len(blocks) <= 12 else blocks[:4] + [None] + blocks[-3:]
    for b in shown:
        if b is None:
            p(f"  ... {len(blocks) - 7} more blocks ...")
            continue
        p(f"  {b['name']}  captures {b['layers'] or 'nothing (relay)'}; weights {_human(b['weight_bytes'])}"
          + ("; hands on a boundary" if b["writes_boundary"] else ""))
    p(f"arrays     {len(est['arrays'])} arrays, {est['shards']} shards, {_human(est['array_bytes'])} ({cap['dtype']}), "
      f"{_human(est['disk_bytes'])} on disk")
    for site, nbytes in sorted(est["bytes_per_site"].items()):
        p(f"  {site:<11} {_human(nbytes)}")
    p(f"boundaries {_human(est['boundary_bytes'])} in all ({', '.join(_human(x) for x in est['boundary_bytes_per_part'])}"
      f" per boundary and part), {'kept' if cap['boundaries'] == 'keep' else 'deleted once used'}")
    return est


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layerscope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="print a summary of a run directory")
    ins.add_argument("run_dir", help="a run directory, e.g. results/demo")
    ins.add_argument("--show-examples", type=int, default=0, metavar="N", help="print the first N examples")
    pl = sub.add_parser("plan", help="print what a config would capture and what it would cost, before running")
    pl.add_argument("--configfile", help="the workflow config (default: config/config.yaml of --directory)")
    pl.add_argument("--directory", default=".", help="the working directory snakemake would run in")
    pl.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.command == "inspect" and args.show_examples < 0:
        parser.error("--show-examples: must be 0 or more")
    try:
        if args.command == "plan":
            plan_run(args.configfile, args.directory, args.json)
        else:
            inspect_run(args.run_dir, args.show_examples)
    except LayerScopeError as e:
        print(f"layerscope: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... | head` closed the pipe: not an error
        sys.stdout = open(os.devnull, "w")
    return 0
