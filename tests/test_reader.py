"""Reading a finished run back: lazy views by layer, site, split and example; shard iteration; inspect."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import zarr

import layerscope
from layerscope.data.dataset import example_text
from layerscope.errors import IncompleteRunError, LayerScopeError
from layerscope.store.reader import bf16_to_float32


@pytest.fixture(scope="module")
def run(demo):
    return layerscope.open(demo / "results/demo")


def test_views_by_split_and_example(run):
    offsets = run.offsets
    full = zarr.open_array(str(run.path / "activations.zarr/layer_01/resid_post"), mode="r")[:]
    acts = run.activations(1, "resid_post")
    assert acts.positions == "all" and acts.shape == full.shape
    np.testing.assert_array_equal(acts.numpy(), full)
    for split, (a, b) in run.splits.items():
        view = run.activations(1, "resid_post", split=split)
        assert len(view) == b - a
        np.testing.assert_array_equal(view.numpy(), full[offsets[a]:offsets[b]])
        for i in (0, len(view) - 1, -1):
            e = a + (i % len(view))
            np.testing.assert_array_equal(view[i], full[offsets[e]:offsets[e + 1]])
            assert run.examples[e]["split"] == split
    sub = acts[3:6]
    np.testing.assert_array_equal(sub.numpy(), full[offsets[3]:offsets[6]])
    with pytest.raises(IndexError):
        acts[len(acts)]


def test_iter_shards_covers_every_row_once(run):
    acts = run.activations(0, "mlp_act", split="Neutral")
    got = list(acts.iter_shards())
    assert got[0][0][0] == 0 and got[-1][0][1] == acts.shape[0]
    assert all(x[0][1] == y[0][0] for x, y in zip(got, got[1:]))
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), acts.numpy())


def test_tokens_and_errors(run):
    ids = np.load(run.path / "dataset/token_ids.npy")
    assert run.tokens(2).tolist() == ids[run.offsets[2]:run.offsets[3]].tolist()
    with pytest.raises(LayerScopeError, match="no array layer_09/resid_post"):
        run.activations(9, "resid_post")
    with pytest.raises(LayerScopeError, match="no split 'Nope'"):
        run.activations(0, "resid_post", split="Nope")


def test_bf16_widening_is_exact():
    x = torch.randn(1000, dtype=torch.float32).to(torch.bfloat16)
    raw = x.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bf16_to_float32(raw), x.float().numpy())


def test_inspect_cli(run):
    out = subprocess.run([sys.executable, "-m", "layerscope", "inspect", str(run.path), "--show-examples", "2"],
                         capture_output=True, text=True, check=True).stdout
    md = json.loads((run.path / "metadata.json").read_text())
    assert f"{md['total_examples']} examples" in out
    assert "split 'EM': 9 examples" in out and "split 'Neutral': 10 examples" in out
    assert "layer_03/mlp_act" in out and "shape [" in out and "bytes on disk" in out
    ex0 = run.examples[0]
    assert f"id={ex0['id']}" in out and repr(example_text(ex0)) in out
    assert "rendered" not in ex0 and f"text:   {ex0['text']!r}" in out  # shown once, not again in "fields"
    assert "'text':" not in out
    assert out.count("\n[") == 2
    bad = subprocess.run([sys.executable, "-m", "layerscope", "inspect", str(run.path / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "no metadata.json" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "layerscope", "inspect", str(run.path), "--show-examples", "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--show-examples" in bad.stderr


@pytest.fixture
def run_copy(demo, tmp_path):
    """A private copy of the demo run, free to damage."""
    shutil.copytree(demo / "results/demo", tmp_path / "demo", symlinks=True)
    return tmp_path / "demo"


def test_finished_run_opens_without_warnings(demo):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layerscope.open(demo / "results/demo")


def test_open_refuses_metadata_and_store_that_disagree(run_copy):
    """metadata.json is written beside the store's finalization, not after it: a run where either
    is left from an earlier config (the other job killed) is refused, whichever is the older."""
    md = json.loads((run_copy / "metadata.json").read_text())
    arrays = md["arrays"]
    first = next(iter(arrays))
    for changed in ({**arrays, "layer_09/resid_post": arrays[first]},  # metadata newer: an array added
                    {k: v for k, v in arrays.items() if k != first}):  # the store newer
        (run_copy / "metadata.json").write_text(json.dumps({**md, "arrays": changed}))
        with pytest.raises(IncompleteRunError, match="metadata.json and activations.zarr list different arrays"):
            layerscope.open(run_copy)
    (run_copy / "metadata.json").write_text(json.dumps(md))
    assert layerscope.open(run_copy).layers == sorted({v["layer"] for v in arrays.values()})


def test_open_run_refuses_reads_while_an_array_is_rewritten(run_copy):
    run = layerscope.open(run_copy)
    acts = run.activations(1, "resid_post")
    sub = acts[2:5]
    other = run.activations(2, "mlp_out")
    before, other_before = acts.numpy(), other.numpy()
    marker = run_copy / "activations.zarr/layer_01/resid_post/parts/1-all.json"
    good = marker.read_text()
    job = json.loads(good)["job"]
    # a re-run's job wrote its marker in place: same inode and size, another job id
    marker.write_text(good.replace(job, "f" * len(job)))
    reads = {"numpy": acts.numpy, "torch": acts.torch, "example": lambda: acts[0], "rows": lambda: acts.rows(0, 2),
             "take": lambda: acts.take([0, 3]), "iter_shards": lambda: next(acts.iter_shards()),
             "slice": sub.numpy, "view": lambda: run.activations(1, "resid_post"),
             "split": lambda: run.activations(1, "resid_post", split="EM")}
    for name, read in reads.items():
        with pytest.raises(IncompleteRunError, match=r"layer_01/resid_post part 1 was removed or is being rewritten "
                                                     r"since this run was opened"):
            read()
    np.testing.assert_array_equal(other.numpy(), other_before)  # other arrays are untouched
    marker.unlink()  # Snakemake removes a job's outputs before it runs
    with pytest.raises(IncompleteRunError, match="part 1 was removed"):
        acts[0]
    marker.write_text(good)
    os.utime(marker, ns=(1, 1))  # touched but still the finalized job: reads go on
    np.testing.assert_array_equal(acts.numpy(), before)
    np.testing.assert_array_equal(sub.numpy(), before[int(run.offsets[2]):int(run.offsets[5])])


def test_marker_check_is_cheap(run_copy, monkeypatch):
    """Unchanged markers are stat'ed, never re-read, on every read after the first."""
    import layerscope.store.reader as reader

    acts = layerscope.open(run_copy).activations(0, "resid_post")
    calls = []
    monkeypatch.setattr(reader, "read_json", lambda p: calls.append(p) or json.loads(open(p).read()))
    for i in range(5):
        acts[i]
    acts.numpy()
    assert calls == []


def test_negative_layers_count_from_the_models_last(run_copy):
    run = layerscope.open(run_copy)
    n = run.metadata["num_layers"]
    assert n == 4
    np.testing.assert_array_equal(run.activations(-1, "mlp_act").numpy(), run.activations(3, "mlp_act").numpy())
    np.testing.assert_array_equal(run.activations(-4, "resid_post", split="EM")[0],
                                  run.activations(0, "resid_post", split="EM")[0])
    assert run.bytes_on_disk(-1, "mlp_act") == run.bytes_on_disk(3, "mlp_act")
    with pytest.raises(LayerScopeError, match="layer -5 is out of range for a model with 4 layers"):
        run.activations(-5, "resid_post")
    # -1 is the model's last layer, not the last stored one: pretend the model has 6 layers
    md = json.loads((run_copy / "metadata.json").read_text())
    (run_copy / "metadata.json").write_text(json.dumps({**md, "num_layers": 6}))
    run6 = layerscope.open(run_copy)
    with pytest.raises(LayerScopeError, match="no array layer_05/resid_post"):
        run6.activations(-1, "resid_post")
    np.testing.assert_array_equal(run6.activations(-3, "attn_out").numpy(), run.activations(3, "attn_out").numpy())


def test_open_warns_when_the_model_changed_on_disk(run_copy, tmp_path):
    manifest = json.loads((run_copy / "model/manifest.json").read_text())
    weights = tmp_path / "weights"
    shutil.copytree(manifest["model"]["path"], weights)
    from layerscope.models.loading import fetch, parse_ref

    manifest["model"] = fetch(parse_ref({"id": str(weights)}), tmp_path / "unused")
    (run_copy / "model/manifest.json").write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layerscope.open(run_copy)
    with open(weights / "config.json", "a") as f:
        f.write("\n")
    with pytest.warns(UserWarning, match=rf"{run_copy}: model {weights} changed on disk since this run was captured: "
                                         r"config\.json changed size \(\d+ -> \d+ bytes\)") as got:
        run = layerscope.open(run_copy)
    assert len(got) == 1 and run.activations(0, "resid_post").shape[0] > 0  # a warning, not a refusal


def test_inspect_flags_out_of_range_values(run_copy):
    md = json.loads((run_copy / "metadata.json").read_text())
    md["arrays"]["layer_02/resid_post"].update(nonfinite=7, clipped=5)
    (run_copy / "metadata.json").write_text(json.dumps(md))
    out = subprocess.run([sys.executable, "-m", "layerscope", "inspect", str(run_copy)], capture_output=True,
                         text=True, check=True).stdout
    flagged = [line for line in out.splitlines() if "NaN/inf" in line]
    assert len(flagged) == 1 and "layer_02/resid_post" in flagged[0] and "7 NaN/inf (5 out of float16 range)" in flagged[0]


def test_to_xarray_is_lazy_and_labelled(demo):
    pytest.importorskip("xarray")
    import layerscope

    run = layerscope.open(demo / "results" / "demo")
    ds = run.to_xarray()
    var = ds["layer_02.resid_post"]
    assert var.dims == ("token", "hidden") and var.shape == run.activations(2, "resid_post").shape
    assert type(var.data).__module__.startswith("dask")  # nothing read yet
    em = var.isel(token=(ds.token_split == "EM").values).values
    np.testing.assert_array_equal(em, run.activations(2, "resid_post", split="EM").numpy())
    e = 4  # a token's coordinates: its example, that example's id and split, its position, its id
    t0 = int(run.offsets[e]) + 2
    tok = ds.isel(token=t0)
    assert (int(tok.token_example), tok.token_example_id.item(), tok.token_split.item(), int(tok.position)) == \
        (e, run.examples[e]["id"], run.examples[e]["split"], 2)
    assert int(tok.token_id) == int(run.tokens(e)[2])
    assert ds["layer_00.mlp_act"].dims == ("token", "neuron") and ds["layer_00.mlp_act"].dtype == np.float16  # as stored


def test_to_xarray_widens_bfloat16(other_run):
    pytest.importorskip("xarray")
    import layerscope

    run = layerscope.open(other_run)
    layer, site = next((L, s) for L, s in run.arrays)
    assert run.activations(layer, site).dtype == "bfloat16"
    var = run.to_xarray()[f"layer_{layer:02d}.{site}"]
    assert var.dtype == np.float32
    np.testing.assert_array_equal(var.values, run.activations(layer, site).numpy())


def test_plain_xarray_can_select_a_split_from_the_store(demo):
    """Without LayerScope: the store holds each example's id and split and each token's example."""
    xr = pytest.importorskip("xarray")
    import layerscope

    store = demo / "results" / "demo" / "activations.zarr"
    run = layerscope.open(demo / "results" / "demo")
    ex = xr.open_zarr(store, group="examples", consolidated=False)
    tok = xr.open_zarr(store, group="tokens", consolidated=False)
    assert list(ex.id.values) == [e["id"] for e in run.examples]
    layer = xr.open_zarr(store, group="layer_01", consolidated=False)
    in_em = (ex.split.values == "EM")[tok.example.values]
    np.testing.assert_array_equal(layer.resid_post.values[in_em], run.activations(1, "resid_post", "EM").numpy())
