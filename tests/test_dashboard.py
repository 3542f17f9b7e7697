"""The dashboard page: self-contained, within its size budget, every model or data string shown as
text; and, in a real Chromium (Playwright), no console error, no request, and the values it shows
equal numpy computations on the store."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import layerscope
from layerscope.packed import pack, pack_array, unpack, unpack_array
from layerscope.web.page import render_html, write_dashboard

HOSTILE = "</script><script>window.__pwned=1</script>"
PIECES = [" Hello", HOSTILE, "<b>", "&amp;", "\n", "🙂", " world", "\u2028", "<!--"]
CHROMIUM = "/usr/bin/chromium"


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.scripts, self._script = [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._script = dict(attrs)

    def handle_data(self, data):
        if self._script is not None:
            self.scripts.append((self._script, data))

    def handle_endtag(self, tag):
        self._script = None


def parse(html: str) -> Collect:
    p = Collect()
    p.feed(html)
    return p


def page_data(html: str) -> dict:
    data = [text for attrs, text in parse(html).scripts if attrs.get("type") == "application/json"]
    assert len(data) == 1
    return unpack(json.loads(data[0]))


@pytest.fixture(scope="module")
def hostile_summary():
    from tests.synthetic import PiecesDecoder, synthetic_summary

    return synthetic_summary(decoder=PiecesDecoder(PIECES), layers=3, neurons=40, hidden=16, examples=6, tokens=12,
                             vocab=len(PIECES) * 3, split_names=(HOSTILE, "<i>B</i>"), id_prefix="<img src=x>",
                             model_name=HOSTILE, neurons_per_layer=8)


def test_packed_arrays_round_trip():
    for a in (np.arange(5, dtype=np.int64), np.array([[1.5, np.nan], [np.inf, -2]], np.float32),
              np.array([70000, -1]), np.zeros((0, 3), np.float32), np.array([True, False])):
        b = unpack_array(pack_array(a))
        np.testing.assert_array_equal(b, a)
    assert unpack_array(pack_array(np.array([1, 2, 300]))).dtype == np.uint16  # narrowed
    assert unpack(pack({"x": [np.float32(1.5), float("nan")]})) == {"x": [1.5, None]}


def test_hostile_strings_stay_text(hostile_summary):
    html = render_html(pack(hostile_summary))
    p = parse(html)
    assert [t for t, _ in p.tags].count("script") == 2 and html.count("</script>") == 2
    assert "<b>" not in html and "<img" not in html and "<!--" not in html and "\u2028" not in html
    data = page_data(html)
    assert HOSTILE in data["texts"] and data["meta"]["model"] == HOSTILE and data["splits"][0] == HOSTILE
    code = [text for attrs, text in p.scripts if "type" not in attrs][0]
    for bad in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert bad not in code, bad


def test_self_contained_no_network(hostile_summary):
    html = render_html(pack(hostile_summary))
    for bad in ("http://", "https://", "//cdn", "<link", "XMLHttpRequest", "import(", "@import",
                "WebSocket", "sendBeacon", "<iframe", "url("):
        assert bad not in html, bad
    # the page forbids itself any request but to its own origin (connect-src 'self'), and makes those
    # only for interpretations.json, only when loaded over http from this machine (layerscope serve)
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)
    assert csp == "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'"
    assert re.findall(r"fetch\((\w+)", html) == ["serverURL", "serverURL"]
    assert re.findall(r"const serverURL = (.*);", html) == [
        "location.protocol === 'http:' && LOOPBACK.includes(location.hostname) ? 'interpretations.json' : null"]
    for tag, a in parse(html).tags:
        assert "src" not in a and "href" not in a, (tag, a)


def test_32_layer_run_with_every_neuron_indexed_stays_under_10_mib():
    from tests.synthetic import synthetic_summary

    s = synthetic_summary(layers=32, neurons=2048)
    html = render_html(pack(s))
    data = page_data(html)
    assert len(html.encode()) < 10 * 2**20 and data["page"]["cut"] == [] and not data["page"]["over"]
    layers = data["neurons"]["layers"]
    assert len(layers) == 32 and all(len(L["max"]) == 2048 and len(L["cards"]) == 64 for L in layers.values())


def test_budget_cuts_and_says_so():
    from tests.synthetic import synthetic_summary

    s = synthetic_summary(layers=8, neurons=512, budget_mib=0.5)
    html = render_html(pack(s))
    page = page_data(html)["page"]
    assert len(html.encode()) <= 0.5 * 2**20 and not page["over"] and page["budget_mib"] == 0.5
    cut = {c["what"]: (c["before"], c["after"]) for c in page["cut"]}
    assert cut["neuron cards"][0] == 8 * 64 and cut["neuron cards"][1] < 8 * 64
    data = page_data(html)
    assert all(len(L["max"]) == 512 for L in data["neurons"]["layers"].values())  # the index is never cut
    # every reference still resolves after the cut
    docs = data["docs"]
    assert docs["offsets"][-1] == len(docs["toks"]) and docs["toks"].max() < len(data["texts"])
    for L in data["neurons"]["layers"].values():
        assert L["entries"]["doc"].max() < len(docs["example"]) and L["entries"]["card"].max() < len(L["cards"])


def test_an_older_summary_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="-R summarize"):
        render_html({"title": "t", "meta": {}, "texts": [], "docs": [], "heatmap": None, "neurons": None})


def test_write_is_atomic(tmp_path, hostile_summary):
    target = tmp_path / "a" / "index.html"
    size = write_dashboard(pack(hostile_summary), target)
    assert target.stat().st_size == size and [p.name for p in target.parent.iterdir()] == ["index.html"]


# ---------------------------------------------------------------- in a real browser

def _browser_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; .ci/run installs it)"
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        return "chromium is not installed (apt-get install chromium; .ci/run installs it)"
    return None


BROWSER_SKIP = _browser_reason()
if BROWSER_SKIP:
    print(f"test_dashboard: browser tests skipped: {BROWSER_SKIP}")
needs_browser = pytest.mark.skipif(BROWSER_SKIP is not None, reason=BROWSER_SKIP or "")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"))
        yield b
        b.close()


class Page:
    """A page opened from disk, recording console errors, page errors and every request."""

    def __init__(self, browser, path: Path, hash_: str = "") -> None:
        self.errors, self.requests = [], []
        self.p = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.p.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.p.on("pageerror", lambda e: self.errors.append(str(e)))
        self.p.on("request", lambda r: self.requests.append(r.url))
        self.url = path.resolve().as_uri()
        self.p.goto(self.url + hash_)

    def status(self) -> str:
        return self.p.text_content("#status")

    def hash(self) -> dict:
        from urllib.parse import parse_qs

        return {k: v[0] for k, v in parse_qs(self.p.evaluate("location.hash").lstrip("#")).items()}

    def focused(self) -> dict:
        return self.p.evaluate("(() => { const e = document.activeElement; return {tag: e.tagName, id: e.id, "
                               "data: Object.assign({}, e.dataset), text: e.textContent}; })()")

    def check_clean(self) -> None:
        assert self.errors == [] and self.requests == [self.url.split("#")[0]]


def value_in(msg: str) -> float:
    return float(msg.rsplit(": ", 1)[1])


def close(shown: float, want: float) -> bool:
    """The page shows 4 significant digits."""
    return shown == pytest.approx(float(f"{want:.4g}"), rel=1e-9, abs=1e-12)


@pytest.fixture(scope="module")
def demo_page(demo):
    return demo / "results/demo/dashboard/index.html"


@pytest.fixture(scope="module")
def run(demo):
    return layerscope.open(demo / "results/demo")


@pytest.fixture(scope="module")
def summary(demo_page):
    return page_data(demo_page.read_text(encoding="utf-8"))


def token_example(summary, i: int) -> int:
    d = summary["norms"]["token_docs"][i]
    return int(summary["examples"]["index"][summary["docs"]["example"][d]])


@needs_browser
def test_demo_page_structure_offline(browser, demo_page, run, summary):
    pg = Page(browser, demo_page)
    p = pg.p
    e0 = token_example(summary, 0)
    n_tok = int(run.offsets[e0 + 1] - run.offsets[e0])
    assert p.locator("#heatmap td").count() == 4 * n_tok
    assert p.locator("#heatmap thead th").count() == n_tok + 1
    # colour bar with units; global scale: 0 to the largest norm in the view
    norms = [np.linalg.norm(run.activations(L, "resid_post")[e0].astype(np.float64), axis=1) for L in range(4)]
    assert p.text_content("#cb-unit") == "L2 norm of resid_post"
    assert close(float(p.text_content("#cb-lo")), 0)
    assert close(float(p.text_content("#cb-hi")), max(n.max() for n in norms))
    assert p.locator("#cb-ticks span").count() == 5
    assert [o for o in p.locator("#heat-site option").all_text_contents()] == ["resid_post", "attn_out", "mlp_out"]
    assert p.locator("#heat-example option").count() == 19
    # neuron index: how many neurons are included is said, and all rows are there
    assert p.text_content("#n-count").startswith("Layer 0: all 172 neurons of mlp_act indexed, 172 with a full card")
    assert p.locator("#n-index tbody tr").count() == 172
    assert p.locator("#hist .bin").count() == 32
    assert p.locator("#n-card ul[data-kind=top] li.entry").count() == 8
    assert p.locator("#three").get_attribute("data-bars") == str(4 * n_tok)
    assert p.is_hidden("#budget-note") and p.is_hidden("#heat-missing") and p.is_hidden("#neuron-missing")
    assert p.is_hidden("#lora-panel")  # no adapter: no LoRA view
    pg.check_clean()


@needs_browser
def test_log_and_per_layer_scales(browser, demo_page, run, summary):
    pg = Page(browser, demo_page)
    p = pg.p
    e0 = token_example(summary, 0)
    norms = np.array([np.linalg.norm(run.activations(L, "resid_post")[e0].astype(np.float64), axis=1)
                      for L in range(4)])
    p.select_option("#heat-norm", "log")
    assert "log scale" in p.text_content("#cb-unit")
    assert close(float(p.text_content("#cb-lo")), norms.min()) and close(float(p.text_content("#cb-hi")), norms.max())
    p.select_option("#heat-norm", "layer")
    assert "per layer" in p.text_content("#cb-unit") and p.text_content("#cb-hi") == "1"
    # the largest cell of each row gets the top colour of the ramp
    for j in range(4):
        c = int(norms[j].argmax())
        assert p.locator(f'#heatmap td[data-r="{j}"][data-c="{c}"]').evaluate("e => e.style.background") == \
            "rgb(253, 231, 37)"
    assert pg.hash()["m"] == "layer"
    pg.check_clean()


@needs_browser
def test_keyboard_roving_values_equal_numpy(browser, demo_page, run, summary):
    pg = Page(browser, demo_page)
    p = pg.p
    assert p.locator("#heatmap td[tabindex='0']").count() == 1  # one tab stop for the whole grid
    p.focus("#heat-norm")
    p.keyboard.press("Tab")  # the colour bar is not focusable: straight into the grid
    f = pg.focused()
    assert f["tag"] == "TD" and f["data"] == {"r": "0", "c": "0"}
    e0 = token_example(summary, 0)
    for key, (j, c) in (("ArrowRight", (0, 1)), ("ArrowDown", (1, 1)), ("ArrowRight", (1, 2)), ("End", (1, None))):
        p.keyboard.press(key)
        f = pg.focused()
        n_tok = int(run.offsets[e0 + 1] - run.offsets[e0])
        c = n_tok - 1 if c is None else c
        assert f["data"] == {"r": str(j), "c": str(c)}
        want = np.linalg.norm(run.activations(j, "resid_post")[e0][c].astype(np.float64))
        assert pg.status().startswith(f"resid_post, layer {j}, token ") and close(value_in(pg.status()), want)
        assert p.locator("#heatmap td[tabindex='0']").count() == 1
    assert pg.hash()["c"] == f"1.{c}"
    p.keyboard.press("Tab")  # leaves the grid in one step
    assert pg.focused()["tag"] != "TD"
    pg.check_clean()


@needs_browser
def test_views_for_splits_and_examples(browser, demo_page, run, summary):
    pg = Page(browser, demo_page)
    p = pg.p
    last = run.offsets[1:] - 1
    n = {L: np.linalg.norm(run.activations(L, "mlp_out").numpy().astype(np.float64), axis=1) for L in range(4)}
    p.select_option("#heat-site", "mlp_out")
    p.select_option("#heat-view", "splits")
    assert p.locator("#heatmap thead th").all_text_contents() == ["layer", "EM", "Neutral"]
    p.locator('#heatmap td[data-r="2"][data-c="1"]').hover()
    assert close(value_in(pg.status()), n[2][last][9:19].mean())
    p.check("#heat-diff")
    assert p.text_content("#cb-unit").startswith("difference of L2 norm of mlp_out (EM \u2212 Neutral)")
    p.locator('#heatmap td[data-r="3"][data-c="0"]').hover()
    assert close(value_in(pg.status()), n[3][last][:9].mean() - n[3][last][9:19].mean())
    p.select_option("#heat-view", "posmean")  # A - B by position
    p.locator('#heatmap td[data-r="1"][data-c="0"]').hover()
    want = n[1][run.offsets[0:9]].mean() - n[1][run.offsets[9:19]].mean()
    assert close(value_in(pg.status()), want)
    p.select_option("#heat-view", "examples")
    cols = summary["examples"]["index"][summary["norms"]["columns"]]
    p.locator('#heatmap td[data-r="0"][data-c="5"]').hover()
    assert close(value_in(pg.status()), n[0][last][cols[5]])
    # the state is in the hash: a reload restores the view
    h = p.evaluate("location.hash")
    assert "v=examples" in h and "s=mlp_out" in h
    pg2 = Page(browser, demo_page, h)
    assert pg2.p.input_value("#heat-view") == "examples" and pg2.p.input_value("#heat-site") == "mlp_out"
    assert pg2.p.locator("#heatmap thead th").count() == len(cols) + 1
    pg.check_clean()
    pg2.check_clean()


@needs_browser
def test_links_cell_to_neuron_card_and_back_to_the_example(browser, demo_page, run, summary):
    pg = Page(browser, demo_page)
    p = pg.p
    e0 = token_example(summary, 0)
    p.locator('#heatmap td[data-r="2"][data-c="3"]').focus()
    p.keyboard.press("Enter")  # the neurons most active at this token, layer 2
    x = run.activations(2, "mlp_act")[e0].astype(np.float32)
    top3 = np.argsort(-x[3], kind="stable")[:3]
    links = p.locator("#cell-neurons a")
    assert [int(a) for a in links.evaluate_all("as => as.map(a => a.dataset.n)")] == top3.tolist()
    assert pg.focused()["tag"] == "A"
    p.keyboard.press("ArrowDown")
    p.keyboard.press("Enter")  # follow the second link: the card of that neuron
    p.wait_for_function("location.hash.includes('n=')")
    n = int(top3[1])
    assert pg.hash()["n"] == str(n) and pg.hash()["L"] == "2"
    assert p.text_content("#card-title") == f"Layer 2 \u00b7 neuron {n} (mlp_act)"
    assert pg.focused()["id"] == "n-card"
    stats = dict(t.split(" ", 1) for t in p.locator("#n-card .stats div").all_text_contents())
    xa = run.activations(2, "mlp_act").numpy().astype(np.float64)[:, n]
    for k, want in (("max", xa.max()), ("min", xa.min()), ("mean", xa.mean()), ("sd", xa.std())):
        assert close(float(stats[k]), want), k
    split_vals = p.locator("#n-card .bars .v").all_text_contents()
    assert close(float(split_vals[0]), xa[:run.offsets[9]].mean())
    assert close(float(split_vals[1]), xa[run.offsets[9]:].mean())
    # top entries: one per example, value at the marked token
    entries = p.locator("#n-card ul[data-kind=top] li.entry")
    labels = entries.evaluate_all("es => es.map(e => e.getAttribute('aria-label'))")
    ids = [re.search(r"of (.+) \((EM|Neutral)\), position", s).group(1) for s in labels]
    assert len(set(ids)) == len(ids) == 8
    per_ex = sorted((float(xa[run.offsets[e]:run.offsets[e + 1]].max()) for e in range(len(run))), reverse=True)[:8]
    for s, want in zip(labels, per_ex):
        assert close(value_in(s), want)
    # keyboard into the entries (one tab stop), Enter goes back to the whole example
    entries.first.focus()
    assert p.locator("#n-card ul[data-kind=top] li[tabindex='0']").count() == 1
    # and samples across activation ranges, one example per range, lowest range first
    ranges = p.locator("#n-card ul[data-kind=ranges] li")
    assert 1 <= ranges.count() <= 5
    p.keyboard.press("ArrowDown")
    label = labels[1]
    p.keyboard.press("Enter")
    p.wait_for_function("location.hash.includes('v=tokens')")
    # the hash changes first, the heatmap is drawn and its cell focused on the next frame (late on a busy machine)
    p.wait_for_function("document.activeElement && document.activeElement.tagName === 'TD'")
    m = re.search(r"of (.+) \((?:EM|Neutral)\), position (\d+): ", label)
    e = next(ex["index"] for ex in run.examples if ex["id"] == m.group(1))
    pos = int(m.group(2))
    f = pg.focused()
    assert f["tag"] == "TD" and f["data"]["c"] == str(pos)
    assert pg.status().endswith(f"(position {pos}) of {m.group(1)} ({run.examples[e]['split']}): "
                                + pg.status().rsplit(": ", 1)[1])
    want = np.linalg.norm(run.activations(int(f["data"]["r"]), "resid_post")[e][pos].astype(np.float64))
    assert close(value_in(pg.status()), want)
    # the browser's Back button returns to the card
    p.go_back()
    p.wait_for_function("!location.hash.includes('v=tokens') || location.hash.includes('n=%d')" % n)
    assert pg.hash()["n"] == str(n)
    pg.check_clean()


@needs_browser
def test_neuron_index_search_and_sort(browser, demo_page, run, summary):
    pg = Page(browser, demo_page, "#L=1")
    p = pg.p
    rows = p.locator("#n-index tbody tr")
    ids = [int(i) for i in rows.evaluate_all("rs => rs.map(r => r.dataset.n)")]
    xa = run.activations(1, "mlp_act").numpy().astype(np.float64)
    assert ids == np.lexsort((np.arange(xa.shape[1]), -xa.max(0).astype(np.float32))).tolist()  # by max, descending
    p.locator("#n-index th button[data-sort=min]").click()
    ids = [int(i) for i in rows.evaluate_all("rs => rs.map(r => r.dataset.n)")]
    assert ids[:20] == np.lexsort((np.arange(xa.shape[1]), xa.min(0).astype(np.float32))).tolist()[:20]
    assert pg.hash()["o"] == "min"
    p.fill("#n-search", "12")
    ids = [int(i) for i in rows.evaluate_all("rs => rs.map(r => r.dataset.n)")]
    assert sorted(ids) == [i for i in range(xa.shape[1]) if str(i).startswith("12")]
    assert f"{len(ids)} match \"12\"" in p.text_content("#n-count")
    rows.first.focus()
    p.keyboard.press("ArrowDown")
    p.keyboard.press("Enter")
    assert p.text_content("#card-title") == f"Layer 1 \u00b7 neuron {ids[1]} (mlp_act)"
    assert p.locator("#n-index tbody tr[tabindex='0']").count() == 1
    pg.check_clean()


@needs_browser
def test_3d_view_rotates_and_sorts_by_token(browser, demo_page, run, summary):
    pg = Page(browser, demo_page)
    p = pg.p
    before = p.evaluate("document.getElementById('three').toDataURL()")
    p.focus("#three")
    p.keyboard.press("ArrowRight")
    assert p.evaluate("document.getElementById('three').toDataURL()") != before
    p.select_option("#three-order", "token")
    order = [int(i) for i in p.get_attribute("#three", "data-order").split(",")]
    d = summary["norms"]["token_docs"][0]
    o = summary["docs"]["offsets"]
    texts = [summary["texts"][t] for t in summary["docs"]["toks"][o[d]:o[d + 1]]]
    assert [texts[i] for i in order] == sorted(texts, key=lambda t: t.encode("utf-16-be"))  # JS string order
    assert pg.hash()["t"] == "token"
    pg.check_clean()


@needs_browser
def test_hostile_strings_render_as_text(browser, tmp_path, hostile_summary):
    page = tmp_path / "index.html"
    write_dashboard(pack(hostile_summary), page)
    pg = Page(browser, page)
    p = pg.p
    assert p.evaluate("window.__pwned") is None and p.locator("script").count() == 2
    assert p.locator("img, b, i").count() == 0
    assert HOSTILE in p.text_content("#meta") and HOSTILE in p.text_content("#heat-a")
    shown = []
    for i in range(p.locator("#heat-example option").count()):
        p.select_option("#heat-example", str(i))
        shown.append(p.text_content("#heatmap thead"))
    assert any(HOSTILE in t for t in shown) and any("<b>" in t for t in shown)  # token headers, as text
    assert p.locator("#n-card li.entry").count() > 0
    pg.check_clean()


@needs_browser
def test_last_position_page_and_budget_note(browser, tmp_path, model_factory):
    from layerscope.analysis.summaries import summarize
    from tests.test_summaries import small_run

    run_dir = small_run(tmp_path, model_factory, {0: {"sites": ["resid_post", "mlp_act"], "positions": "last"},
                                                  1: {"sites": ["resid_post", "mlp_act"], "positions": "last"}})
    page = tmp_path / "index.html"
    write_dashboard(pack(summarize(run_dir, top_k=3, context=2)), page, budget_mib=0.02)
    pg = Page(browser, page)
    p = pg.p
    assert "layer x example view" in p.text_content("#heat-missing") and p.is_visible("#heat-body")
    assert p.input_value("#heat-view") == "examples"
    run = layerscope.open(run_dir)
    p.locator('#heatmap td[data-r="1"][data-c="2"]').hover()
    cols = page_data(page.read_text(encoding="utf-8"))
    e = int(cols["examples"]["index"][cols["norms"]["columns"][2]])
    assert close(value_in(pg.status()), np.linalg.norm(run.activations(1, "resid_post")[e].astype(np.float64)))
    assert p.is_visible("#three-missing") and "capture.positions: all" in p.text_content("#three-missing")
    note = p.text_content("#budget-note")
    assert note.startswith("This page was cut to fit dashboard.budget_mib = 0.02 MiB") and "neuron cards" in note
    pg.check_clean()
