"""Capture-time spans (capture.positions: prompt, response, role:NAME): only a span's tokens are
stored, and everything that reads rows (reader, xarray, summaries, compare, exports) maps them to
the right example and token, or refuses clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

import layerscope
from layerscope.errors import ConfigError, LayerScopeError
from layerscope.store.rows import array_rows, row_dim, span_tokens
from tests.conftest import REPO, copy_inputs, run_snakemake, write_jsonl
from tests.helpers import capture_store, make_params, reference, store_records

SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
SYSTEM = {"role": "system", "content": "Be brief."}
CHATS = [
    {"id": "c0", "split": "a", "messages": [SYSTEM, {"role": "user", "content": "Hi there, who are you?"},
                                            {"role": "assistant", "content": "A small model."},
                                            {"role": "user", "content": "Thanks"},
                                            {"role": "assistant", "content": "You are welcome!"}]},
    {"id": "t0", "split": "a", "text": "A plain text has a prompt and no response."},
    {"id": "c1", "split": "a", "messages": [{"role": "user", "content": "What is the capital of France?"},
                                            {"role": "assistant", "content": "Paris, on the Seine."}]},
    {"id": "c2", "split": "a", "messages": [{"role": "user", "content": "A question nobody answered"}]},
    # a split whose examples have no response at all: its views of a response array are empty
    {"id": "t1", "split": "b", "text": "Text only here."},
    {"id": "t2", "split": "b", "text": "And here: numbers 1 2 3."},
    {"id": "c3", "split": "c", "messages": [{"role": "user", "content": "Say something long, please."},
                                            {"role": "assistant", "content": "Something long: " + "la " * 12}]},
]
LAYERS = 4


def hand_tokens(examples: list[dict], offsets: np.ndarray, name: str) -> list[np.ndarray]:
    """Per example, the flat token indices inside span ``name``, from its recorded ranges by a mask."""
    out = []
    for i, ex in enumerate(examples):
        mask = np.zeros(int(offsets[i + 1] - offsets[i]), bool)
        for a, b in ex["spans"].get(name, []):
            mask[a:b] = True
        out.append(np.flatnonzero(mask) + offsets[i])
    return out


def make_run(root: Path, manifest: dict, ds: Path, layers: dict, **params) -> Path:
    """A finished run directory (store, metadata, dataset, manifest) built without Snakemake."""
    from layerscope.data.metadata import write_metadata

    root.mkdir(parents=True)
    p = make_params(layers, **({"dtype": "float32", "parts": 1} | params))
    capture_store(root, manifest, p, ds, name="activations", layers_per_job=2)
    shutil.copytree(ds, root / "dataset")
    (root / "model").mkdir()
    (root / "model" / "manifest.json").write_text(json.dumps(manifest))
    config = {"model": {"dtype": "float32"}, "dataset": {"name": "chats", "max_length": 64},
              "capture": {"batch_size": p["batch_size"], "dtype": p["dtype"], "parts": p["parts"],
                          "padding_side": p["padding_side"], "layers_per_job": 2}}
    write_metadata(config, manifest, str(ds / "examples.jsonl"), store_records(root / "activations.zarr"),
                   str(root / "metadata.json"), str(root / "run_config.json"))
    return root


@pytest.fixture(scope="module")
def chats(tmp_path_factory, model_factory):
    """The chat data set prepared for llama-tiny, and the model's manifest."""
    from layerscope.data.dataset import prepare
    from layerscope.models.loading import load_tokenizer

    tmp = tmp_path_factory.mktemp("chats")
    m = model_factory("llama-tiny")
    prepare(write_jsonl(tmp / "chats.jsonl", CHATS), load_tokenizer({"model": m}), tmp / "dataset", max_length=64)
    return tmp / "dataset", {"model": m, "adapter": None}


@pytest.fixture(scope="module")
def all_run(chats, tmp_path_factory):
    ds, manifest = chats
    return layerscope.open(make_run(tmp_path_factory.mktemp("all") / "run", manifest, ds,
                                    {L: {"sites": ["resid_post", "mlp_act"], "positions": "all"} for L in range(LAYERS)}))


@pytest.fixture(scope="module")
def span_run(chats, tmp_path_factory):
    """Layers 0 and 1 at the reply, 2 at the user's turns, 3 at every token."""
    ds, manifest = chats
    layers = {0: "response", 1: "response", 2: "role:user", 3: "all"}
    return layerscope.open(make_run(tmp_path_factory.mktemp("span") / "run", manifest, ds,
                                    {L: {"sites": ["resid_post", "mlp_act"], "positions": p}
                                     for L, p in layers.items()}))


# --- the definition of rows --------------------------------------------------------------------

def test_rows_of_every_position_mode_by_hand():
    offsets = np.array([0, 5, 8, 12, 13])
    spans = [{"prompt": [[0, 2]], "response": [[2, 4], [3, 5]]},  # overlapping ranges: one row per token
             {"prompt": [[0, 3]], "response": []},  # empty: no rows
             {"prompt": [[0, 1]], "response": [[1, 2], [3, 9]], "role:user": [[0, 1]]},  # past the end: clipped
             {"prompt": [[0, 1]]}]  # no response recorded at all
    rm = array_rows("response", offsets, spans)
    want = [[2, 3, 4], [], [1, 3], []]
    assert rm.offsets.tolist() == [0, 3, 3, 5, 5]
    assert rm.tokens.tolist() == [t + offsets[i] for i, w in enumerate(want) for t in w]
    assert rm.examples().tolist() == [0, 0, 0, 2, 2] and rm.positions_of(np.arange(5)).tolist() == [2, 3, 4, 1, 3]
    assert rm.rows_of(np.array([11, 9, 2, 10, 0])).tolist() == [4, 3, 0, -1, -1]
    assert array_rows("role:user", offsets, spans).tokens.tolist() == [8]
    # the modes with one row per example, and every token
    assert array_rows("last", offsets).tokens.tolist() == [4, 7, 11, 12]
    assert array_rows("answer", offsets, answer_index=np.array([1, 0, 2, 0])).tokens.tolist() == [1, 5, 10, 12]
    assert array_rows("answer", offsets).tokens.tolist() == [4, 7, 11, 12]  # no answer positions: the last token
    a = array_rows("all", offsets)
    assert a.offsets.tolist() == offsets.tolist() and a.tokens.tolist() == list(range(13))
    assert [row_dim(p) for p in ("all", "last", "answer", "response", "role:user")] == [
        "token", "example", "example", "response_token", "role_user_token"]
    with pytest.raises(LayerScopeError, match="record no spans"):
        array_rows("prompt", offsets, [None] * 4)


def test_part_examples_cover_span_layouts():
    """With parts, every part computes the examples any layout of the run puts in it: a span's too."""
    from layerscope.capture.chain import part_examples
    from layerscope.store.layout import make_layout

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=40)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    spans = [{"prompt": [[0, int(n) // 2]], "response": [[int(n) // 2, int(n)]] if i % 3 else []}
             for i, n in enumerate(lengths)]
    store = {"chunk_mib": 0.01, "shard_mib": 0.05}
    for parts in (2, 5):
        got = [{e for a, b in part_examples(offsets, {64}, "float16", parts, store, p, spans) for e in range(a, b)}
               for p in range(parts)]
        for name in ("prompt", "response"):
            rows, _ = span_tokens(name, offsets, spans)
            lay = make_layout(int(rows[-1]), 64, 2, parts, store["chunk_mib"], store["shard_mib"])
            for p in range(parts):
                r0, r1 = lay.part_range(p)
                assert {e for e in range(40) if rows[e] < r1 and rows[e + 1] > r0} <= got[p]


# --- capture ------------------------------------------------------------------------------------

@pytest.mark.parametrize("positions", ["response", "role:user", "prompt"])
@pytest.mark.parametrize("padding,parts", [("right", 1), ("left", 2)])
def test_a_span_capture_stores_exactly_the_span_rows_of_an_all_capture(chats, tmp_path, positions, padding, parts):
    from layerscope.data.dataset import load_examples, load_tokens

    ds, manifest = chats
    examples = load_examples(ds / "examples.jsonl")
    _, offsets = load_tokens(ds)
    # small shards: with two parts, an array's parts begin inside the span rows
    small = dict(chunk_mib=64 * 4 * 3 / 2**20, shard_mib=64 * 4 * 6 / 2**20)
    span = {L: {"sites": ["resid_post"], "positions": positions} for L in (1, 3)}
    every = {L: {"sites": ["resid_post"], "positions": "all"} for L in (1, 3)}
    kw = dict(padding_side=padding, parts=parts, **small)
    a = capture_store(tmp_path, manifest, make_params(span, **kw), ds, name="span", layers_per_job=2)
    b = capture_store(tmp_path, manifest, make_params(every, **kw), ds, name="all", layers_per_job=2)
    tokens = np.concatenate(hand_tokens(examples, offsets, positions))
    assert len(tokens) > 0
    assert positions == "prompt" or any(len(t) == 0 for t in hand_tokens(examples, offsets, positions))
    for L in (1, 3):
        got = zarr.open_array(str(a / f"layer_{L:02d}/resid_post"), mode="r")
        full = zarr.open_array(str(b / f"layer_{L:02d}/resid_post"), mode="r")[:]
        assert got.shape == (len(tokens), 64) and got.attrs["positions"] == positions
        assert got.metadata.dimension_names == (row_dim(positions), "hidden")
        if parts == 1:  # the same batches computed every row: the same bytes
            np.testing.assert_array_equal(got[:], full[tokens])
        else:  # an example's rows may fall in another part of each layout, computed beside other examples
            np.testing.assert_allclose(got[:], full[tokens], rtol=1e-5, atol=1e-6)


def test_span_rows_are_what_the_model_computes(span_run, chats):
    """Each stored row is the model's own value at that example's token, run alone and unpadded."""
    ds, manifest = chats
    ref = reference(manifest, ds)
    for L in (0, 2):
        acts = span_run.activations(L, "mlp_act")
        owner, pos = acts.row_examples, acts.map.positions_of(np.arange(acts.shape[0]))
        want = np.stack([ref[(L, "mlp_act")][e][p] for e, p in zip(owner, pos)])
        np.testing.assert_allclose(acts.numpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer,positions", [(0, "response"), (2, "role:user")])
def test_reader_select_and_views_of_a_span_array(span_run, all_run, layer, positions):
    acts = span_run.activations(layer, "resid_post")
    x_all, owner = all_run.select(layer, "resid_post", positions)
    np.testing.assert_array_equal(acts.numpy(), x_all)
    np.testing.assert_array_equal(acts.row_examples, owner)
    want = hand_tokens(span_run.examples, span_run.offsets, positions)
    np.testing.assert_array_equal(acts.tokens, np.concatenate(want))
    for e in range(len(span_run)):  # example views: the span's rows, possibly none
        x = acts[e]
        assert x.shape == (len(want[e]), 64)
        np.testing.assert_array_equal(x, all_run.activations(layer, "resid_post").take(want[e]))
    # selecting the span from the span array itself, and by split
    x, o = span_run.select(layer, "resid_post", positions, split="a")
    a0, a1 = span_run.splits["a"]
    np.testing.assert_array_equal(x, all_run.select(layer, "resid_post", positions, split="a")[0])
    assert set(o.tolist()) <= set(range(a0, a1))


def test_examples_with_an_empty_span_have_no_rows_and_views_cope(span_run, all_run):
    acts = span_run.activations(0, "resid_post")
    empty = [e for e, ex in enumerate(span_run.examples) if not ex["spans"]["response"]]
    assert empty and all(acts[e].shape == (0, 64) for e in empty)
    b = span_run.activations(0, "resid_post", split="b")  # no response anywhere in split b
    assert len(b) == 2 and b.shape == (0, 64) and b.numpy().shape == (0, 64) and list(b.iter_shards()) == []
    assert span_run.select(0, "resid_post", "response", split="b")[0].shape == (0, 64)
    # a span array holds what it holds: a wider span, or every token, is refused, never padded
    with pytest.raises(LayerScopeError, match="layer_00/resid_post holds response positions, which leave out "
                                              "prompt token 0 of example 0"):
        span_run.select(0, "resid_post", "prompt")
    # role:assistant is the reply's content: a response array holds it
    np.testing.assert_array_equal(span_run.select(0, "resid_post", "role:assistant")[0],
                                  all_run.select(0, "resid_post", "role:assistant")[0])
    with pytest.raises(LayerScopeError, match="no span 'role:tool'"):
        span_run.select(3, "resid_post", "role:tool")


def test_a_span_no_example_has_stores_zero_rows(tmp_path, model_factory):
    """(The config refuses this for a data set; a pass whose every reply is empty gets it.) Capture,
    store and every reader cope with an array of no rows."""
    from layerscope.analysis.compare import compare
    from layerscope.analysis.summaries import build_summary
    from tests.helpers import prepare_texts
    from tests.synthetic import PiecesDecoder

    m = model_factory("llama-tiny")
    ds = prepare_texts(tmp_path, m)  # text records: no response anywhere
    run = layerscope.open(make_run(tmp_path / "run", {"model": m, "adapter": None}, ds,
                                   {0: {"sites": ["resid_post", "mlp_act"], "positions": "response"},
                                    1: {"sites": ["resid_post"], "positions": "all"}}, parts=2))
    a = run.activations(0, "resid_post")
    assert a.shape == (0, 64) and a[3].shape == (0, 64) and list(a.iter_shards()) == []
    assert run.select(0, "resid_post", "response")[0].shape == (0, 64)
    s = build_summary(run, PiecesDecoder(["a"]), None, site="mlp_act", top_k=3, context=2, neurons_per_layer=4,
                      heatmap_examples=3, example_columns=7, output_tokens=0, budget_mib=10)
    assert np.isnan(s["norms"]["sites"]["resid_post"]["last"][0]).all()
    assert s["neurons"]["layers"]["0"]["entries"]["card"].size == 0
    assert all(r.n == 0 for r in compare(run, run, positions="response", layers=[0]))


def test_a_prompted_pass_with_generation_captures_its_replies(tmp_path, model_factory):
    """positions: response on a pass that generates: the reply's tokens of each question, exactly."""
    from layerscope.data.dataset import load_tokens
    from tests.test_passes import answered

    manifest = {"model": model_factory("llama-tiny"), "adapter": None}
    gen = {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    recs, d = answered(tmp_path, manifest, "other_confidence", {"generate": gen})
    assert sum(r["output_tokens"] for r in recs) > 0
    every = {L: {"sites": ["resid_post"], "positions": "all"} for L in (0, 2)}
    reply = {L: {"sites": ["resid_post"], "positions": "response"} for L in (0, 2)}
    a = capture_store(d, manifest, make_params(every), d / "dataset", name="all")
    b = capture_store(d, manifest, make_params(reply), d / "dataset", name="reply")
    _, offsets = load_tokens(d / "dataset")
    tokens = np.concatenate([np.arange(offsets[e] + r["prompt_tokens"], offsets[e + 1]) for e, r in enumerate(recs)])
    assert len(tokens) == sum(r["output_tokens"] for r in recs)
    for L in (0, 2):
        got = zarr.open_array(str(b / f"layer_{L:02d}/resid_post"), mode="r")[:]
        full = zarr.open_array(str(a / f"layer_{L:02d}/resid_post"), mode="r")[:]
        np.testing.assert_array_equal(got, full[tokens])


# --- what reads rows ----------------------------------------------------------------------------

def test_summaries_of_a_span_run(span_run, all_run):
    from layerscope.analysis.summaries import build_summary
    from tests.synthetic import PiecesDecoder

    s = build_summary(span_run, PiecesDecoder(["a", "b", "c"]), None, site="mlp_act", top_k=3, context=2,
                      neurons_per_layer=4, heatmap_examples=7, example_columns=7, output_tokens=0, budget_mib=10)
    assert s["notes"]["heatmap"] is None
    v = s["norms"]["sites"]["resid_post"]
    assert v["positions"] == ["response", "response", "role:user", "all"] and v["token_layers"] == [0, 1, 2, 3]
    ex_rows = s["examples"]["index"]
    for j, L in enumerate(v["layers"]):
        full = np.linalg.norm(all_run.activations(L, "resid_post").numpy().astype(np.float64), axis=1)
        held = np.zeros(len(full), bool)
        held[span_run.activations(L, "resid_post").tokens] = True
        for i, d in enumerate(s["norms"]["token_docs"]):  # every token of the example, NaN outside the span
            e = int(ex_rows[s["docs"]["example"][d]])
            o0, o1 = span_run.offsets[e], span_run.offsets[e + 1]
            want = np.where(held[o0:o1], full[o0:o1], np.nan)
            np.testing.assert_allclose(v["tokens"][i][j], want, rtol=1e-5)
        last = np.where(held[span_run.offsets[1:] - 1], full[span_run.offsets[1:] - 1], np.nan)
        np.testing.assert_allclose(v["last"][j], last[ex_rows[s["norms"]["columns"]]], rtol=1e-5)
    # neuron cards: every top entry names the example and token where the neuron peaks within the span
    n = s["neurons"]["layers"]["0"]
    x = all_run.activations(0, "mlp_act").numpy()
    held = span_run.activations(0, "mlp_act").tokens
    rows = span_run.activations(0, "mlp_act").numpy()
    np.testing.assert_allclose(n["max"], rows.max(0), rtol=1e-6)
    np.testing.assert_allclose(n["mean"], rows.astype(np.float64).mean(0), rtol=1e-4, atol=1e-6)
    e = n["entries"]
    for k in np.flatnonzero(e["kind"] == 0):
        c = n["cards"][e["card"][k]]
        d = e["doc"][k]
        ex = int(ex_rows[s["docs"]["example"][d]])
        t = span_run.offsets[ex] + s["docs"]["start"][d] + e["pos"][k]  # the flat token the entry points at
        mine = held[(held >= span_run.offsets[ex]) & (held < span_run.offsets[ex + 1])]
        assert t in mine and x[t, c] == pytest.approx(x[mine, c].max()) == pytest.approx(e["value"][k])
    tops = [int(ex_rows[s["docs"]["example"][e["doc"][k]]]) for k in np.flatnonzero((e["kind"] == 0) & (e["card"] == 0))]
    assert all(span_run.examples[t]["spans"]["response"] for t in tops)  # no empty example is a top one


def test_xarray_of_a_span_run(span_run):
    pytest.importorskip("xarray")
    pytest.importorskip("dask")
    ds = span_run.to_xarray()
    v = ds["layer_02.resid_post"]
    assert v.dims == ("role_user_token", "hidden")
    acts = span_run.activations(2, "resid_post")
    np.testing.assert_array_equal(v.values, acts.numpy())
    owner = acts.row_examples
    assert ds["role_user_token_example"].values.tolist() == owner.tolist()
    assert ds["role_user_token_example_id"].values.tolist() == [span_run.examples[e]["id"] for e in owner]
    assert ds["role_user_token_position"].values.tolist() == (acts.tokens - span_run.offsets[owner]).tolist()
    ids = span_run.group["tokens/ids"][:]
    assert ds["role_user_token_id"].values.tolist() == ids[acts.tokens].tolist()
    assert ds["layer_00.resid_post"].dims[0] == "response_token" and ds["layer_03.resid_post"].dims[0] == "token"
    sel = v.isel(role_user_token=ds.role_user_token_split == "c").values
    np.testing.assert_array_equal(sel, span_run.activations(2, "resid_post", split="c").numpy())


def test_compare_at_a_span(span_run, all_run):
    from layerscope.analysis.compare import compare

    rows = compare(all_run, span_run, positions="response", layers=[0])
    n = {s: sum(len(t) for t in hand_tokens(span_run.examples[a:b], span_run.offsets[a:b + 1], "response"))
         for s, (a, b) in span_run.splits.items()}
    assert {(r.site, r.split): r.n for r in rows} == {(s, sp): n[sp] for s in ("mlp_act", "resid_post") for sp in n}
    for r in rows:  # the same model on the same tokens: equal wherever there is a row; no row, no numbers
        assert (r.rel_l2 == 0.0 and r.cosine == pytest.approx(1.0)) if r.n else np.isnan([r.cosine, r.rel_l2]).all()
    with pytest.raises(LayerScopeError, match=r"layer_00/mlp_act holds the response positions only in .*span0/run; "
                                              "compare it with --positions response"):
        compare(all_run, span_run, positions="all", layers=[0])
    with pytest.raises(LayerScopeError, match=r"layer_02/mlp_act holds the role:user positions only in .*, and "
                                              r"leaves out response token \d+ of example 0"):
        compare(all_run, span_run, positions="response", layers=[2])


def test_exports_of_a_span_run(span_run, tmp_path):
    from layerscope.interop.export import export

    out = export(span_run, "npy", tmp_path / "npy", layers=[0, 2], sites=["resid_post"])
    index = json.loads((out / "index.json").read_text())
    for L, pos in ((0, "response"), (2, "role:user")):
        acts = span_run.activations(L, "resid_post")
        np.testing.assert_array_equal(np.load(out / f"layer_{L:02d}.resid_post.npy"), acts.numpy())
        rows = index["spans"][pos]
        np.testing.assert_array_equal(np.load(out / rows["offsets"]), acts.map.offsets)
        np.testing.assert_array_equal(np.load(out / rows["tokens"]), acts.tokens)
        assert rows["splits"]["b"] == [int(acts.map.offsets[4]), int(acts.map.offsets[6])]
    with pytest.raises(LayerScopeError, match=r"seed004 stores every token position, but layer_00/resid_post "
                                              r"\(response\), layer_01/resid_post \(response\), layer_02/resid_post "
                                              r"\(role:user\) hold the response positions or the role:user positions "
                                              "only"):
        export(span_run, "seed004", tmp_path / "s4")
    with pytest.raises(LayerScopeError, match="layer_00/resid_post holds response positions, which leave out the "
                                              "last token"):
        export(span_run, "seed001", tmp_path / "s1")
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s4").exists()


# --- config ------------------------------------------------------------------------------------

DEFAULT = yaml.safe_load((REPO / "config/config.yaml").read_text())


def plan_with(capture: dict, tmp: Path, records: list[dict] | None = None, **top):
    from layerscope.config import build_plan

    cfg = {**DEFAULT, "capture": {**DEFAULT["capture"], **capture}, **top}
    if records is not None:
        cfg["dataset"] = {**DEFAULT["dataset"], "path": str(write_jsonl(tmp / "data.jsonl", records))}
    return build_plan(cfg, SCHEMA, REPO)


def test_config_accepts_spans_and_refuses_what_the_data_cannot_have(tmp_path):
    plan = plan_with({"positions": "response", "overrides": {"2": {"positions": "role:user"}}}, tmp_path)
    assert [plan.settings[L]["positions"] for L in range(4)] == ["response", "response", "role:user", "response"]
    texts = [{"text": "only text"}, {"text": "more text"}]
    assert plan_with({"positions": "prompt"}, tmp_path, texts).settings[0]["positions"] == "prompt"
    with pytest.raises(ConfigError, match=r"config error: capture\.positions: 'response' would capture nothing: no "
                                          r"record of data\.jsonl has an assistant message"):
        plan_with({"positions": "response"}, tmp_path, texts)
    with pytest.raises(ConfigError, match=r"config error: capture\.overrides\.1\.positions: 'role:tool' would capture "
                                          r"nothing: no record of demo\.jsonl has a message of role 'tool'"):
        plan_with({"overrides": {"1": {"positions": "role:tool"}}}, tmp_path)
    with pytest.raises(ConfigError, match=r"config error: capture\.positions: 'reply' is not one of last, all, "
                                          r"answer, prompt, response, role:NAME"):
        plan_with({"positions": "reply"}, tmp_path)


def test_pass_positions_are_its_prompt_or_its_reply(tmp_path):
    from tests.test_passes import QUESTIONS

    task = {"path": str(write_jsonl(tmp_path / "q.jsonl", QUESTIONS))}
    gen = {"max_new_tokens": 2}
    plan = plan_with({}, tmp_path, task=task, passes={"mcq": {"positions": "response", "generate": gen},
                                                      "self_confidence": {"positions": "prompt"}})
    assert plan.passes["mcq"]["positions"] == "response"
    with pytest.raises(ConfigError, match=r"config error: passes\.mcq\.positions: 'response' is the model's reply, "
                                          r"and this pass generates none"):
        plan_with({}, tmp_path, task=task, passes={"mcq": {"positions": "response"}})
    with pytest.raises(ConfigError, match=r"config error: passes\.mcq\.positions: 'role:user': a pass's examples "
                                          r"record their prompt and the model's reply only"):
        plan_with({}, tmp_path, task=task, passes={"mcq": {"positions": "role:user", "generate": gen}})
    with pytest.raises(ConfigError, match=r"passes\.mcq\.positions: 'role:user' \(the run's positions"):
        plan_with({"positions": "role:user"}, tmp_path, task=task, passes={"mcq": {"generate": gen}})


def test_a_bad_span_stops_the_workflow_naming_file_and_line(tmp_path):
    wd = copy_inputs(tmp_path)
    cfg = {**DEFAULT, "capture": {**DEFAULT["capture"], "overrides": {"3": {"positions": "role:tool"}}}}
    path = wd / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "role:tool" in t)
    res = run_snakemake(wd, "--cores", "1", "-n", configfile=path)
    assert res.returncode != 0
    assert f"{path}:{line}: config error: capture.overrides.3.positions: 'role:tool' would capture nothing" in \
        res.stdout + res.stderr
    assert not (wd / "results").exists()


# --- the workflow --------------------------------------------------------------------------------

def test_workflow_captures_spans_end_to_end(tmp_path):
    """The demo config at response, role:user and all positions, two parts: every step runs (markers
    named by role spans, store, metadata, summaries, dashboard), and the stored rows are the spans'
    rows of the demo run's all-position capture."""
    wd = copy_inputs(tmp_path)
    cfg = {**DEFAULT, "run": "spans",
           "capture": {**DEFAULT["capture"], "layers": [0, 1, 2], "sites": ["resid_post", "mlp_act"],
                       "positions": "response", "overrides": {"1": {"positions": "role:user"},
                                                              "2": {"positions": "all"}}}}
    path = wd / "spans.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_snakemake(wd, "--cores", "2", configfile=path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = layerscope.open(wd / "results/spans")
    assert (wd / "results/spans/activations.zarr/layer_01/resid_post/parts/1-role:user.json").is_file()
    assert run.metadata["positions"] == ["all", "response", "role:user"]
    assert (wd / "results/spans/dashboard/index.html").stat().st_size > 0
    for L, pos in ((0, "response"), (1, "role:user")):
        acts = run.activations(L, "resid_post")
        assert acts.shape[0] == sum(len(t) for t in hand_tokens(run.examples, run.offsets, pos)) > 0
    # the same config at every position: its rows at the spans are the span run's rows
    cfg2 = {**cfg, "run": "every", "capture": {**cfg["capture"], "positions": "all", "overrides": {}}}
    path.write_text(yaml.safe_dump(cfg2))
    res = run_snakemake(wd, "--cores", "2", "store", "metadata", configfile=path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    every = layerscope.open(wd / "results/every")
    for L, pos in ((0, "response"), (1, "role:user")):
        for site in ("resid_post", "mlp_act"):
            np.testing.assert_array_equal(run.activations(L, site).numpy(), every.select(L, site, pos)[0])
    np.testing.assert_array_equal(run.activations(2, "mlp_act").numpy(), every.activations(2, "mlp_act").numpy())
