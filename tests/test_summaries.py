"""Dashboard summaries agree with the stored activations."""

from __future__ import annotations

import json

import numpy as np
import pytest

import layerscope
from layerscope.dataset import example_text


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
