"""Steering: a vector added to the residual stream at one layer, through the chained capture."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from layerscope.capture.chain import boundary_path
from layerscope.capture.run import run_capture
from layerscope.data.dataset import load_tokens
from layerscope.store.layout import finalize
from tests.helpers import capture_store, make_params, prepare_texts

LAYERS = {L: {"sites": ["resid_post"], "positions": "all"} for L in range(4)}


@pytest.fixture(scope="module")
def normal(model_factory, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("steer")
    m = model_factory("llama-tiny")
    ds = prepare_texts(tmp, m)
    params = make_params(LAYERS, parts=1)
    root = capture_store(tmp, {"model": m, "adapter": None}, params, ds, name="normal", layers_per_job=2)
    return tmp, m, ds, params, root


def steered(tmp, m, ds, params, name, layer, strength, positions="all", vector=None):
    """The steered chain: from the block holding ``layer`` (reading the normal boundary into it) up."""
    vec = vector if vector is not None else np.random.default_rng(7).normal(size=m["hidden_size"]).astype(np.float32)
    steer = {"name": name, "layer": layer, "strength": strength, "positions": positions, "vector": vec}
    root = tmp / f"{name}.zarr"
    first = layer // 2 * 2
    for start in range(first, 4, 2):
        end = start + 1
        caps = [(L, "resid_post", "all") for L in range(start, end + 1)]
        job = {k: v for k, v in params.items() if k != "layers"} | {"block": [start, end]}
        b_in = None
        if start == first and start > 0:
            b_in = boundary_path(tmp / "normal-chain", start, 0)
        elif start > first:
            b_in = boundary_path(tmp / f"{name}-chain", start, 0)
        run_capture({"model": m, "adapter": None}, ds, root, job, 0, caps, device="cpu", group=f"L{start}",
                    boundary_in=b_in, boundary_out=boundary_path(tmp / f"{name}-chain", end + 1, 0) if end < 3 else None,
                    steer=steer)
    ids, offsets = load_tokens(ds)
    finalize(root, [(L, "resid_post", "all") for L in range(first, 4)], 1, ids, offsets, {"run": "test"})
    return zarr.open_group(str(root), mode="r"), vec


def test_strength_zero_is_the_normal_run_byte_for_byte(normal):
    tmp, m, ds, params, root = normal
    g, _ = steered(tmp, m, ds, params, "zero", 1, 0.0)
    for L in range(4):
        a = (root / f"layer_{L:02d}" / "resid_post" / "c").rglob("*")
        for f in sorted(p for p in a if p.is_file()):
            rel = f.relative_to(root)
            assert (tmp / "zero.zarr" / rel).read_bytes() == f.read_bytes(), rel


@pytest.mark.parametrize("layer", [1, 2])  # inside the first block; at the start of the second
def test_vector_lands_at_its_layer_and_only_from_there(normal, layer):
    tmp, m, ds, params, root = normal
    g, vec = steered(tmp, m, ds, params, f"up{layer}", layer, 3.0)
    n = zarr.open_group(str(root), mode="r")
    for L in range(layer // 2 * 2, 4):
        diff = g[f"layer_{L:02d}/resid_post"][:].astype(np.float64) - n[f"layer_{L:02d}/resid_post"][:]
        if L < layer:
            assert not diff.any()
        elif L == layer:  # every real token's residual stream moves by exactly strength x vector
            np.testing.assert_allclose(diff, np.broadcast_to(3.0 * vec, diff.shape), atol=1e-5)
        else:
            assert np.abs(diff).max() > 1e-3


def test_last_position_steering_moves_only_last_tokens(normal):
    tmp, m, ds, params, root = normal
    g, vec = steered(tmp, m, ds, params, "last1", 1, -2.0, positions="last")
    n = zarr.open_group(str(root), mode="r")
    _, offsets = load_tokens(ds)
    diff = g["layer_01/resid_post"][:].astype(np.float64) - n["layer_01/resid_post"][:]
    last = offsets[1:] - 1
    np.testing.assert_allclose(diff[last], np.broadcast_to(-2.0 * vec, diff[last].shape), atol=1e-5)
    others = np.setdiff1d(np.arange(len(diff)), last)
    assert not diff[others].any()


SEED000_SCHEMA = {  # the fields of seed 000's files, as its README lays them out
    "type": "object",
    "required": ["metadata", "normal_activations", "steered_activations", "difference_activations", "tokens",
                 "layer_correlations", "peak_activation_layer", "total_intensity", "top_correlated_layers"],
    "properties": {
        "metadata": {"type": "object", "required": ["model", "prompt", "concept_name", "injection_layer",
                                                    "injection_strength", "sequence_length", "num_layers",
                                                    "hidden_size", "downsampled_regions", "timestamp"],
                     "properties": {"injection_layer": {"type": "integer"}, "injection_strength": {"type": "number"},
                                    "sequence_length": {"type": "integer"}, "downsampled_regions": {"type": "integer"},
                                    "prompt": {"type": "string"}, "concept_name": {"type": "string"}}},
        **{k: {"type": "object", "patternProperties": {"^[0-9]+$": {"type": "array", "items": {"type": "number"}}},
               "additionalProperties": False}
           for k in ("normal_activations", "steered_activations", "difference_activations")},
        "tokens": {"type": "array", "items": {"type": "string"}},
        "layer_correlations": {"type": "object", "patternProperties": {"^[0-9]+$": {"type": "number"}},
                               "additionalProperties": False},
        "peak_activation_layer": {"type": "integer"},
        "total_intensity": {"type": "number"},
        "top_correlated_layers": {"type": "array", "items": {"type": "integer"}},
    },
}


@pytest.fixture(scope="module")
def steered_workflow(tmp_path_factory):
    import yaml

    from tests.conftest import copy_inputs, run_snakemake

    wd = copy_inputs(tmp_path_factory.mktemp("steerflow"))
    np.save(wd / "config" / "up.npy", np.random.default_rng(3).normal(size=(4, 64)).astype(np.float32))
    cfg = yaml.safe_load((wd / "config" / "config.yaml").read_text())
    cfg["capture"]["sites"] = ["resid_post", "mlp_out"]
    cfg["steering"] = {
        "vectors": {"up": {"file": "config/up.npy"},
                    "calm": {"contrast": {"layer": 1, "split_a": "EM", "split_b": "Neutral"}, "normalize": True}},
        "runs": [{"concept": "up", "layer": 2, "strength": [0, 3]},
                 {"concept": "calm", "layer": 1, "strength": 2, "positions": "last"}],
        "regions": 8, "generate": {"examples": 2, "max_new_tokens": 6}}
    (wd / "config" / "steer.yaml").write_text(yaml.safe_dump(cfg))
    res = run_snakemake(wd, "--cores", "2", configfile=wd / "config" / "steer.yaml")
    assert res.returncode == 0, res.stderr[-4000:]
    return wd, cfg


def test_workflow_steered_runs(steered_workflow):
    import json

    import layerscope

    wd, cfg = steered_workflow
    run_dir = wd / "results" / "demo"
    normal = layerscope.open(run_dir)
    zero = layerscope.open(run_dir, "steer-up_L02_s0")
    assert zero.arrays == [(L, s) for L, s in normal.arrays if L >= 2]  # the chain re-runs from L02-03 only
    for L, s in zero.arrays:  # strength 0: the normal run, byte for byte
        np.testing.assert_array_equal(zero.activations(L, s).numpy(raw=True), normal.activations(L, s).numpy(raw=True))
    s3 = json.loads((run_dir / "steering" / "up_L02_s3" / "summary.json").read_text())
    assert s3["correlation"]["2"] > 0.99 and s3["correlation"]["0"] == 0.0 and s3["intensity"]["1"] == 0.0
    assert s3["peak_layer"] >= 2 and s3["top_correlated_layers"][0] == 2
    # the contrastive vector: mean last-token resid_post of EM minus Neutral at layer 1, normalised
    means = []
    for split in ("EM", "Neutral"):
        acts = normal.activations(1, "resid_post", split)
        means.append(np.mean([np.asarray(acts[i], dtype=np.float64)[-1] for i in range(len(acts))], axis=0))
    want = (means[0] - means[1]) / np.linalg.norm(means[0] - means[1])
    np.testing.assert_allclose(np.load(run_dir / "steering" / "vectors" / "calm.npy"), want, rtol=1e-5, atol=1e-6)
    calm = layerscope.open(run_dir, "steer-calm_L01_s2")
    assert (0, "resid_post") in calm.arrays  # steered at layer 1: its chain starts at the embeddings


def test_generations_normal_and_steered(steered_workflow):
    import json

    wd, _ = steered_workflow
    gens = {t: [json.loads(line) for line in (wd / "results/demo/steering" / t / "generations.jsonl").open()]
            for t in ("up_L02_s0", "up_L02_s3")}
    assert [len(g) for g in gens.values()] == [2, 2]
    assert all(r["normal"] == r["steered"] for r in gens["up_L02_s0"])  # strength 0 changes nothing
    assert any(r["normal"] != r["steered"] for r in gens["up_L02_s3"])
    assert [r["normal"] for r in gens["up_L02_s0"]] == [r["normal"] for r in gens["up_L02_s3"]]  # greedy: repeatable


def test_export_steering_writes_seed000_files(steered_workflow, tmp_path):
    import json
    import subprocess
    import sys

    import jsonschema

    import layerscope

    wd, _ = steered_workflow
    run_dir = wd / "results" / "demo"
    out = tmp_path / "export"
    res = subprocess.run([sys.executable, "-m", "layerscope", "export-steering", str(run_dir), "up_L02_s3",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    files = sorted(out.glob("*.json"))
    run = layerscope.open(run_dir)
    assert len(files) == len(run)
    doc = json.loads(files[0].read_text())
    jsonschema.validate(doc, SEED000_SCHEMA)
    assert doc["metadata"]["injection_layer"] == 2 and doc["metadata"]["injection_strength"] == 3.0
    assert len(doc["tokens"]) == doc["metadata"]["sequence_length"] == len(run.tokens(0))
    assert doc["layer_correlations"]["2"] > 0.99 and all(v == 0 for v in doc["difference_activations"]["0"])
    bad = subprocess.run([sys.executable, "-m", "layerscope", "export-steering", str(run_dir), "nope", "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "no steered run 'nope'" in bad.stderr and "up_L02_s3" in bad.stderr


def test_adding_a_strength_runs_only_its_jobs(steered_workflow, tmp_path):
    import yaml

    from tests.conftest import planned_jobs

    wd, cfg = steered_workflow
    cfg = {**cfg, "steering": {**cfg["steering"], "runs": cfg["steering"]["runs"] + [
        {"concept": "up", "layer": 2, "strength": 5}]}}
    path = tmp_path / "more.yaml"
    path.write_text(yaml.safe_dump(cfg))
    jobs = sorted(f"{r}:{dict(w).get('part', dict(w).get('variant', dict(w).get('target', '')))}"
                  for r, w in planned_jobs(wd, configfile=path))
    assert jobs == ["all:", "steer_L02-03:0", "steer_L02-03:1", "steering_generate:up_L02_s5",
                    "steering_page:up_L02_s5", "steering_summary:up_L02_s5", "store_variant:steer-up_L02_s5"]


def test_steering_page_in_chromium(steered_workflow):
    """The page opens offline with no error and no request; a cell's value is the numpy norm of the
    difference; the correlation curve has a point per layer; the 3D view turns with the keyboard."""
    from tests.test_dashboard import BROWSER_SKIP, Page

    if BROWSER_SKIP:
        pytest.skip(BROWSER_SKIP)
    import shutil

    from playwright.sync_api import sync_playwright

    import layerscope
    from tests.test_dashboard import CHROMIUM
    from pathlib import Path

    wd, _ = steered_workflow
    run_dir = wd / "results" / "demo"
    page_path = run_dir / "steering" / "up_L02_s3" / "index.html"
    normal, steered = layerscope.open(run_dir), layerscope.open(run_dir, "steer-up_L02_s3")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"))
        pg = Page(b, page_path)
        p = pg.p
        assert p.locator("#views button").count() == 3 and p.locator("#curve circle").count() == 4
        cell = p.locator("#heat td[data-r='3'][data-c='2']")
        cell.focus()
        shown = float(p.text_content("#status").rsplit(": ", 1)[1])
        d = steered.activations(3, "resid_post")[0][2].astype(np.float64) - normal.activations(3, "resid_post")[0][2]
        assert shown == pytest.approx(float(f"{np.linalg.norm(d):.4g}"), rel=1e-6)
        p.keyboard.press("ArrowUp")
        assert p.evaluate("document.activeElement.dataset.r") == "2"
        before = p.text_content("#cube-status")
        p.locator("#cube").focus()
        p.keyboard.press("ArrowRight")
        assert p.text_content("#cube-status") != before
        pg.check_clean()
        b.close()


@pytest.mark.parametrize("arch", ["gpt2-tiny", "opt-tiny", "qwen2-tiny", "mixtral-tiny"])
def test_steering_in_every_supported_architecture(tmp_path, model_factory, arch):
    """The same hook on each architecture's decoder layers: layer 1 moves by exactly strength x vector
    (every real token), layer 0 does not move, and layer 2 is changed downstream."""
    m = model_factory(arch)
    ds = prepare_texts(tmp_path, m)
    layers = {L: {"sites": ["resid_post"], "positions": "all"} for L in range(3)}
    params = make_params(layers, parts=1)
    root = capture_store(tmp_path, {"model": m, "adapter": None}, params, ds, name="normal", layers_per_job=2)
    vec = np.random.default_rng(5).normal(size=m["hidden_size"]).astype(np.float32)
    steer = {"name": "s", "layer": 1, "strength": 2.0, "positions": "all", "vector": vec}
    for start, end in ((0, 1), (2, 2)):
        caps = [(L, "resid_post", "all") for L in range(start, end + 1)]
        job = {k: v for k, v in params.items() if k != "layers"} | {"block": [start, end]}
        run_capture({"model": m, "adapter": None}, ds, tmp_path / "s.zarr", job, 0, caps, device="cpu",
                    group=f"L{start}", steer=steer,
                    boundary_in=boundary_path(tmp_path / "s-chain", start, 0) if start else None,
                    boundary_out=boundary_path(tmp_path / "s-chain", end + 1, 0) if end < 2 else None)
    ids, offsets = load_tokens(ds)
    finalize(tmp_path / "s.zarr", [(L, "resid_post", "all") for L in range(3)], 1, ids, offsets, {"run": "t"})
    n, s = zarr.open_group(str(root), mode="r"), zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    diff = [s[f"layer_{L:02d}/resid_post"][:].astype(np.float64) - n[f"layer_{L:02d}/resid_post"][:] for L in range(3)]
    assert not diff[0].any()
    np.testing.assert_allclose(diff[1], np.broadcast_to(2.0 * vec, diff[1].shape), atol=1e-4)
    assert np.abs(diff[2]).max() > 1e-3
