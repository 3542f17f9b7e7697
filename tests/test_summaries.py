"""Dashboard summaries agree with the stored activations."""

from __future__ import annotations

import json

import numpy as np
import pytest

import layerscope
from layerscope.data.dataset import example_text


@pytest.fixture(scope="module")
def summary(demo):
    return json.loads((demo / "results/demo/summaries/summary.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def run(demo):
    return layerscope.open(demo / "results/demo")


def test_heatmap_norms(summary, run):
    h = summary["heatmap"]
    assert h["layers"] == [0, 1, 2, 3]
    for i, d in enumerate(h["docs"]):
        doc = summary["docs"][d]
        e = next(ex["index"] for ex in run.examples if ex["id"] == doc["id"])
        assert len(doc["toks"]) == run.examples[e]["n_tokens"] and doc["start"] == 0
        text = "".join(summary["texts"][t] for t in doc["toks"])
        rendered = example_text(run.examples[e])  # real UTF-8 text, pieces merged
        assert text == rendered if not run.examples[e]["truncated"] else rendered.startswith(text)
        for j, L in enumerate(h["layers"]):
            want = np.linalg.norm(run.activations(L, "resid_post")[e].astype(np.float32), axis=1)
            np.testing.assert_allclose(h["norms"][i][j], want, rtol=1e-5)


def test_top_and_bottom_k_are_exact(summary, run):
    nz = summary["neurons"]
    k, ctx = nz["k"], nz["context"]
    layer = nz["layers"]["2"]
    acts = run.activations(2, "mlp_act").numpy().astype(np.float32)
    for col, n in enumerate(layer["ids"][:20]):
        vals = acts[:, n]
        top = layer["top"][col]
        np.testing.assert_allclose([v for _, _, v in top], np.sort(vals)[::-1][:k], rtol=1e-6)
        np.testing.assert_allclose([v for _, _, v in layer["bottom"][col]], np.sort(vals)[:k], rtol=1e-6)
        for d, pos, v in top:
            doc = summary["docs"][d]
            e = next(ex["index"] for ex in run.examples if ex["id"] == doc["id"])
            row = int(run.offsets[e]) + doc["start"] + pos
            assert vals[row] == pytest.approx(v)
            assert len(doc["toks"]) <= 2 * ctx + 1  # only the context window is kept


def brute_force(x: np.ndarray, k: int):
    """Per column, the k highest and lowest values and rows by a full stable sort (NaN as 0; ties: earlier row)."""
    x = np.nan_to_num(x.astype(np.float64), nan=0.0, posinf=np.inf, neginf=-np.inf)
    top_r = np.argsort(-x, axis=0, kind="stable")[:k].T
    bot_r = np.argsort(x, axis=0, kind="stable")[:k].T
    cols = np.arange(x.shape[1])[:, None]
    return x[top_r, cols], top_r, x[bot_r, cols], bot_r


class FakeActivations:
    """Just what neuron_extremes reads of a reader view: width, dtype and iter_shards (raw bits for bfloat16)."""

    def __init__(self, x: np.ndarray, dtype: str, shard_rows: list[int]):
        self.x, self.dtype, self.shard_rows, self.width = x, dtype, shard_rows, x.shape[1]

    def iter_shards(self, raw: bool = False):
        from layerscope.store.reader import bf16_to_float32

        r = 0
        for n in self.shard_rows:
            block = self.x[r:r + n]
            if self.dtype == "bfloat16":
                bits = (block.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
                block = bits if raw else bf16_to_float32(bits)
            yield (r, r + n), block.copy()
            r += n


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_neuron_extremes_match_a_full_sort(dtype, k):
    from layerscope.analysis.summaries import neuron_extremes

    rng = np.random.default_rng(k)
    n, w = 700, 37
    x = rng.standard_normal((n, w)).astype(np.float32) * 4
    x[:, 0] = 0.0  # a dead neuron: every value tied
    x[::3, 1] = 2.5  # many ties at the top
    x[::5, 2] = -2.5  # many ties at the bottom
    x[10, 3], x[400, 3], x[11, 3] = np.nan, np.inf, -np.inf
    x[::7, 4] = -0.0  # -0.0 ties with 0.0
    x[:, 5] = np.round(x[:, 5])  # a few distinct values
    x[50:, 6] = 1e6  # overflows float16 to inf
    if dtype == "float16":
        with np.errstate(over="ignore"):
            x = x.astype(np.float16)
    elif dtype == "bfloat16":  # values bfloat16 holds exactly
        x = ((x.view(np.uint32) >> 16) << 16).view(np.float32)
    want = brute_force(x.astype(np.float32), k)
    # one shard; shards with a partial block; a shard smaller than k; many small shards
    for shards in ([n], [333, 367], [2, 698], [64] * 10 + [60]):
        got = neuron_extremes(FakeActivations(x, dtype, shards), k)
        for g, e, name in zip(got, want, ("top_v", "top_r", "bot_v", "bot_r")):
            np.testing.assert_array_equal(g, e, err_msg=f"{name}, shards {shards}")


def test_neuron_extremes_on_a_store(tmp_path, model_factory):
    """Through the reader, on a real multi-shard store: the same as a full sort of the array."""
    import zarr

    from layerscope.data.dataset import load_tokens
    from layerscope.store.reader import Activations
    from layerscope.analysis.summaries import neuron_extremes
    from tests.helpers import capture_store, make_params, prepare_texts

    manifest = {"model": model_factory("llama-tiny"), "adapter": None}
    ds = prepare_texts(tmp_path, manifest["model"])
    params = make_params({1: {"sites": ["mlp_act"], "positions": "all"}}, dtype="float16", parts=2,
                         chunk_mib=0.004, shard_mib=0.008)
    root = capture_store(tmp_path, manifest, params, ds)
    _, offsets = load_tokens(ds)
    key = "layer_01/mlp_act"
    acts = Activations(zarr.open_group(str(root), mode="r")[key], offsets, 0, len(offsets) - 1, array_dir=root / key)
    assert len(list(acts.iter_shards())) > 1
    x = acts.numpy()
    for k in (1, 4, 8):
        for g, e in zip(neuron_extremes(acts, k), brute_force(x.astype(np.float32), k)):
            np.testing.assert_array_equal(g, e)


def small_run(tmp_path, model_factory, layers: dict) -> str:
    """A finished run directory (store, metadata, examples, manifest) built without Snakemake."""
    import shutil

    from layerscope.data.metadata import write_metadata
    from tests.helpers import capture_store, make_params, prepare_texts

    manifest = {"model": model_factory("llama-tiny"), "adapter": None}
    ds = prepare_texts(tmp_path, manifest["model"])
    run = tmp_path / "run"
    run.mkdir()
    params = make_params(layers, dtype="float16", parts=1)
    capture_store(run, manifest, params, ds, name="activations")
    (run / "dataset").mkdir()
    (run / "model").mkdir()
    shutil.copy(ds / "examples.jsonl", run / "dataset" / "examples.jsonl")
    (run / "model" / "manifest.json").write_text(json.dumps(manifest))
    config = {"model": {"dtype": "float32"}, "dataset": {"name": "t", "max_length": 64},
              "capture": {"batch_size": 3, "dtype": "float16", "parts": 1, "padding_side": "right",
                          "layers_per_job": 2}}
    write_metadata(config, manifest, str(ds / "examples.jsonl"),
                   str(run / "activations.zarr"), str(run / "metadata.json"), str(run / "run_config.json"))
    return str(run)


def test_missing_inputs_are_named_with_their_config_keys(tmp_path, model_factory, caplog):
    from layerscope.analysis.summaries import summarize

    run = small_run(tmp_path, model_factory, {0: {"sites": ["resid_post", "mlp_out"], "positions": "last"},
                                              1: {"sites": ["mlp_out"], "positions": "all"}})
    with caplog.at_level("WARNING", logger="layerscope.analysis.summaries"):
        s = summarize(run, site="mlp_act", top_k=3)
    assert s["heatmap"] is None and s["neurons"] is None
    assert "resid_post" in s["notes"]["heatmap"] and "capture.positions: all" in s["notes"]["heatmap"]
    assert "mlp_act" in s["notes"]["neurons"] and "capture.sites" in s["notes"]["neurons"]
    assert "dashboard.site" in s["notes"]["neurons"] and "mlp_out, resid_post" in s["notes"]["neurons"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [s["notes"]["heatmap"], s["notes"]["neurons"]]
    # neuron lists from arrays at the last position and at every position
    s = summarize(run, site="mlp_out", top_k=3, context=2, heatmap_examples=0)
    assert s["notes"] == {"heatmap": "No token x layer heatmap: dashboard.heatmap_examples is 0; set it above 0.",
                          "neurons": None}
    assert sorted(s["neurons"]["layers"]) == ["0", "1"]
    for L in ("0", "1"):
        d = s["neurons"]["layers"][L]
        assert len(d["ids"]) == 64 and all(len(t) == 3 for t in d["top"])
        for d_, pos, v in d["top"][0]:
            assert 0 <= pos < len(s["docs"][d_]["toks"]) and v is not None
