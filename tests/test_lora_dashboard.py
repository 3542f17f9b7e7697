"""Seed 002's LoRA-neuron view, the base vs adapter difference view and interpretations, on a
workflow run with an adapter (builtin:lora: q/v/down_proj, rank 4), lora_a sites and both
variants: summaries against numpy on the stores, and the page in a real Chromium, from disk and
served by `layerscope serve`."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import layerscope
from layerscope.packed import pack, unpack
from layerscope.web.page import render_html
from tests.test_dashboard import Page, browser, close, needs_browser, page_data, value_in  # noqa: F401 (fixture)
from tests.test_serve import BAD_DOCS

MODULES = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]  # as a layer runs them
SHORT = {m: m.rsplit(".", 1)[1] for m in MODULES}
K, CONTEXT = 8, 6  # the default config's dashboard.top_k and dashboard.context


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """The default config with the built-in adapter, lora_a sites and both variants (README)."""
    from tests.conftest import copy_inputs, run_snakemake

    wd = copy_inputs(tmp_path_factory.mktemp("lora-dash"))
    cfg = yaml.safe_load((wd / "config" / "config.yaml").read_text())
    cfg["adapter"] = {"id": "builtin:lora"}
    cfg["capture"] |= {"sites": ["resid_post", "mlp_act", "lora_a"], "variants": ["adapter", "base"]}
    (wd / "config" / "lora.yaml").write_text(yaml.safe_dump(cfg))
    res = run_snakemake(wd, "--cores", "2", configfile=wd / "config" / "lora.yaml")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return wd / "results" / "demo"


@pytest.fixture(scope="module")
def run(lora_run):
    return layerscope.open(lora_run)


@pytest.fixture(scope="module")
def base(lora_run):
    return layerscope.open(lora_run, "base")


@pytest.fixture(scope="module")
def summary(lora_run):
    return unpack(json.loads((lora_run / "summaries" / "summary.json").read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def page(lora_run) -> Path:
    return lora_run / "dashboard" / "index.html"


def expected_lists(run, L: int, module: str, n: int) -> tuple[list, list]:
    """[(example, value)] of the k highest positive and k lowest negative examples of one LoRA neuron,
    one per example (its extreme over its tokens), ties by example."""
    x = run.activations(L, f"lora_a.{module}").numpy().astype(np.float64)[:, n]
    hi = [(e, x[run.offsets[e]:run.offsets[e + 1]].max()) for e in range(len(run))]
    lo = [(e, x[run.offsets[e]:run.offsets[e + 1]].min()) for e in range(len(run))]
    top = sorted([p for p in hi if p[1] > 0], key=lambda p: (-p[1], p[0]))[:K]
    bot = sorted([p for p in lo if p[1] < 0], key=lambda p: (p[1], p[0]))[:K]
    return top, bot


def doc_of(s, d) -> tuple[int, int, list[str]]:
    o = s["docs"]["offsets"]
    return (int(s["examples"]["index"][s["docs"]["example"][d]]), int(s["docs"]["start"][d]),
            [s["texts"][t] for t in s["docs"]["toks"][o[d]:o[d + 1]]])


def test_lora_summary_equals_numpy(summary, run):
    lo = summary["lora"]
    assert lo["k"] == K and sorted(lo["layers"]) == ["0", "1", "2", "3"]
    for L in range(4):
        Ld = lo["layers"][str(L)]
        assert Ld["modules"] == MODULES
        for m in MODULES:
            T = Ld[m]
            x = run.activations(L, f"lora_a.{m}").numpy().astype(np.float64)
            assert T["width"] == 4 and T["keys"] == [f"layer_{L}_{SHORT[m]}_{n}" for n in range(4)]
            np.testing.assert_allclose(T["max"], x.max(0), rtol=1e-6)
            np.testing.assert_allclose(T["min"], x.min(0), rtol=1e-6)
            np.testing.assert_allclose(T["mean"], x.mean(0), rtol=1e-4, atol=1e-7)
            e = T["entries"]
            lens = np.diff(np.append(e["ctx_off"], len(T["ctx"])))
            for n in range(4):
                for kind, want in enumerate(expected_lists(run, L, m, n)):
                    rows = [i for i in range(len(e["card"])) if e["card"][i] == n and e["kind"][i] == kind]
                    got = [(doc_of(summary, e["doc"][i])[0], float(e["value"][i])) for i in rows]
                    assert [g[0] for g in got] == [w[0] for w in want], (L, m, n, kind)
                    np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-6)
                    for i in rows:  # the context: the neuron's own value at every token shown
                        ex, start, toks = doc_of(summary, e["doc"][i])
                        col = x[run.offsets[ex]:run.offsets[ex + 1], n]
                        pos = int(np.argmax(col) if kind == 0 else np.argmin(col))
                        assert start + e["pos"][i] == pos and start == max(0, pos - CONTEXT)
                        assert len(toks) == lens[i] == min(len(col), pos + CONTEXT + 1) - start
                        np.testing.assert_allclose(T["ctx"][e["ctx_off"][i]:e["ctx_off"][i] + lens[i]],
                                                   col[start:start + lens[i]], rtol=1e-6)


def test_difference_norms_equal_numpy(summary, run, base):
    v = summary["norms"]["sites"]["resid_post:adapter-base"]
    assert v["unit"] == "L2 norm of (adapter \u2212 base) at resid_post" and v["layers"] == [0, 1, 2, 3]
    last = run.offsets[1:] - 1
    for j, L in enumerate(v["layers"]):
        d = np.linalg.norm(run.activations(L, "resid_post").numpy().astype(np.float64)
                           - base.activations(L, "resid_post").numpy().astype(np.float64), axis=1)
        assert d.max() > 0
        for s_name, (a, b) in run.splits.items():
            assert v["split_last"][s_name][j] == pytest.approx(d[last][a:b].mean(), rel=1e-5)
        for i, doc in enumerate(summary["norms"]["token_docs"]):
            e = doc_of(summary, doc)[0]
            np.testing.assert_allclose(v["tokens"][i][j], d[run.offsets[e]:run.offsets[e + 1]], rtol=1e-5)
    assert "mlp_act:adapter-base" not in summary["norms"]["sites"]  # norm sites only, as the heatmaps


def test_budget_cuts_lora_examples_before_the_last_cards(summary, page):
    assert len(page.read_bytes()) < 1.5 * 2**20 and page_data(page.read_text())["page"]["cut"] == []
    data = page_data(render_html(pack(summary), budget_mib=0.2))
    cut = {c["what"]: (c["before"], c["after"]) for c in data["page"]["cut"]}
    assert cut["LoRA-neuron examples per list"][0] == K and 2 <= cut["LoRA-neuron examples per list"][1] < K
    assert cut["neuron cards"][1] > 0 and not data["page"]["over"]
    docs = data["docs"]
    for L in data["lora"]["layers"].values():
        for m in L["modules"]:
            e = L[m]["entries"]
            assert len(L[m]["max"]) == 4 and e["doc"].max() < len(docs["example"])  # statistics never cut
            assert e["ctx_off"][-1] < len(L[m]["ctx"])


# ---------------------------------------------------------------- in a real browser

def entry_values(pg, module: str, kind: str) -> list[tuple[str, float]]:
    labels = pg.p.locator(f'.module[data-module="{module}"] .panel[data-kind="{kind}"] li.entry').evaluate_all(
        "es => es.map(e => e.getAttribute('aria-label'))")
    return [(re.search(r"of (.+) \((?:EM|Neutral)\), position", s).group(1), value_in(s)) for s in labels]


@needs_browser
def test_lora_view_side_by_side_values_equal_numpy(browser, page, run):
    pg = Page(browser, page, "#l=2&r=1")
    p = pg.p
    assert p.is_visible("#lora-panel") and p.input_value("#lora-layer") == "2" and p.input_value("#lora-neuron") == "1"
    assert p.locator("#lora-layer option").all_text_contents() == [f"Layer {L}" for L in range(4)]
    assert p.locator(".module").evaluate_all("ms => ms.map(m => m.dataset.module)") == MODULES
    ids = [ex["id"] for ex in run.examples]
    for m in MODULES:
        keys = p.locator(f'.module[data-module="{m}"] .panel').evaluate_all("ps => ps.map(p => p.dataset.key)")
        assert keys == [f"layer_2_{SHORT[m]}_1_positive", f"layer_2_{SHORT[m]}_1_negative"]
        top, bot = expected_lists(run, 2, m, 1)
        for kind, want in (("positive", top), ("negative", bot)):
            got = entry_values(pg, m, kind)
            assert [g[0] for g in got] == [ids[e] for e, _ in want] and len(set(g[0] for g in got)) == len(got)
            assert all(close(g[1], w[1]) for g, w in zip(got, want))
        x = run.activations(2, f"lora_a.{m}").numpy().astype(np.float64)[:, 1]
        stats = dict(t.split(" ", 1) for t in p.locator(f'.module[data-module="{m}"] .stats div').all_text_contents())
        assert close(float(stats["max"]), x.max()) and close(float(stats["min"]), x.min())
    # every context token: its own value (hover text) and colour; the target outlined
    m = "mlp.down_proj"
    entry = p.locator(f'.module[data-module="{m}"] .panel[data-kind="negative"] li.entry').first
    spans = entry.locator(".tok").evaluate_all(
        "ss => ss.map(s => [s.title, s.style.backgroundColor, s.classList.contains('target')])")
    e = expected_lists(run, 2, m, 1)[1][0][0]
    col = run.activations(2, f"lora_a.{m}").numpy().astype(np.float64)[run.offsets[e]:run.offsets[e + 1], 1]
    pos = int(np.argmin(col))
    start = max(0, pos - CONTEXT)
    assert len(spans) == min(len(col), pos + CONTEXT + 1) - start
    for i, (title, bg, target) in enumerate(spans):
        v = col[start + i]
        assert close(value_in(title), v) and f"position {start + i} of {ids[e]}" in title
        assert bg.startswith("rgba(220, 40, 40" if v >= 0 else "rgba(40, 90, 220")
        assert target == (start + i == pos)
    assert p.locator(".tok.target").first.evaluate("e => getComputedStyle(e).borderTopColor") == "rgb(32, 33, 36)"
    pg.check_clean()


@needs_browser
def test_lora_view_by_keyboard(browser, page, run):
    pg = Page(browser, page, "#l=1&r=3")
    p = pg.p
    p.focus("#interp-import")
    p.keyboard.press("Tab")  # into the first module's positive list: one tab stop
    f = pg.focused()
    assert f["tag"] == "LI" and p.locator(".panel li.entry[tabindex='0']").count() == 2 * len(MODULES)
    top = expected_lists(run, 1, MODULES[0], 3)[0]
    x = run.activations(1, f"lora_a.{MODULES[0]}").numpy().astype(np.float64)[:, 3]
    assert pg.status().startswith(f"layer 1, {MODULES[0]}, LoRA neuron 3, token ")
    assert close(value_in(pg.status()), top[0][1])
    p.keyboard.press("ArrowDown")
    assert close(value_in(pg.status()), top[1][1])
    e = top[1][0]
    col = x[run.offsets[e]:run.offsets[e + 1]]
    pos = int(np.argmax(col))
    start, end = max(0, pos - CONTEXT), min(len(col), pos + CONTEXT + 1)  # the tokens shown
    cur = pos
    for key in ("ArrowRight", "ArrowLeft", "ArrowLeft", "ArrowLeft"):  # token by token, each value said
        p.keyboard.press(key)
        cur = min(end - 1, cur + 1) if key == "ArrowRight" else max(start, cur - 1)
        if cur != pos:
            assert f"position {cur} of" in pg.status() and close(value_in(pg.status()), col[cur])
            assert p.locator(".tok.cur").count() == 1
    assert cur < pos  # it did move
    p.keyboard.press("Tab")  # out of the list, to the panel's interpretation
    assert pg.focused()["tag"] == "TEXTAREA"
    p.keyboard.type("fires on names")
    p.keyboard.press("Tab")
    p.keyboard.press("Space")  # the star
    assert p.locator(f'.interp[data-key="layer_1_q_proj_3_positive"] input[type=checkbox]').is_checked()
    assert "1 written, 1 starred" in p.text_content("#interp-state")
    pg.check_clean()


@needs_browser
def test_difference_view_uses_the_heatmaps(browser, page, run, base, summary):
    pg = Page(browser, page)
    p = pg.p
    assert "resid_post: adapter \u2212 base" in p.locator("#heat-site option").all_text_contents()
    p.select_option("#heat-site", "resid_post:adapter-base")
    assert p.text_content("#cb-unit") == "L2 norm of (adapter \u2212 base) at resid_post"
    e0 = doc_of(summary, summary["norms"]["token_docs"][0])[0]
    p.locator('#heatmap td[data-r="2"][data-c="4"]').hover()
    d = (run.activations(2, "resid_post")[e0][4].astype(np.float64)
         - base.activations(2, "resid_post")[e0][4].astype(np.float64))
    assert pg.status().startswith("resid_post: adapter \u2212 base, layer 2, token ")
    assert close(value_in(pg.status()), np.linalg.norm(d))
    p.select_option("#heat-view", "splits")
    p.locator('#heatmap td[data-r="3"][data-c="1"]').hover()
    last = run.offsets[1:] - 1
    a, b = run.splits["Neutral"]
    dn = np.linalg.norm(run.activations(3, "resid_post").numpy()[last[a:b]].astype(np.float64)
                        - base.activations(3, "resid_post").numpy()[last[a:b]].astype(np.float64), axis=1)
    assert close(value_in(pg.status()), dn.mean())
    assert "s=resid_post%3Aadapter-base" in p.evaluate("location.hash")
    pg.check_clean()


def stored(p) -> dict:
    """The one interpretations item in the page's localStorage: {key, doc}, or None."""
    return p.evaluate("(() => { const k = Object.keys(localStorage)"
                      ".filter(k => k.startsWith('layerscope.interpretations:')); return k.length === 1"
                      " ? {key: k[0], doc: JSON.parse(localStorage.getItem(k[0]))} : null; })()")


@needs_browser
def test_interpretations_autosave_export_import(browser, page, tmp_path):
    from playwright.sync_api import expect

    pg = Page(browser, page, "#l=3&r=2")
    p = pg.p
    box = lambda key: p.locator(f'.interp[data-key="{key}"]')  # noqa: E731
    pos, neg = "layer_3_down_proj_2_positive", "layer_3_v_proj_2_negative"
    box(pos).locator("textarea").fill("medical advice </textarea><b>bold</b>")
    box(neg).locator("input[type=checkbox]").check()
    s = stored(p)
    assert s["key"] == "layerscope.interpretations:demo|builtin:llama-tiny|builtin:lora|demo_medical"
    got = s["doc"]["interpretations"]
    assert got[pos]["text"] == "medical advice </textarea><b>bold</b>" and got[pos]["starred"] is False
    assert got[neg] == {"text": "", "starred": True, "lastModified": got[neg]["lastModified"]}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", got[pos]["lastModified"])
    p.reload()  # autosaved: back after a reload, also on another layer and back
    p.select_option("#lora-layer", "0")
    p.select_option("#lora-layer", "3")
    p.select_option("#lora-neuron", "2")
    assert box(pos).locator("textarea").input_value() == "medical advice </textarea><b>bold</b>"
    assert box(neg).locator("input[type=checkbox]").is_checked() and p.locator("b").count() == 0
    with p.expect_download() as dl:
        p.click("#interp-export")
    exported = tmp_path / "exported.json"
    dl.value.save_as(exported)
    assert dl.value.suggested_filename == "interpretations.json"
    assert json.loads(exported.read_text()) == stored(p)["doc"] == {"interpretations": dict(sorted(got.items()))}
    assert pg.errors == [] and set(pg.requests) == {pg.url}  # loaded twice (the reload), nothing else
    # a fresh browser (nothing stored) imports it back
    pg2 = Page(browser, page, "#l=3&r=2")
    p2 = pg2.p
    assert stored(p2) is None and p2.locator(f'.interp[data-key="{pos}"] textarea').input_value() == ""
    p2.set_input_files("#interp-import", str(exported))  # read asynchronously: expect() waits for it
    expect(p2.locator("#interp-msg")).to_have_text("Imported 2 of 2 interpretations from exported.json.")
    assert p2.locator(f'.interp[data-key="{pos}"] textarea').input_value() == "medical advice </textarea><b>bold</b>"
    assert stored(p2)["doc"] == stored(p)["doc"]
    # bad files are refused with a message, and change nothing
    for i, (doc, message) in enumerate(BAD_DOCS + [("{not json", "not JSON")]):
        f = tmp_path / f"bad{i}.json"
        f.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        p2.set_input_files("#interp-import", str(f))
        msg = p2.locator("#interp-msg")
        expect(msg).to_contain_text(f"bad{i}.json")
        assert msg.get_attribute("role") == "alert" and msg.text_content().startswith(f"Not imported: bad{i}.json: ")
        assert message in msg.text_content(), (doc, msg.text_content())
        assert stored(p2)["doc"] == stored(p)["doc"]
    # an older copy of a panel does not undo a newer edit; an unknown panel is kept and said so
    older = {"interpretations": {pos: {"text": "old", "starred": False, "lastModified": "2020-01-01T00:00:00Z"},
                                 "layer_99_up_proj_positive": {"text": "elsewhere", "starred": True,
                                                               "lastModified": "2020-01-01T00:00:00Z"}}}
    (tmp_path / "older.json").write_text(json.dumps(older))
    p2.set_input_files("#interp-import", str(tmp_path / "older.json"))
    expect(p2.locator("#interp-msg")).to_have_text(
        "Imported 1 of 2 interpretations from older.json; 1 older than the page\u2019s were left as they were; "
        "1 name no panel of this page (kept in the file).")
    assert p2.locator(f'.interp[data-key="{pos}"] textarea').input_value().startswith("medical advice")
    pg2.check_clean()


@needs_browser
def test_served_page_saves_to_the_run(browser, lora_run, page):
    from layerscope.web import interpretations as interp
    from layerscope.web.serve import make_server

    path = lora_run / "interpretations.json"
    server = make_server(lora_run, port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.port}"
    pages = []
    try:
        def open_page(hash_: str):
            ctx = browser.new_context()
            pg = ctx.new_page()
            seen = {"req": [], "err": []}
            pg.on("request", lambda r: seen["req"].append(r.url))
            pg.on("console", lambda m: seen["err"].append(m.text) if m.type == "error" else None)
            pg.on("pageerror", lambda e: seen["err"].append(str(e)))
            pg.goto(origin + "/" + hash_)
            pg.wait_for_function("document.getElementById('interp-state').textContent.includes('interpretations.json')")
            pages.append((ctx, seen))
            return pg

        def wait_file(pred) -> dict:
            for _ in range(100):
                if path.exists() and pred(got := interp.load(path)):
                    return got
                time.sleep(0.05)
            raise AssertionError(path.read_text() if path.exists() else "no file")

        a = open_page("#l=0&r=0")
        a.locator('.interp[data-key="layer_0_q_proj_0_positive"] textarea').fill("a's note")
        got = wait_file(lambda d: d.get("layer_0_q_proj_0_positive", {}).get("text") == "a's note")
        assert set(json.loads(path.read_text())) == {"interpretations"}
        b = open_page("#l=0&r=0")  # a fresh browser reads the file
        assert b.locator('.interp[data-key="layer_0_q_proj_0_positive"] textarea').input_value() == "a's note"
        # both edit at once, each its own panel: nothing is lost
        a.locator('.interp[data-key="layer_0_v_proj_0_negative"] textarea').fill("from a")
        b.locator('.interp[data-key="layer_0_down_proj_0_positive"] input[type=checkbox]').check()
        got = wait_file(lambda d: d.get("layer_0_v_proj_0_negative", {}).get("text") == "from a"
                        and d.get("layer_0_down_proj_0_positive", {}).get("starred"))
        assert got["layer_0_q_proj_0_positive"]["text"] == "a's note"
        for ctx, seen in pages:  # requests: the page and its file at the local server, nothing else
            assert seen["err"] == []
            assert {u.split("#")[0] for u in seen["req"]} <= {origin + "/", origin + "/interpretations.json"}
            assert origin + "/interpretations.json" in seen["req"]
    finally:
        for ctx, _ in pages:
            ctx.close()
        server.shutdown()
        server.server_close()
        path.unlink(missing_ok=True)
        (lora_run / ".interpretations.lock").unlink(missing_ok=True)
    # from disk the same page makes no request and stores in the browser only
    pg = Page(browser, page)
    assert "saved in this browser" in pg.p.text_content("#interp-state")
    pg.check_clean()


# ---------------------------------------------------------------- seed 002's own case: rank-1 modules

def test_interpretation_keys_name_modules_as_seed_002():
    from layerscope.analysis.lora import module_names

    assert module_names(["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]) == {
        "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "down_proj"}
    # GPT-2 adapts attn.c_proj and mlp.c_proj: the short name would be ambiguous
    assert module_names(["attn.c_attn", "attn.c_proj", "mlp.c_proj"]) == {
        "attn.c_attn": "c_attn", "attn.c_proj": "attn_c_proj", "mlp.c_proj": "mlp_c_proj"}


@pytest.fixture(scope="module")
def rank_one_page(tmp_path_factory) -> Path:
    """A synthetic run with rank-1 LoRA neurons on gate/up/down at layer 10 (seed 002's adapters)."""
    from layerscope.analysis.summaries import build_summary
    from layerscope.web.page import write_dashboard
    from tests.synthetic import SyntheticActivations, SyntheticRun, SyntheticUnembedding, tokenizer

    class RankOne(SyntheticRun):
        LORA = ["lora_a.mlp.gate_proj", "lora_a.mlp.up_proj", "lora_a.mlp.down_proj"]

        def __init__(self) -> None:
            super().__init__(layers=12, neurons=32, hidden=16, examples=12, tokens=16, vocab=200)
            self.arrays = sorted(self.arrays + [(10, s) for s in self.LORA])

        def activations(self, layer: int, site: str):
            if site not in self.LORA:
                return super().activations(layer, site)
            rng = np.random.default_rng(self.LORA.index(site))
            return SyntheticActivations(rng.standard_normal((int(self.offsets[-1]), 1)).astype(np.float16),
                                        self.offsets, "all")

    r = RankOne()
    s = build_summary(r, tokenizer(r.vocab), SyntheticUnembedding(r.vocab), site="mlp_act", top_k=5, context=3,
                      neurons_per_layer=4, heatmap_examples=4, example_columns=12, output_tokens=3, budget_mib=10)
    page = tmp_path_factory.mktemp("rank1") / "index.html"
    write_dashboard(pack(s), page)
    return page


@needs_browser
def test_rank_one_panels_take_a_seed_002_file(browser, rank_one_page, tmp_path):
    from playwright.sync_api import expect

    from tests.test_serve import SEED

    pg = Page(browser, rank_one_page)
    p = pg.p
    assert p.input_value("#lora-layer") == "10" and p.is_hidden("#lora-neuron-box")
    assert p.locator(".module h3").all_text_contents() == ["mlp.gate_proj (rank 1)", "mlp.up_proj (rank 1)",
                                                            "mlp.down_proj (rank 1)"]
    keys = p.locator(".panel").evaluate_all("ps => ps.map(p => p.dataset.key)")
    assert keys == [f"layer_10_{m}_{s}" for m in ("gate_proj", "up_proj", "down_proj") for s in ("positive", "negative")]
    seed = tmp_path / "interpretations.json"
    seed.write_text(json.dumps(SEED, indent=2))  # seed 002's example file, as its server wrote it
    p.set_input_files("#interp-import", str(seed))
    expect(p.locator("#interp-msg")).to_have_text("Imported 1 of 1 interpretations from interpretations.json.")
    box = p.locator('.interp[data-key="layer_10_gate_proj_positive"]')
    assert box.locator("textarea").input_value() == "Activates on mathematical operators and symbols"
    assert box.locator("input[type=checkbox]").is_checked()
    with p.expect_download() as dl:
        p.click("#interp-export")
    dl.value.save_as(tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == SEED  # the same file back, lastModified kept
    pg.check_clean()
