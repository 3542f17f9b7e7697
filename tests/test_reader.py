"""Reading a finished run back: lazy views by layer, site, split and example; shard iteration; inspect."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

import layerscope
from layerscope.dataset import example_text
from layerscope.errors import LayerScopeError
from layerscope.reader import bf16_to_float32


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
