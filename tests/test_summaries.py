"""Dashboard summaries agree with numpy computations on the stored activations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import layerscope
from layerscope.data.dataset import example_text
from layerscope.packed import unpack


@pytest.fixture(scope="module")
def summary(demo):
    return unpack(json.loads((demo / "results/demo/summaries/summary.json").read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def run(demo):
    return layerscope.open(demo / "results/demo")


def norms_of(run, L, site) -> np.ndarray:
    return np.linalg.norm(run.activations(L, site).numpy().astype(np.float64), axis=1)


def doc_tokens(s, d) -> list[str]:
    o = s["docs"]["offsets"]
    return [s["texts"][t] for t in s["docs"]["toks"][o[d]:o[d + 1]]]


def test_norms_of_every_site(summary, run):
    norms, ex = summary["norms"], summary["examples"]
    assert sorted(norms["sites"]) == ["attn_out", "mlp_out", "resid_post"]
    last = run.offsets[1:] - 1
    columns = ex["index"][norms["columns"]]
    assert len(columns) == len(run)  # example_columns (512) covers the demo's 19 examples
    for site, v in norms["sites"].items():
        assert v["layers"] == [0, 1, 2, 3] and v["token_layers"] == [0, 1, 2, 3]
        for j, L in enumerate(v["layers"]):
            n = norms_of(run, L, site)
            np.testing.assert_allclose(v["last"][j], n[last][columns], rtol=1e-5)
            for s_name, (a, b) in run.splits.items():
                assert v["split_last"][s_name][j] == pytest.approx(n[last][a:b].mean(), rel=1e-5)
                # mean at each position over the split's examples that are that long
                for p in (0, 3, 20):
                    rows = [run.offsets[e] + p for e in range(a, b) if run.offsets[e + 1] - run.offsets[e] > p]
                    assert v["pos_count"][s_name][p] == len(rows)
                    assert v["split_pos"][s_name][j][p] == pytest.approx(n[rows].mean(), rel=1e-5)
            for i, d in enumerate(norms["token_docs"]):
                e = int(ex["index"][summary["docs"]["example"][d]])
                np.testing.assert_allclose(v["tokens"][i][j], n[run.offsets[e]:run.offsets[e + 1]], rtol=1e-5)


def test_token_docs_are_whole_examples_as_text(summary, run):
    ex = summary["examples"]
    assert len(summary["norms"]["token_docs"]) == 19
    for d in summary["norms"]["token_docs"]:
        e = int(ex["index"][summary["docs"]["example"][d]])
        assert summary["docs"]["start"][d] == 0
        text = "".join(doc_tokens(summary, d))
        rendered = example_text(run.examples[e])  # real UTF-8 text, pieces merged
        assert text == rendered if not run.examples[e]["truncated"] else rendered.startswith(text)
        assert ex["id"][summary["docs"]["example"][d]] == run.examples[e]["id"]


def test_neuron_index_statistics(summary, run):
    nz = summary["neurons"]
    assert nz["site"] == "mlp_act" and sorted(nz["layers"]) == ["0", "1", "2", "3"]
    for L in ("0", "3"):
        d = nz["layers"][L]
        x = run.activations(int(L), "mlp_act").numpy().astype(np.float64)
        assert d["width"] == x.shape[1] == len(d["max"])  # every neuron is indexed
        np.testing.assert_allclose(d["max"], x.max(0), rtol=1e-6)
        np.testing.assert_allclose(d["min"], x.min(0), rtol=1e-6)
        np.testing.assert_allclose(d["mean"], x.mean(0), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(d["sd"], x.std(0), rtol=1e-4, atol=1e-7)
        spans = [(run.offsets[a], run.offsets[b]) for a, b in run.splits.values()]
        means = np.array([x[r0:r1].mean(0) for r0, r1 in spans])
        np.testing.assert_allclose(d["split_mean"], means, rtol=1e-4, atol=1e-7)
        # selectivity: (mean of the best split - mean of the other split) / sd
        best = means.argmax(0)
        other = means[1 - best, np.arange(x.shape[1])]
        np.testing.assert_array_equal(d["best"], best)
        np.testing.assert_allclose(d["sel"], (means.max(0) - other) / x.std(0), rtol=1e-3, atol=1e-5)


def test_cards_one_entry_per_example_with_context(summary, run):
    nz = summary["neurons"]
    k, ctx = nz["k"], nz["context"]
    d = nz["layers"]["2"]
    x = run.activations(2, "mlp_act").numpy().astype(np.float32)
    assert len(d["cards"]) == min(256, d["width"]) > 0  # dashboard.neurons_per_layer
    assert len(set(d["cards"].tolist())) == len(d["cards"])
    ex_of_doc = summary["examples"]["index"][summary["docs"]["example"]]
    per_ex_max = np.array([x[run.offsets[e]:run.offsets[e + 1]].max(0) for e in range(len(run))])
    per_ex_min = np.array([x[run.offsets[e]:run.offsets[e + 1]].min(0) for e in range(len(run))])
    e_cols = d["entries"]
    for c, n in enumerate(d["cards"][:40]):
        for kind, table, sign in ((0, per_ex_max, -1), (1, per_ex_min, 1)):
            sel = np.flatnonzero((e_cols["card"] == c) & (e_cols["kind"] == kind))
            want = np.argsort(sign * table[:, n], kind="stable")[:k]
            got = ex_of_doc[e_cols["doc"][sel]]
            assert len(set(got.tolist())) == len(got)  # at most one entry per example
            np.testing.assert_allclose(e_cols["value"][sel], table[want, n])
            assert sorted(got.tolist()) == sorted(want.tolist()) or np.allclose(table[got, n], table[want, n])
            for i in sel:
                doc, e = e_cols["doc"][i], int(ex_of_doc[e_cols["doc"][i]])
                start = summary["docs"]["start"][doc]
                n_doc = summary["docs"]["offsets"][doc + 1] - summary["docs"]["offsets"][doc]
                rows = run.offsets[e] + start + np.arange(n_doc)
                assert n_doc <= 2 * ctx + 1
                # the whole window is coloured: one value per token, the neuron's own
                np.testing.assert_allclose(d["ctx"][e_cols["ctx_off"][i]:e_cols["ctx_off"][i] + n_doc], x[rows, n])
                assert x[rows[e_cols["pos"][i]], n] == e_cols["value"][i]
        # samples across activation ranges: the first example whose peak falls in each of 5 equal ranges
        lo, hi = per_ex_max[:, n].min(), per_ex_max[:, n].max()
        bins = np.clip(np.floor((per_ex_max[:, n].astype(np.float64) - lo) / (hi - lo) * 5), 0, 4)
        want = [int(np.flatnonzero(bins == r)[0]) for r in range(5) if (bins == r).any()]
        sel = np.flatnonzero((e_cols["card"] == c) & (e_cols["kind"] == 2))
        assert ex_of_doc[e_cols["doc"][sel]].tolist() == want
        np.testing.assert_allclose(e_cols["value"][sel], per_ex_max[want, n])
        # histogram over every token's value
        counts, _ = np.histogram(x[:, n], bins=nz["bins"], range=(d["hist_lo"][c], d["hist_hi"][c]))
        assert d["hist"][c].sum() == len(x)
        assert np.abs(d["hist"][c] - counts).sum() <= 2  # bin edges may round differently


def test_output_tokens_match_the_model(summary, demo):
    """Promoted and suppressed tokens equal W_U (g * W_down[:, n]) computed by torch on the loaded model."""
    import torch

    from layerscope.fileio import read_json
    from layerscope.models.loading import load_model

    manifest = read_json(demo / "results/demo/model/manifest.json")
    model, tok = load_model(manifest)
    nz = summary["neurons"]
    for L in ("0", "3"):
        d = nz["layers"][L]
        cards = torch.from_numpy(d["cards"][:16].astype(np.int64))
        w = model.model.layers[int(L)].mlp.down_proj.weight[:, cards] * model.model.norm.weight[:, None]
        logits = (model.lm_head.weight @ w).T
        top = torch.topk(logits, 10, dim=1)
        np.testing.assert_allclose(d["out_up_v"][:16], top.values.numpy(), rtol=1e-4, atol=1e-6)
        texts = [[summary["texts"][t] for t in r] for r in d["out_up"][:16]]
        assert texts == [[tok.decode([int(i)]) for i in r] for r in top.indices]
        bottom = torch.topk(-logits, 10, dim=1)
        np.testing.assert_allclose(d["out_down_v"][:16], -bottom.values.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2-tiny", "opt-tiny", "qwen2-tiny"])
def test_unembedding_reads_each_layout(model_factory, name):
    """The down projection and unembedding read from safetensors equal the loaded model's modules."""
    from layerscope.analysis.unembed import Unembedding
    from layerscope.capture.sites import decoder_layers
    from layerscope.models.loading import load_model

    m = model_factory(name)
    model, _ = load_model({"model": m})
    u = Unembedding({"model": m, "adapter": None})
    for L, layer in enumerate(decoder_layers(model, m["num_layers"])):
        mod = getattr(getattr(layer, "mlp", None), "down_proj", None) or getattr(getattr(layer, "mlp", None), "c_proj",
                                                                                    None) or layer.fc2
        w = mod.weight.detach().numpy()
        np.testing.assert_array_equal(u.down(L), w.T if name == "gpt2-tiny" else w)  # GPT-2: Conv1D [in, out]
    np.testing.assert_array_equal(u.unembed, model.get_output_embeddings().weight.detach().numpy())


def test_unembedding_merges_a_lora_adapter(model_factory, lora_adapter):
    from layerscope.analysis.unembed import Unembedding
    from layerscope.models.loading import load_model

    base = model_factory("llama-tiny")
    model, _ = load_model({"model": base, "adapter": lora_adapter})
    merged = model.merge_and_unload()
    u = Unembedding({"model": base, "adapter": lora_adapter})
    for L in range(base["num_layers"]):
        np.testing.assert_allclose(u.down(L), merged.model.layers[L].mlp.down_proj.weight.detach().numpy(),
                                   rtol=1e-5, atol=1e-6)
        plain = Unembedding({"model": base, "adapter": None}).down(L)
        assert not np.allclose(u.down(L), plain)  # the adapter does change down_proj


def small_run(tmp_path, model_factory, layers: dict, texts=None) -> str:
    """A finished run directory (store, metadata, examples, manifest) built without Snakemake."""
    import shutil

    from layerscope.data.metadata import write_metadata
    from tests.helpers import TEXTS, capture_store, make_params, prepare_texts, store_records

    manifest = {"model": model_factory("llama-tiny"), "adapter": None}
    ds = prepare_texts(tmp_path, manifest["model"], texts or TEXTS)
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
                   store_records(run / "activations.zarr"), str(run / "metadata.json"), str(run / "run_config.json"))
    return str(run)


def test_last_position_run_gets_a_layer_x_example_view(tmp_path, model_factory):
    from layerscope.analysis.summaries import summarize

    run_dir = small_run(tmp_path, model_factory,
                        {0: {"sites": ["resid_post", "mlp_out", "mlp_act"], "positions": "last"},
                         1: {"sites": ["resid_post", "mlp_act"], "positions": "last"}})
    s = summarize(run_dir, top_k=3, context=2)
    run = layerscope.open(run_dir)
    assert "layer x example view" in s["notes"]["heatmap"] and "capture.positions: all" in s["notes"]["heatmap"]
    v = s["norms"]["sites"]["resid_post"]
    assert v["layers"] == [0, 1] and v["positions"] == ["last", "last"] and "token_layers" not in v
    assert s["norms"]["token_docs"] == []
    cols = s["examples"]["index"][s["norms"]["columns"]]
    for j, L in enumerate((0, 1)):
        np.testing.assert_allclose(v["last"][j], norms_of(run, L, "resid_post")[cols], rtol=1e-5)
    assert s["norms"]["sites"]["mlp_out"]["layers"] == [0]
    # neuron cards of a last-position array: one value per example, at its last token
    d = s["neurons"]["layers"]["1"]
    x = run.activations(1, "mlp_act").numpy().astype(np.float32)
    e = d["entries"]
    first = np.flatnonzero((e["card"] == 0) & (e["kind"] == 0))
    np.testing.assert_allclose(e["value"][first], np.sort(x[:, d["cards"][0]])[::-1][:3])
    assert s["neurons"]["token_top"] == {}


def test_missing_inputs_are_named_with_their_config_keys(tmp_path, model_factory, caplog):
    from layerscope.analysis.summaries import summarize

    run = small_run(tmp_path, model_factory, {0: {"sites": ["attn_out"], "positions": "last"}})
    with caplog.at_level("WARNING", logger="layerscope.analysis.summaries"):
        s = summarize(run, site="mlp_act", top_k=3)
    assert s["neurons"] is None
    assert "mlp_act" in s["notes"]["neurons"] and "capture.sites" in s["notes"]["neurons"]
    assert "dashboard.site" in s["notes"]["neurons"] and "(attn_out)" in s["notes"]["neurons"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [s["notes"]["heatmap"], s["notes"]["neurons"]]
    # another site's neurons: an index, but no output tokens (those are for mlp_act)
    s = summarize(run, site="attn_out", top_k=3, heatmap_examples=0)
    assert s["neurons"]["site"] == "attn_out" and "mlp_act" in s["notes"]["output_tokens"]
    assert len(s["neurons"]["layers"]["0"]["max"]) == 64 and "out_up" not in s["neurons"]["layers"]["0"]


def test_summarize_reads_weights_without_torch(demo, tmp_path):
    """Output tokens come from the safetensors files directly: the summarize job imports no torch."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import json, sys; from layerscope.steps import summarize; "
            f"summarize({str(demo / 'results/demo')!r}, {{'top_k': 3, 'neurons_per_layer': 4}}, 'out.json'); "
            "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers'))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []
    s = unpack(json.loads((tmp_path / "out.json").read_text()))
    assert s["neurons"]["layers"]["0"]["out_up"].shape == (4, 10)


@pytest.mark.parametrize("positions", ["all", "last"])
@pytest.mark.parametrize("shard_rows", [7, 64, 1000])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_scan_matches_numpy_across_shards_and_nonfinite_values(positions, shard_rows, chunk_rows, monkeypatch):
    """Per-example top/bottom k, statistics, split means, row norms and card histograms, with examples
    cut by shard boundaries and by the chunks a shard is widened in (``chunk_rows``; None: the
    default, one chunk here), and NaN/inf values (left out of every statistic, NaN/inf norms)."""
    from types import SimpleNamespace

    from layerscope.analysis import blocks
    from layerscope.analysis.neurons import histograms, scan
    from layerscope.analysis.norms import row_norms
    from tests.synthetic import SyntheticActivations

    if chunk_rows is not None:
        monkeypatch.setattr(blocks, "MIN_ROWS", 1)
        monkeypatch.setattr(blocks, "CHUNK_BYTES", chunk_rows * 9 * 4)

    rng = np.random.default_rng(shard_rows)
    lengths = rng.integers(1, 12, size=30)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows = offsets[-1] if positions == "all" else 30
    x = rng.standard_normal((rows, 9)).astype(np.float32)
    x[3, 0], x[5, 1], x[8, 2] = np.nan, np.inf, -np.inf
    x[:, 3] = 1.0  # every example ties
    x[:, 4] = np.round(x[:, 4] * 2) / 2  # ties at many values, at the k-th place too (shared prompt prefixes)
    run = SimpleNamespace(offsets=offsets, splits={"a": (0, 13), "b": (13, 30)})
    acts = SyntheticActivations(x, offsets, positions, shard_rows)
    sc = scan(run, acts, k=4, norms=True)
    xm = np.where(np.isfinite(x), x, np.nan)
    want_norms = np.sqrt((x.astype(np.float64) ** 2).sum(1))  # NaN rows NaN, infinite rows inf
    np.testing.assert_allclose(sc.norms, want_norms, rtol=1e-6)
    np.testing.assert_array_equal(row_norms(acts), sc.norms)  # the heatmap's own pass: the same bits
    cols = np.array([0, 1, 4, 7])
    lo, hi = sc.min[cols], sc.max[cols]
    hist = histograms(acts, cols, lo, hi, 5)
    for c, n in enumerate(cols):
        finite = x[np.isfinite(x[:, n]), n]
        counts, _ = np.histogram(finite, bins=5, range=(lo[c], hi[c]))
        assert hist[c].sum() == len(finite) and np.abs(hist[c] - counts).sum() <= 1
    span = (lambda a, b: (offsets[a], offsets[b])) if positions == "all" else (lambda a, b: (a, b))
    np.testing.assert_allclose(sc.max, np.nanmax(xm, 0))
    np.testing.assert_allclose(sc.mean, np.nanmean(xm, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sc.sd, np.nanstd(xm, 0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sc.split_mean, [np.nanmean(xm[slice(*span(0, 13))], 0),
                                               np.nanmean(xm[slice(*span(13, 30))], 0)], rtol=1e-5, atol=1e-6)
    per_ex = np.array([np.nanmax(xm[slice(*span(e, e + 1))], 0) for e in range(30)])
    per_ex_min = np.array([np.nanmin(xm[slice(*span(e, e + 1))], 0) for e in range(30)])
    for n in range(9):
        want = np.lexsort((np.arange(30), -per_ex[:, n]))[:4]  # highest first, ties by example
        np.testing.assert_array_equal(sc.top_e[n], want)
        np.testing.assert_allclose(sc.top_v[n], per_ex[want, n])
        want = np.lexsort((np.arange(30), per_ex_min[:, n]))[:4]
        np.testing.assert_array_equal(sc.bot_e[n], want)


def test_layers_summarised_in_parallel_give_the_same_summary(tmp_path, model_factory, monkeypatch):
    """workers > 1 computes layers, and decodes the docs' token texts, in forked processes; docs,
    texts and order must not change."""
    from layerscope.analysis import summaries
    from layerscope.analysis.summaries import summarize
    from layerscope.packed import pack

    run_dir = small_run(tmp_path, model_factory,
                        {L: {"sites": ["resid_post", "attn_out", "mlp_act"], "positions": "all"} for L in range(3)}
                        | {3: {"sites": ["resid_post", "mlp_act"], "positions": "last"}})
    ahead: list[int] = []
    real = summaries.Texts.decode_ahead
    monkeypatch.setattr(summaries.Texts, "decode_ahead",
                        lambda self, e, w: real(self, e, w) or ahead.append(len(self.decoded)))
    one = pack(summarize(run_dir, top_k=3, context=2, neurons_per_layer=5))
    many = pack(summarize(run_dir, top_k=3, context=2, neurons_per_layer=5, workers=3))
    assert ahead[0] == 0 and ahead[1] > 1  # one process decodes as it goes; three decoded ahead
    assert json.dumps(many, sort_keys=True) == json.dumps(one, sort_keys=True)
    assert set(one["neurons"]["layers"]) == {"0", "1", "2", "3"} and one["docs"]["offsets"]


def test_a_layer_captured_again_is_the_only_one_summarised_again(tmp_path, model_factory, monkeypatch):
    """The layer cache: a second summary reads every layer back; new capture job ids for one layer (what
    a re-capture records) make it compute that layer alone, from the new data, and equal a fresh summary."""
    import zarr

    from layerscope.analysis import summaries
    from layerscope.packed import pack
    from layerscope.store.reader import Run

    run_dir = small_run(tmp_path, model_factory,
                        {L: {"sites": ["resid_post", "mlp_act"], "positions": "all"} for L in range(3)})
    cache = tmp_path / "cache"
    calls: list[tuple[str, int]] = []
    for name in ("_layer_norms", "_layer_neurons"):
        real = getattr(summaries, name)
        monkeypatch.setattr(summaries, name, lambda *a, _real=real, _name=name: calls.append((_name, a[-1]))
                            or _real(*a))
    kw = dict(top_k=3, context=2, neurons_per_layer=5)
    first = pack(summaries.summarize(run_dir, **kw, cache_dir=str(cache)))
    assert sorted(calls) == sorted((n, L) for n in ("_layer_norms", "_layer_neurons") for L in range(3))
    calls.clear()
    again = pack(summaries.summarize(run_dir, **kw, cache_dir=str(cache)))
    assert calls == [] and json.dumps(again) == json.dumps(first)

    # layer 1 "captured again": new values, new job ids
    arr = zarr.open_array(str(Path(run_dir) / "activations.zarr/layer_01/mlp_act"), mode="r+")
    arr[:] = (arr[:].astype(np.float32) * -2).astype(arr.dtype)
    real_jobs = Run.capture_jobs
    monkeypatch.setattr(Run, "capture_jobs", lambda self, L, s: real_jobs(self, L, s) + (["new"] if (L, s) == (1, "mlp_act") else []))
    (cache / "neurons_L007_stale.json").write_text("{}")  # an entry no summary uses any more
    after = pack(summaries.summarize(run_dir, **kw, cache_dir=str(cache)))
    assert calls == [("_layer_neurons", 1)]  # resid_post's norms of layer 1: its own jobs did not change
    fresh = pack(summaries.summarize(run_dir, **kw))
    assert json.dumps(after) == json.dumps(fresh) and json.dumps(after) != json.dumps(first)
    assert not (cache / "neurons_L007_stale.json").exists()


def test_a_summary_again_takes_the_token_texts_the_last_one_decoded(tmp_path, model_factory, monkeypatch):
    """The token texts of the examples the last summary showed come from the cache, not the
    tokenizer (the summary equal byte for byte); other tokens, or another tokenizer, decode afresh."""
    import zarr

    from layerscope.analysis import summaries
    from layerscope.data import tokens
    from layerscope.packed import pack
    from layerscope.store.reader import Run

    run_dir = small_run(tmp_path, model_factory, {L: {"sites": ["mlp_act"], "positions": "all"} for L in range(2)})
    cache = tmp_path / "cache"
    decoded: list[int] = []
    real = tokens.TokenTexts.__call__
    # examples' tokens (output tokens are single vocabulary tokens, decoded for each summary)
    monkeypatch.setattr(tokens.TokenTexts, "__call__",
                        lambda self, ids: (decoded.append(len(ids)) if len(ids) > 1 else None) or real(self, ids))
    kw = dict(top_k=3, context=2, neurons_per_layer=5)
    first = pack(summaries.summarize(run_dir, **kw, cache_dir=str(cache)))
    assert decoded and (cache / summaries.TEXTS_FILE).is_file()
    decoded.clear()
    written = (cache / summaries.TEXTS_FILE).stat().st_mtime_ns
    again = pack(summaries.summarize(run_dir, **kw, cache_dir=str(cache)))
    assert decoded == [] and json.dumps(again) == json.dumps(first)
    assert (cache / summaries.TEXTS_FILE).stat().st_mtime_ns == written  # the same examples: not written again

    assert summaries.LayerCache(cache).texts(Run(run_dir), "another tokenizer")[1] == {}

    # new token ids (a data set tokenized again; the activations kept): decoded afresh, as with no cache
    ids = zarr.open_array(str(Path(run_dir) / "activations.zarr/tokens/ids"), mode="r+")
    ids[:] = (ids[:] + 7) % 100
    after = pack(summaries.summarize(run_dir, **kw, cache_dir=str(cache)))
    assert decoded
    fresh = pack(summaries.summarize(run_dir, **kw))
    assert json.dumps(after) == json.dumps(fresh) and json.dumps(after) != json.dumps(first)


def test_a_norm_site_as_dashboard_site_is_read_once(tmp_path, model_factory, monkeypatch):
    """dashboard.site resid_post: the neuron scan gives the heatmap its norms (no second pass over the
    array), equal bit for bit to the norms pass's, and to a float64 hand computation; the layer cache
    gives them back too."""
    from layerscope.analysis import summaries
    from layerscope.packed import pack
    from layerscope.store.reader import Run

    run_dir = small_run(tmp_path, model_factory,
                        {L: {"sites": ["resid_post", "attn_out"], "positions": "all"} for L in range(3)})
    calls: list[tuple[str, int]] = []
    real = summaries._layer_norms
    monkeypatch.setattr(summaries, "_layer_norms", lambda *a: calls.append((a[0], a[-1])) or real(*a))
    kw = dict(top_k=3, context=2, neurons_per_layer=5)
    fused = pack(summaries.summarize(run_dir, site="resid_post", **kw, cache_dir=str(tmp_path / "cache")))
    assert sorted(calls) == [("attn_out", L) for L in range(3)]  # resid_post's norms: from the scan
    calls.clear()
    plain = pack(summaries.summarize(run_dir, site="attn_out", **kw))  # resid_post's norms from their own pass
    assert ("resid_post", 0) in calls
    assert json.dumps(fused["norms"], sort_keys=True) == json.dumps(plain["norms"], sort_keys=True)
    cached = pack(summaries.summarize(run_dir, site="resid_post", **kw, cache_dir=str(tmp_path / "cache")))
    assert json.dumps(cached, sort_keys=True) == json.dumps(fused, sort_keys=True)
    run = Run(run_dir)
    v = summaries.unpack(fused["norms"])["sites"]["resid_post"]
    cols = summaries.unpack(fused["examples"])["index"][summaries.unpack(fused["norms"])["columns"]]
    for j, L in enumerate(v["layers"]):
        want = norms_of(run, L, "resid_post")[run.offsets[cols + 1] - 1]
        np.testing.assert_allclose(v["last"][j], want, rtol=1e-6)
