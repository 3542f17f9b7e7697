"""Dashboard page size and interaction latency on a 32-layer, 2048-neuron run.

Builds the summary of an in-memory run (tests/synthetic.py: 32 layers of resid_post, attn_out,
mlp_out and 2048 mlp_act neurons, 64 examples of 32-64 tokens, two splits; every neuron in the
index, 64 cards per layer), renders the page, opens it in Chromium (Playwright, Debian's
chromium) and times each interaction from the event to the next painted frame, repeated.
Prints a table, then one JSON line. No network: the page is opened from disk.

    python benchmarks/dashboard.py [--layers 32] [--neurons 2048] [--repeats 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerscope.packed import pack  # noqa: E402
from layerscope.web.page import write_dashboard  # noqa: E402
from tests.synthetic import synthetic_summary  # noqa: E402

# (name, JS that starts the interaction): each runs after the page is loaded; the timer stops at
# the second animation frame after it, when the browser has laid out and painted the result.
INTERACTIONS = [
    ("heatmap: next example", "const s = $('heat-example'); s.selectedIndex = (s.selectedIndex + 1) % s.options.length;"
                              " s.dispatchEvent(new Event('change'));"),
    ("heatmap: site", "const s = $('heat-site'); s.selectedIndex = (s.selectedIndex + 1) % s.options.length;"
                      " s.dispatchEvent(new Event('change'));"),
    ("heatmap: scale log/global", "const s = $('heat-norm'); s.value = s.value === 'log' ? 'global' : 'log';"
                                  " s.dispatchEvent(new Event('change'));"),
    ("heatmap: arrow key", "const c = document.querySelector('#heatmap td[tabindex=\"0\"]'); c.focus();"
                           " c.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowRight', bubbles: true}));"),
    ("heatmap: cell -> neurons", "const c = document.querySelector('#heatmap td[tabindex=\"0\"]');"
                                 " c.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true}));"),
    ("3D: rotate", "$('three').dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowLeft', bubbles: true}));"),
    ("neurons: next layer", "const s = $('n-layer'); s.selectedIndex = (s.selectedIndex + 1) % s.options.length;"
                            " s.dispatchEvent(new Event('change'));"),
    ("neurons: sort by selectivity/max", "const s = $('n-sort'); s.value = s.value === 'sel' ? 'max' : 'sel';"
                                         " s.dispatchEvent(new Event('change'));"),
    ("neurons: search", "const s = $('n-search'); s.value = s.value ? '' : '1'; s.dispatchEvent(new Event('input'));"),
    ("neurons: open card", "const r = document.querySelector('#n-index tbody tr:nth-child(2)'); r.focus();"
                           " r.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true}));"),
]

TIMER = """async () => {
  const $ = id => document.getElementById(id);
  const frame = () => new Promise(r => requestAnimationFrame(() => r()));
  await frame();
  const t0 = performance.now();
  %s
  await frame(); await frame();
  return performance.now() - t0;
}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--neurons", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--out", type=Path, default=None, help="keep the page here (default: a temporary directory)")
    a = ap.parse_args()

    t = time.perf_counter()
    summary = synthetic_summary(layers=a.layers, neurons=a.neurons)
    t_summary = time.perf_counter() - t
    out = a.out or Path(tempfile.mkdtemp(prefix="layerscope-dash-"))
    page = out / "index.html"
    t = time.perf_counter()
    size = write_dashboard(pack(summary), page)
    t_render = time.perf_counter() - t

    from playwright.sync_api import sync_playwright

    rows: dict[str, list[float]] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=a.chromium)
        errors, requests = [], []
        for _ in range(a.repeats):
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.on("request", lambda r: requests.append(r.url))
            t = time.perf_counter()
            pg.goto(page.as_uri())
            pg.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
            rows.setdefault("page load (parse, decode, first render)", []).append((time.perf_counter() - t) * 1000)
            for name, js in INTERACTIONS:
                rows.setdefault(name, []).append(pg.evaluate(TIMER % js))
            pg.close()
        browser.close()

    print(f"run: {a.layers} layers x {a.neurons} mlp_act neurons (all indexed, 64 cards per layer), "
          f"3 norm sites; summary {t_summary:.1f} s, page written in {t_render:.2f} s")
    print(f"page size: {size} bytes ({size / 2**20:.2f} MiB); console errors: {len(errors)}; "
          f"requests other than the page: {len([r for r in requests if r != page.as_uri()])}")
    print(f"{'interaction':40s} {'median ms':>10s} {'max ms':>8s}")
    for name, v in rows.items():
        print(f"{name:40s} {statistics.median(v):10.1f} {max(v):8.1f}")
    print(json.dumps({"layers": a.layers, "neurons": a.neurons, "page_bytes": size, "summary_s": round(t_summary, 2),
                      "render_s": round(t_render, 3), "errors": len(errors),
                      "median_ms": {k: round(statistics.median(v), 1) for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
