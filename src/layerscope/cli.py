"""Command line: ``python -m layerscope inspect RUN_DIR [--show-examples N]``,
``python -m layerscope inspect RUN_DIR --pass PASS [--show-examples N] [--compare-with OTHER_RUN] [--json]``,
``python -m layerscope plan [--configfile FILE] [--directory DIR] [--json]``,
``python -m layerscope export RUN[:VARIANT] --format seed001|seed004|npy --out DIR`` and
``python -m layerscope compare RUN[:VARIANT] RUN[:VARIANT] [--positions last|all|answer|SPAN] [--json]``,
``python -m layerscope serve RUN [--port 8080]`` and ``python -m layerscope worker status|stop``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from layerscope.errors import LayerScopeError
from layerscope.fileio import human_bytes as _human


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
    from layerscope.passes.runs import list_passes

    if list_passes(run.path):
        p(f"passes     {', '.join(list_passes(run.path))} (inspect RUN --pass NAME)")
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
        if a.positions not in ("all", "last", "answer"):  # rows of a span: how many examples have any
            have = int((a.map.offsets[1:] > a.map.offsets[:-1]).sum())
            p(f"    {a.shape[0]} {a.positions} tokens of {have} examples ({len(run) - have} with none)")
    p(f"bytes on disk (activations) {_human(total)}")
    if show_examples:
        from layerscope.data.dataset import example_text
        from layerscope.fileio import read_json
        from layerscope.models.loading import load_tokenizer
        from layerscope.data.tokens import token_texts
        from layerscope.store.reader import model_dir

        tok = load_tokenizer(read_json(model_dir(run.path) / "manifest.json"))
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


def inspect_pass(run_dir: str, name: str | None, show_examples: int = 0, compare_with: str | None = None,
                 as_json: bool = False, out=sys.stdout) -> dict:
    """Print the report on one prompted pass of a run (layerscope.passes.report), as text or JSON."""
    from layerscope.passes.report import format_report, pass_report, to_json

    rep = pass_report(run_dir, name, show_examples, compare_with)
    print(to_json(rep) if as_json else format_report(rep), file=out)
    return rep


def plan_run(configfile: str | None, directory: str, as_json: bool = False, out=sys.stdout) -> dict:
    """Print what the workflow would capture from ``configfile`` (default: the embedded demo config) and
    what it would cost: jobs, bytes per site, boundaries, and the weights each capture job holds."""
    import json
    from pathlib import Path

    import yaml

    from layerscope.config import build_plan, with_location
    from layerscope.analysis.costs import estimate, plan_tokens
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
    try:
        plan = build_plan(cfg, schema, base)
    except ConfigError as e:
        raise ConfigError(with_location(str(e), [cfg_path])) from e
    device = resolve_device(plan.config["capture"]["device"])
    dtype = str(resolve_dtype(plan.config["model"]["dtype"], device)).removeprefix("torch.")
    results = base / "results" / plan.config["run"]
    est = estimate(plan, *plan_tokens(plan, results), dtype, "cpu" if device == "cpu" else "gpu")
    if plan.passes:
        from layerscope.passes.costs import pass_estimates

        est["passes"] = pass_estimates(plan, results, dtype)
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
          + ("; hands on a boundary" if b["writes_boundary"] else "")
          + (f"; memory {_human(b['host_bytes'])}" if est["device"] == "cpu" else
             f"; GPU {_human(b['device_bytes'])}, host {_human(b['host_bytes'])}")
          + f" (batch-by-length window {_human(b['window_bytes'])})")
    p(f"arrays     {len(est['arrays'])} arrays, {est['shards']} shards, {_human(est['array_bytes'])} ({cap['dtype']}), "
      f"{_human(est['disk_bytes'])} on disk")
    for site, nbytes in sorted(est["bytes_per_site"].items()):
        p(f"  {site:<11} {_human(nbytes)}")
    p(f"boundaries {_human(est['boundary_bytes'])} in all ({', '.join(_human(x) for x in est['boundary_bytes_per_part'])}"
      f" per boundary and part), {'kept' if cap['boundaries'] == 'keep' else 'deleted once used'}")
    p("memory     per job, beyond the Python runtime (~0.4 GiB): weights + one batch at the longest example"
      + ("" if est["device"] == "cpu" else " on the GPU; on the host") + " + rows held by the window")
    if est.get("passes"):
        ps = est["passes"]
        p(f"passes     {len(ps)} prompted passes, {sum(x['jobs'] for x in ps)} jobs, "
          f"{_human(sum(x['array_bytes'] for x in ps))} of arrays in all")
        for x in ps:
            most = "" if x["exact"] else "at most "
            p(f"  {x['name']:<16} {x['jobs']} jobs ({x['capture_jobs']} capture); {x['questions']} questions, "
              f"{most}{x['tokens']} tokens; arrays {most}{_human(x['array_bytes'])}, {_human(x['disk_bytes'])} on "
              f"disk; boundaries {_human(x['boundary_bytes'])}")
        if not all(x["exact"] for x in ps):
            p("           (at most: replies counted at generate.max_new_tokens until the model has answered)")
    return est


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers separated by commas, e.g. 0,3,-1; got {text!r}")


def _positions(text: str) -> str:
    from layerscope.store.rows import MODES, is_span

    if text in MODES or is_span(text):
        return text
    raise argparse.ArgumentTypeError(f"expected last, all, answer or a span (prompt, response, role:NAME); got {text!r}")


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def export_run(run: str, fmt: str, out_dir: str, layers: list[int] | None = None, sites: list[str] | None = None,
               force: bool = False, shard_size: int = 512, padding: str = "left", out=sys.stdout) -> None:
    """Write a run in an older layout (see layerscope.interop) and say where."""
    from layerscope.interop.export import export

    dest = export(run, fmt, out_dir, layers=layers, sites=sites, force=force, shard_size=shard_size,
                  padding=padding)
    files = [f for f in dest.rglob("*") if f.is_file()]
    print(f"exported {run} as {fmt} to {dest}: {len(files)} files, {_human(sum(f.stat().st_size for f in files))}",
          file=out)


def compare_runs(run_a: str, run_b: str, positions: str = "last", as_json: bool = False,
                 layers: list[int] | None = None, sites: list[str] | None = None, out=sys.stdout) -> list:
    """Print how two runs on the same tokens differ, per layer x site x split (table or JSON)."""
    import json
    import math

    from layerscope.analysis.compare import compare, compared_arrays, unpaired
    from layerscope.store.variants import open_ref

    (a, va), (b, vb) = open_ref(run_a), open_ref(run_b)
    rows = compare(a, b, positions=positions, layers=layers, sites=sites)
    both, only_a, only_b = compared_arrays(a, b, layers, sites)
    other_rank = unpaired(a, b, both)
    names = lambda arrays: [f"layer_{L:02d}/{s}" for L, s in arrays]  # noqa: E731
    if as_json:
        print(json.dumps({"a": {"run": str(a.path), "variant": va}, "b": {"run": str(b.path), "variant": vb},
                          "positions": positions, "only_a": names(only_a), "only_b": names(only_b),
                          "other_rank": names(other_rank),
                          "rows": [r.to_json() for r in rows]}), file=out)
        return rows
    p = lambda *x: print(*x, file=out)  # noqa: E731
    f = lambda x, spec: "nan" if not math.isfinite(x) else format(x, spec)  # noqa: E731
    p(f"A  {run_a}\nB  {run_b}\npositions {positions}; cosine = mean cos(a, b); rel_l2 = ||a - b|| / ||a|| "
      "over the split; |a|, |b| = mean L2 norms")
    head = f"{'array':<22} {'split':<12} {'n':>7} {'cosine':>9} {'rel_l2':>9} {'|a|':>10} {'|b|':>10} {'|b|-|a|':>10} {'rel':>8}"
    p(head)
    for r in rows:
        p(f"{'layer_%02d/%s' % (r.layer, r.site):<22} {r.split[:12]:<12} {r.n:>7} {f(r.cosine, '.6f'):>9} "
          f"{f(r.rel_l2, '.4g'):>9} {f(r.norm_a, '.4g'):>10} {f(r.norm_b, '.4g'):>10} {f(r.norm_change, '+.4g'):>10} "
          f"{f(100 * r.norm_change_rel, '+.2f') + '%':>8}")
    for who, arrays in (("A", only_a), ("B", only_b)):
        if arrays:
            p(f"only in {who} (not compared): {', '.join(names(arrays))}")
    if other_rank:
        p(f"LoRA arrays of different ranks (not compared): {', '.join(names(other_rank))}")
    return rows


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    return f"{s // 60} min {s % 60:02d} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60:02d} min"


def worker_command(action: str, out=sys.stdout) -> None:
    """``status``: one line per live warm worker of this user; ``stop``: stop them all (each stops
    taking jobs at once and exits once its running steps end), waiting up to a minute."""
    import time

    from layerscope import worker

    try:
        if action == "status":
            live = worker.servers()
        else:
            stopped, left = worker.stop_servers()
    except worker.Unavailable as e:
        raise LayerScopeError(f"worker {action}: {e}") from e
    if action == "stop":
        print(f"stopped {stopped} warm worker{'s' * (stopped != 1)}" + (
            f"; {left} still finishing running steps (each exits when they end)" if left else ""), file=out)
        return
    if not live:
        print("no warm worker running", file=out)
    now = time.time()
    for s in live:
        busy = (f"running {s['running']} step{'s' * (s['running'] != 1)}" if s["running"] else
                f"idle for {_duration(now - s['idle_since'])} (exits after {_duration(s['idle_s'])})")
        whose = "" if s["owner"] is None else f" (for snakemake {s['owner']})"
        stopping = ", stopping" if s["state"] == "stopping" else ""
        print(f"pid {s['pid']}  key {s['key']}{whose}  age {_duration(now - s['started'])}  {busy}{stopping}  "
              f"steps run {s['steps']}  log {s['log']}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layerscope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="print a summary of a run directory")
    ins.add_argument("run_dir", help="a run directory, e.g. results/demo")
    ins.add_argument("--show-examples", type=int, default=0, metavar="N", help="print the first N examples")
    ins.add_argument("--pass", dest="pass_name", metavar="PASS",
                     help="report on this prompted pass of the run (accuracy, entropy, calibration...)")
    ins.add_argument("--compare-with", metavar="OTHER_RUN",
                     help="with --pass: the same pass of another run (e.g. fine-tuned vs base), side by side")
    ins.add_argument("--json", action="store_true", help="with --pass: one JSON object instead of text")
    pl = sub.add_parser("plan", help="print what a config would capture and what it would cost, before running")
    pl.add_argument("--configfile", help="the workflow config (default: config/config.yaml of --directory)")
    pl.add_argument("--directory", default=".", help="the working directory snakemake would run in")
    pl.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    ex = sub.add_parser("export", help="write a run in an older layout: seed001, seed004, or plain .npy files")
    ex.add_argument("run", help="a run directory, optionally with :VARIANT")
    ex.add_argument("--format", required=True, choices=["seed001", "seed004", "npy"], dest="fmt")
    ex.add_argument("--out", required=True, help="the directory to write (replaced whole, at the end)")
    ex.add_argument("--layers", type=_int_list, help="layers to export, e.g. 0,3,-1 (default: all stored)")
    ex.add_argument("--sites", type=_str_list, help="sites to export (seed formats: resid_post only)")
    ex.add_argument("--shard-size", type=int, default=512, help="seed001: examples per shard (default 512)")
    ex.add_argument("--padding", choices=["left", "right"], default="left",
                    help="seed004: pad side of [n, seq_len, hidden] (default left: acts[i, -1] is the last token)")
    ex.add_argument("--force", action="store_true", help="replace a non-empty --out")
    es = sub.add_parser("export-steering", help="write a steered run as seed 000's JSON files, one per example")
    es.add_argument("run", help="the run directory (results/RUN)")
    es.add_argument("target", help="the steered run, e.g. happy_L16_s2 (see results/RUN/steering/)")
    es.add_argument("--out", required=True, help="the directory to write (replaced whole, at the end)")
    es.add_argument("--regions", type=int, default=64, help="regions each layer is downsampled to (default 64)")
    es.add_argument("--force", action="store_true", help="replace a non-empty --out")
    cmp = sub.add_parser("compare", help="compare two runs on the same tokens, per layer x site x split")
    cmp.add_argument("run_a", help="run A: a run directory, optionally with :VARIANT")
    cmp.add_argument("run_b", help="run B, likewise")
    cmp.add_argument("--positions", type=_positions, default="last", metavar="{last,all,answer,SPAN}",
                     help="each example's last token (default), every token, its answer position (prompted "
                          "passes: the prompts must agree up to it, the replies may differ), or a span's tokens "
                          "(prompt, response, role:NAME)")
    cmp.add_argument("--layers", type=_int_list, help="layers to compare, e.g. 0,3,-1 (default: all in both)")
    cmp.add_argument("--sites", type=_str_list, help="sites to compare (default: all in both)")
    cmp.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    srv = sub.add_parser("serve", help="serve a run's dashboard on 127.0.0.1, saving interpretations to "
                                       "RUN/interpretations.json")
    srv.add_argument("run_dir", help="a run directory, e.g. results/demo")
    srv.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080; 0: any free port)")
    wk = sub.add_parser("worker", help="the warm workers model jobs run in: list them (status) or stop them (stop)")
    wk.add_argument("action", choices=["status", "stop"])
    args = parser.parse_args(argv)
    if args.command == "inspect" and args.show_examples < 0:
        parser.error("--show-examples: must be 0 or more")
    if args.command == "serve" and not 0 <= args.port <= 65535:
        parser.error("--port: must be 0 to 65535")
    try:
        if args.command == "worker":
            worker_command(args.action)
        elif args.command == "plan":
            plan_run(args.configfile, args.directory, args.json)
        elif args.command == "export-steering":
            from layerscope.interop.steering import export_steering

            dest = export_steering(args.run, args.target, args.out, args.regions, args.force)
            print(f"exported steered run {args.target} to {dest}: {len(list(dest.glob('*.json')))} files")
        elif args.command == "export":
            export_run(args.run, args.fmt, args.out, args.layers, args.sites, args.force, args.shard_size,
                       args.padding)
        elif args.command == "serve":
            from layerscope.web.serve import serve

            serve(args.run_dir, args.port)
        elif args.command == "compare":
            compare_runs(args.run_a, args.run_b, args.positions, args.json, args.layers, args.sites)
        else:
            from layerscope.passes.runs import is_pass_dir

            if args.pass_name is not None or is_pass_dir(args.run_dir):
                inspect_pass(args.run_dir, args.pass_name, args.show_examples, args.compare_with, args.json)
            elif args.compare_with is not None or args.json:
                from layerscope.passes.runs import describe_passes

                raise LayerScopeError(f"--compare-with and --json need --pass PASS; {args.run_dir}: "
                                      f"{describe_passes(args.run_dir)}")
            else:
                inspect_run(args.run_dir, args.show_examples)
    except LayerScopeError as e:
        print(f"layerscope: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... | head` closed the pipe: not an error
        sys.stdout = open(os.devnull, "w")
    return 0
