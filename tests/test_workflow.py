"""The whole workflow on the embedded default config, through Snakemake: outputs, re-runs, parallelism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import yaml

import layerscope
from tests.conftest import REPO, copy_inputs, planned_jobs, run_snakemake

RUN = "results/demo"


def test_outputs(demo):
    run = demo / RUN
    for f in ["model/manifest.json", "dataset/token_ids.npy", "dataset/offsets.npy", "dataset/examples.jsonl",
              "activations.zarr/zarr.json", "metadata.json", "run_config.json", "summaries/summary.json",
              "dashboard/index.html"]:
        assert (run / f).is_file(), f
    for rule in ["fetch_model", "fetch_adapter", "prepare_dataset", "store", "metadata", "summarize", "dashboard",
                 "capture/L00-01_part0", "capture/L02-03_part1"]:
        assert (demo / "logs/demo" / f"{rule}.log").is_file(), rule
    assert (run / "benchmarks/capture_L00-01_part0.tsv").is_file()
    md = json.loads((run / "metadata.json").read_text())
    for key in ["model_name", "dataset_name", "split", "load_in_4bit", "total_examples", "shard_size",
                "batch_size", "hidden_dim", "num_layers", "model_revision", "adapter", "layers", "sites",
                "positions", "dtype", "splits", "layerscope_version", "created"]:
        assert key in md, key
    examples = [json.loads(x) for x in (run / "dataset/examples.jsonl").read_text().splitlines()]
    assert md["total_examples"] == len(examples) == 19
    assert md["split"] == ["EM", "Neutral"] and md["num_layers"] == 4 and md["hidden_dim"] == 64
    assert sum(s["tokens"] for s in md["splits"].values()) == md["total_tokens"]
    cfg = json.loads((run / "run_config.json").read_text())
    assert cfg["config"]["capture"]["layers_per_job"] == 2 and cfg["manifest"]["model"]["id"] == "builtin:llama-tiny"

    r = layerscope.open(run)
    assert r.layers == [0, 1, 2, 3] and r.sites == ["attn_out", "mlp_act", "mlp_out", "resid_post"]
    assert r.splits == {"EM": (0, 9), "Neutral": (9, 19)}
    acts = r.activations(2, "mlp_act", split="Neutral")
    assert len(acts) == 10 and acts[0].shape == (examples[9]["n_tokens"], 172)
    assert not np.isnan(r.activations(3, "resid_post").numpy()).any()
    html = (run / "dashboard/index.html").read_text(encoding="utf-8")
    assert "<b>bold</b>" not in html and "http://" not in html and "https://" not in html


def test_second_run_does_nothing(demo):
    assert planned_jobs(demo) == []
    res = run_snakemake(demo, "-n")
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr


def _downstream():
    return [("all", ()), ("dashboard", ()), ("metadata", ()), ("store", ()), ("summarize", ())]


def test_one_layer_change_reruns_only_its_job(demo):
    cfg_path = demo / "config/config.yaml"
    original = cfg_path.read_text()
    try:
        cfg = yaml.safe_load(original)
        cfg["capture"]["overrides"] = {"3": {"positions": "last"}}
        cfg_path.write_text(yaml.safe_dump(cfg))
        jobs = planned_jobs(demo)
        assert jobs == sorted([("capture_L02-03", (("part", "0"),)), ("capture_L02-03", (("part", "1"),))]
                              + _downstream())
    finally:
        cfg_path.write_text(original)
    assert planned_jobs(demo) == []


def test_deleting_one_array_reruns_only_its_job(demo, tmp_path):
    arr = demo / RUN / "activations.zarr/layer_01/mlp_act"
    backup = tmp_path / "mlp_act"
    shutil.copytree(arr, backup, copy_function=shutil.copy2)
    shutil.rmtree(arr)
    try:
        jobs = planned_jobs(demo)
        assert jobs == sorted([("capture_L00-01", (("part", "0"),)), ("capture_L00-01", (("part", "1"),))]
                              + _downstream())
    finally:
        shutil.copytree(backup, arr, copy_function=shutil.copy2)


def _store_bytes(run: Path) -> dict[str, bytes]:
    """Every file of the store that holds data or array metadata (markers carry job ids and timings)."""
    root = run / "activations.zarr"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "parts" not in p.parts and p.relative_to(root) != Path("zarr.json")}


def test_parallel_equals_serial(demo, tmp_path):
    serial = copy_inputs(tmp_path / "serial")
    parallel = copy_inputs(tmp_path / "parallel")
    for wd, cores in ((serial, "1"), (parallel, "4")):
        res = run_snakemake(wd, "--cores", cores, "store")
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = _store_bytes(serial / RUN), _store_bytes(parallel / RUN)
    assert len(a) > 16 and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    c = _store_bytes(demo / RUN)
    assert [k for k in a if a[k] != c[k]] == []


def test_lint_is_clean(demo):
    res = run_snakemake(demo, "--lint")
    assert res.returncode == 0 and "Congratulations" in res.stdout + res.stderr
