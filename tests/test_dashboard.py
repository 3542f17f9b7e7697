"""The dashboard: one self-contained file, every model or data string escaped, values on hover and focus."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from layerscope.web.dashboard import render_html, write_dashboard

HOSTILE = "</script><script>alert(1)</script>"


def summary(heatmap=True, neurons=True) -> dict:
    texts = ["Hello", " world", HOSTILE, "<b>", "&amp;", "\n", "🙂", ""]
    docs = [{"id": "doc<1>", "split": "EM&", "toks": [0, 1, 2, 3, 4]},
            {"id": HOSTILE, "split": "Neutral", "toks": [5, 6, 7, 0]},
            {"id": "window", "split": "EM&", "start": 40, "toks": [6, 0, 1]}]
    s = {"title": f"run {HOSTILE}", "meta": {"model": "<b>m</b>", "examples": 2, "revision": None},
         "texts": texts, "docs": docs, "heatmap": None, "neurons": None}
    if heatmap:
        s["heatmap"] = {"site": "resid_post", "layers": [0, 3], "docs": [0, 1],
                        "norms": [[[1.0, 2.0, 3.0, 4.0, 5.0], [1.5, 2.5, float("nan"), 4.5, 5.5]],
                                  [[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, float("inf")]]]}
    if neurons:
        s["neurons"] = {"site": "mlp_act", "k": 2, "context": 2, "layers": {
            "3": {"ids": [5, 9], "top": [[[0, 2, 1.25], [1, 1, 0.5]], [[1, 3, 0.75]]],
                  "bottom": [[[0, 4, -2.5], [1, 0, -0.125]], [[0, 0, -0.01]]]},
            "0": {"ids": [1], "top": [[[2, 1, 3.0]]], "bottom": [[[0, 1, -3.0]]]}}}
    return s


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.data_scripts, self.labels, self.ids, self.live = [], [], {}, set(), 0
        self._in_data = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        self.ids.add(a.get("id"))
        if tag == "label":
            self.labels[a.get("for")] = True
        if a.get("aria-live"):
            self.live += 1
        self._in_data = tag == "script" and a.get("type") == "application/json"

    def handle_data(self, data):
        if self._in_data:
            self.data_scripts.append(data)

    def handle_endtag(self, tag):
        self._in_data = False


def test_data_round_trips_and_nothing_escapes():
    s = summary()
    out = render_html(s)
    p = Collect()
    p.feed(out)
    assert len(p.data_scripts) == 1
    data = json.loads(p.data_scripts[0])
    assert data["texts"] == s["texts"] and data["docs"] == s["docs"]
    assert data["heatmap"]["norms"][0][1][2] is None and data["heatmap"]["norms"][1][1][3] is None  # NaN, inf
    assert HOSTILE not in out and "<b>" not in out and "alert(1)</script>" not in out
    assert "<b>m</b>" not in out
    assert [t for t, _ in p.tags].count("script") == 2  # the data and the code, nothing injected
    assert out.count("</script>") == 2


def test_self_contained_no_network():
    out = render_html(summary())
    for bad in ("http://", "https://", "//cdn", "<link", "fetch(", "XMLHttpRequest", "import(", "src=", "@import",
                "url("):
        assert bad not in out, bad
    assert "default-src 'none'" in out  # the page forbids itself any request


def test_labelled_controls_and_live_region():
    p = Collect()
    p.feed(render_html(summary()))
    for control in ("layer", "neuron", "example"):
        assert control in p.ids and p.labels.get(control), control
    assert p.live == 1


@pytest.mark.parametrize("heatmap,neurons", [(False, True), (True, False), (False, False)])
def test_missing_panels_still_render(heatmap, neurons):
    p = Collect()
    p.feed(render_html(summary(heatmap, neurons)))
    data = json.loads(p.data_scripts[0])
    assert (data["heatmap"] is None) != heatmap and (data["neurons"] is None) != neurons


def test_write_is_atomic(tmp_path):
    target = tmp_path / "a" / "b" / "index.html"
    write_dashboard(summary(), target)
    assert target.read_text(encoding="utf-8") == render_html(summary())
    assert [p.name for p in target.parent.iterdir()] == ["index.html"]


def _jsdom() -> Path | None:
    """A jsdom install, if node and one are present (.ci/run installs it under .ci/node)."""
    if not shutil.which("node"):
        return None
    for base in (Path(__file__).resolve().parents[1] / ".ci" / "node", Path(os.environ.get("JSDOM_PREFIX", "/nonexistent"))):
        if (base / "node_modules" / "jsdom").is_dir():
            return base / "node_modules"
    return None


@pytest.mark.skipif(_jsdom() is None, reason="needs node and jsdom (.ci/run installs them)")
def test_page_behaviour_in_a_dom(tmp_path):
    page = tmp_path / "index.html"
    write_dashboard(summary(), page)
    probe = Path(__file__).parent / "js" / "dashboard_probe.js"
    res = subprocess.run(["node", str(probe), str(page)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NODE_PATH": str(_jsdom())}, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["errors"] == [] and out["scripts_run"]
    assert out["script_tags"] == 2  # hostile strings stayed text
    assert HOSTILE in out["body_text"] and "<b>" in out["body_text"]
    # heatmap: exact value on hover (title) and on keyboard focus (status line); arrows move focus
    assert out["heat_cells"] == 5 * 2
    assert out["heat_focus"] == 'layer 0, token "Hello" (position 0): 1' == out["heat_title"]
    assert out["after_arrow"] == "1"
    assert out["header_tokens"][:8] == ["layer", "Hello", " world", HOSTILE, "<b>", "&amp;", "L0", "L3"]
    # neurons: layers sorted, positive red, negative blue, exact value on focus
    assert out["layers"] == ["Layer 0", "Layer 3"]
    # a window of an example reports the position in the whole example
    assert out["top_focus"] == '"Hello" in window (EM&), position 41: 3' and out["top_tabindex"] == "0"
    assert out["top_bg"].startswith("rgb(220, 40, 40)") and out["bottom_bg"].startswith("rgb(40, 90, 220)")
    assert out["neurons"] == 1
    assert out["heatmap_missing"] is None and out["neuron_missing"] is None  # nothing missing, no notice
    assert not out["heatmap_body_hidden"] and not out["neuron_body_hidden"] and not out["site_of_hidden"]
    assert out["neuron_title"] == "Neurons of mlp_act: top and bottom activating tokens"


def probe_page(tmp_path, s: dict) -> dict:
    page = tmp_path / "index.html"
    write_dashboard(s, page)
    probe = Path(__file__).parent / "js" / "dashboard_probe.js"
    res = subprocess.run(["node", str(probe), str(page)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NODE_PATH": str(_jsdom())}, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["errors"] == [] and out["scripts_run"] and out["script_tags"] == 2
    return out


@pytest.mark.skipif(_jsdom() is None, reason="needs node and jsdom (.ci/run installs them)")
def test_page_says_what_is_missing(tmp_path):
    # the reasons summarize gives, shown as text (never markup), in place of the empty panels
    s = summary(heatmap=False, neurons=False)
    s["notes"] = {"heatmap": "No token x layer heatmap: resid_post was captured at the last position only; "
                             "capture it with capture.positions: all " + HOSTILE,
                  "neurons": "No neuron lists: mlp_act (dashboard.site) was not captured <b>"}
    out = probe_page(tmp_path, s)
    assert out["heatmap_missing"] == s["notes"]["heatmap"] and out["neuron_missing"] == s["notes"]["neurons"]
    assert out["heatmap_missing_children"] == 0 and out["neuron_missing_children"] == 0
    assert out["heatmap_body_hidden"] and out["neuron_body_hidden"] and out["site_of_hidden"]
    assert "heat_cells" not in out  # no cell drawn
    assert out["neurons"] == 0  # and the heading names no site (site-of is hidden)
    # a summary without notes (an older summary.json) still names the config keys
    out = probe_page(tmp_path, summary(heatmap=False, neurons=False))
    assert "resid_post" in out["heatmap_missing"] and "capture.positions: all" in out["heatmap_missing"]
    assert "dashboard.site" in out["neuron_missing"] and "capture.sites" in out["neuron_missing"]
    # one panel missing leaves the other alone
    out = probe_page(tmp_path, summary(heatmap=True, neurons=False))
    assert out["heatmap_missing"] is None and not out["heatmap_body_hidden"] and out["heat_cells"] == 10
    assert out["neuron_missing"].startswith("No neuron lists")


def test_nan_free_json():
    out = render_html({"title": "t", "meta": {"x": math.nan}, "texts": [], "docs": [], "heatmap": None,
                       "neurons": None})
    assert "NaN" not in out and "Infinity" not in out
