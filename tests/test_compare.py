"""``compare``: two runs on the same tokens, checked against numpy on the stored arrays (read by
hand with zarr), and refused when their tokens differ."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from layerscope.analysis.compare import compare
from layerscope.errors import LayerScopeError
from layerscope.store.variants import parse_run_ref
from tests.conftest import REPO


def vectors(run_dir: Path, layer: int, site: str, split: str, positions: str) -> np.ndarray:
    """The split's vectors at ``positions``, float64, from the zarr array and the dataset files."""
    arr = zarr.open_array(str(run_dir / f"activations.zarr/layer_{layer:02d}/{site}"), mode="r")
    x = arr[:]
    if arr.attrs["dtype"] == "bfloat16":
        x = (x.astype(np.uint32) << 16).view(np.float32)
    offsets = np.load(run_dir / "dataset/offsets.npy")
    splits = [json.loads(line)["split"] for line in (run_dir / "dataset/examples.jsonl").read_text().splitlines()]
    idx = [i for i, s in enumerate(splits) if s == split]
    e0, e1 = idx[0], idx[-1] + 1
    if arr.attrs["positions"] == "last":
        assert positions == "last"
        return x[e0:e1].astype(np.float64)
    if positions == "last":
        return x[offsets[e0 + 1:e1 + 1] - 1].astype(np.float64)
    return x[offsets[e0]:offsets[e1]].astype(np.float64)


def by_hand(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = [float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))) for u, v in zip(a, b)]
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return {"n": len(a), "cosine": float(np.mean(cos)), "rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
            "norm_a": float(na.mean()), "norm_b": float(nb.mean()), "norm_change": float(np.mean(nb - na)),
            "norm_change_rel": float(np.mean(nb - na) / na.mean())}


@pytest.mark.parametrize("positions,layers", [("last", None), ("all", [1])])
def test_compare_equals_numpy(positions, layers, demo_run, other_run):
    rows = compare(demo_run, other_run, positions=positions, layers=layers)
    shared = [(0, "mlp_out"), (0, "resid_post"), (1, "mlp_out"), (1, "resid_post"), (3, "mlp_out"),
              (3, "resid_post")]
    if layers:
        shared = [x for x in shared if x[0] in layers]
    assert [(r.layer, r.site, r.split) for r in rows] == [(L, s, sp) for L, s in shared for sp in ("EM", "Neutral")]
    for r in rows:
        a = vectors(demo_run, r.layer, r.site, r.split, positions)
        b = vectors(other_run, r.layer, r.site, r.split, positions)
        want = by_hand(a, b)
        assert r.positions == positions and r.n == want.pop("n")
        for k, v in want.items():
            assert getattr(r, k) == pytest.approx(v, rel=1e-9, abs=1e-12), (r.layer, r.site, r.split, k)
        assert r.cosine < 0.5 and r.rel_l2 > 0.5  # different weights: a comparison that could pass by accident cannot


@pytest.mark.parametrize("positions", ["last", "all"])
def test_identical_runs(positions, demo_run):
    rows = compare(demo_run, demo_run, positions=positions)
    assert len(rows) == 4 * 4 * 2
    for r in rows:
        assert r.cosine == pytest.approx(1.0, abs=1e-12) and r.rel_l2 == 0.0
        assert r.norm_change == 0.0 and r.norm_a == r.norm_b > 0
    assert {r.n for r in rows if r.split == "EM"} == ({9} if positions == "last" else {330})


def test_all_positions_need_all_arrays(demo_run, other_run):
    with pytest.raises(LayerScopeError, match="layer_00/mlp_out holds the last position only in .*other"):
        compare(demo_run, other_run, positions="all")


@pytest.fixture
def altered(demo_run, tmp_path):
    """A copy of the demo run whose stored tokens can be changed."""
    shutil.copytree(demo_run, tmp_path / "demo", symlinks=True)
    return tmp_path / "demo"


@pytest.mark.parametrize("token_block", [None, 5])
def test_refuses_runs_whose_tokens_differ(token_block, demo_run, altered, monkeypatch):
    if token_block:  # the first difference found in a later block of token ids
        from layerscope.analysis import compare as mod

        monkeypatch.setattr(mod, "TOKEN_BLOCK", token_block)
    offsets = np.load(demo_run / "dataset/offsets.npy")
    ids = zarr.open_array(str(altered / "activations.zarr/tokens/ids"), mode="r+")
    t = int(offsets[12]) + 3
    ids[t] = int(ids[t]) + 1
    with pytest.raises(LayerScopeError, match=r"first at example 12 \(id 'neutral-03', split 'Neutral'\): "
                                              r"token 3 is \d+ in .* and \d+ in"):
        compare(demo_run, altered)
    ids[t] = int(ids[t]) - 1
    compare(demo_run, altered, layers=[0], sites=["resid_post"])  # restored: the same tokens again
    # one token moved from example 5 to example 6: same ids, different lengths
    off = zarr.open_array(str(altered / "activations.zarr/tokens/offsets"), mode="r+")
    off[6] = int(off[6]) - 1
    with pytest.raises(LayerScopeError, match=r"first at example 5 \(id 'em-05', split 'EM'\): "
                                              r"\d+ tokens in .*, \d+ in"):
        compare(altered, demo_run)


def test_variants_and_run_refs(demo_run, tmp_path):
    with pytest.raises(LayerScopeError, match="no variant .adapter.; it has no variants, only its main store"):
        compare(f"{demo_run}:adapter", demo_run)
    assert parse_run_ref(f"{demo_run}:base") == (str(demo_run), "base")
    assert parse_run_ref(str(demo_run)) == (str(demo_run), None)
    odd = tmp_path / "run:1"
    odd.mkdir()
    assert parse_run_ref(str(odd)) == (str(odd), None)  # an existing directory with a colon is a run
    with pytest.raises(LayerScopeError, match="expected RUN or RUN:VARIANT"):
        parse_run_ref(f"{tmp_path}/nope:bad/variant")


def test_compare_cli(demo_run, other_run, altered):
    cmd = [sys.executable, "-m", "layerscope", "compare", str(demo_run), str(other_run)]
    res = subprocess.run(cmd + ["--json"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    want = [r.to_json() for r in compare(demo_run, other_run)]
    assert got["rows"] == want and got["positions"] == "last"
    assert "layer_00/attn_out" in got["only_a"] and got["only_b"] == []
    table = subprocess.run(cmd + ["--sites", "resid_post", "--layers", "-1"], capture_output=True, text=True,
                           cwd=REPO).stdout
    lines = [x for x in table.splitlines() if x.startswith("layer_")]
    assert [x.split()[:3] for x in lines] == [["layer_03/resid_post", "EM", "9"],
                                              ["layer_03/resid_post", "Neutral", "10"]]
    assert f"{want[-1]['cosine']:.6f}" in lines[-1]
    ids = zarr.open_array(str(altered / "activations.zarr/tokens/ids"), mode="r+")
    ids[0] = int(ids[0]) + 1
    bad = subprocess.run([sys.executable, "-m", "layerscope", "compare", str(demo_run), str(altered)],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1 and "first at example 0 (id 'em-00'" in bad.stderr and "Traceback" not in bad.stderr


def test_small_blocks_give_the_same_rows(demo_run, other_run, monkeypatch):
    from layerscope.analysis import compare as mod

    whole = compare(demo_run, other_run)
    monkeypatch.setattr(mod, "BLOCK_BYTES", 8 * 64 * 3)  # three vectors at a time
    monkeypatch.setattr(mod, "TOKEN_BLOCK", 5)
    for a, b in zip(compare(demo_run, other_run), whole, strict=True):
        assert a.n == b.n
        for k in ("cosine", "rel_l2", "norm_a", "norm_b", "norm_change", "norm_change_rel"):
            assert getattr(a, k) == pytest.approx(getattr(b, k), rel=1e-12, abs=1e-15)
