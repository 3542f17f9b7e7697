"""One self-contained HTML dashboard: inline CSS and JS, data embedded once as JSON, no network.

The summary dict (see summaries.summarize) holds ``title``, ``meta``, ``texts`` (distinct
token strings), ``docs`` ({id, split, toks, start}: tokens ``start``.. of an example), ``heatmap`` (residual-stream norms per doc x
layer x token) and ``neurons`` (top/bottom [doc, pos, value] per neuron per layer), each None
when the run lacks its inputs; ``notes`` ({"heatmap", "neurons"}: str or None) then says what is
missing and which config keys give it, and the page shows that instead of an empty panel. The page
builds every element with textContent, never innerHTML, so no string from a model or a data
set can become markup.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

from layerscope.fileio import atomic_write_text


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def embed_json(obj: Any) -> str:
    """JSON safe inside a <script> element: nothing in it can close the element or start a comment."""
    text = json.dumps(_clean(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for a, b in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(a, b)
    return text


CSS = """
:root{--fg:#1d1d1f;--muted:#666;--line:#ddd;--bg:#fff;--focus:#0a58ca}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:var(--fg);
background:var(--bg);margin:0 auto;padding:16px 24px;max-width:1400px}
h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:24px 0 8px}
table.meta{border-collapse:collapse;font-size:12px}table.meta td{padding:1px 10px 1px 0;vertical-align:top}
table.meta td:first-child{color:var(--muted)}
.controls{display:flex;gap:12px;align-items:center;flex-wrap:wrap;margin:8px 0}
select,input,button{font:inherit;padding:3px 6px}
:focus-visible{outline:3px solid var(--focus);outline-offset:1px}
#status{min-height:1.5em;padding:4px 8px;background:#f5f5f7;border-radius:4px;font-family:ui-monospace,monospace;
font-size:12px;white-space:pre-wrap}
.grid{overflow:auto;max-height:60vh;border:1px solid var(--line)}
.grid table{border-collapse:collapse;font-size:11px}
.grid th{position:sticky;top:0;background:#fafafa;font-weight:normal;padding:2px;white-space:pre;
max-width:6em;overflow:hidden;text-overflow:ellipsis}
.grid th.row{position:sticky;left:0;z-index:1}
.grid td{min-width:18px;height:18px;padding:0}
.tok{white-space:pre;font-family:ui-monospace,monospace;font-size:12px;padding:1px 1px;border-radius:2px}
.target{outline:2px solid #222;outline-offset:0}
.entries{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.entry{padding:4px 0;border-bottom:1px solid var(--line)}
.entry .info{color:var(--muted);font-size:11px}
.empty{color:var(--muted)}
.missing{padding:8px 12px;background:#fff8e1;border-left:4px solid #c99a00;border-radius:2px}
"""

JS = r"""
(function(){
const D = JSON.parse(document.getElementById('data').textContent);
const $ = id => document.getElementById(id);
const el = (tag, attrs, text) => { const e = document.createElement(tag);
  for (const k in (attrs||{})) e.setAttribute(k, attrs[k]); if (text !== undefined) e.textContent = text; return e; };
const status = $('status');
const say = s => { status.textContent = s; };
const show = t => t === '' ? '\u2205' : t.replace(/\n/g, '\u23ce').replace(/\t/g, '\u2192');
const fmt = v => v === null ? 'n/a' : String(v);
const tokText = i => D.texts[i];

// header
const meta = $('meta');
for (const k of Object.keys(D.meta||{})) { const tr = el('tr'); tr.append(el('td',{},k), el('td',{},fmt(D.meta[k]))); meta.append(tr); }

// A panel whose inputs were not captured says so, and which config keys produce them.
const notes = D.notes || {};
const missing = (name, text) => {
  $(name + '-body').hidden = true;
  const p = $(name + '-missing'); p.textContent = text; p.hidden = false;
};

// heatmap
const H = D.heatmap;
if (!H || !H.docs.length) {
  missing('heatmap', notes.heatmap || (H ? 'No token x layer heatmap: no examples to show; set dashboard.heatmap_examples above 0.'
    : 'No token x layer heatmap: capture resid_post (capture.sites) with capture.positions: all.'));
} else {
  const sel = $('example');
  H.docs.forEach((d, i) => sel.append(el('option', {value: i}, D.docs[d].id + ' (' + D.docs[d].split + ')')));
  const drawHeat = () => {
    const hi = +sel.value, doc = D.docs[H.docs[hi]], norms = H.norms[hi];
    let max = 0; for (const row of norms) for (const v of row) if (v !== null && v > max) max = v;
    const table = el('table', {role: 'grid', 'aria-label': 'residual stream L2 norm per layer and token'});
    const head = el('tr'); head.append(el('th', {class: 'row'}, 'layer'));
    doc.toks.forEach((t, p) => head.append(el('th', {title: 'position ' + p}, show(tokText(t)))));
    table.append(head);
    H.layers.forEach((L, li) => {
      const tr = el('tr'); tr.append(el('th', {class: 'row', scope: 'row'}, 'L' + L));
      norms[li].forEach((v, p) => {
        const a = v === null || max === 0 ? 0 : v / max;
        const msg = 'layer ' + L + ', token ' + JSON.stringify(tokText(doc.toks[p])) + ' (position ' + p + '): ' + fmt(v);
        const td = el('td', {tabindex: '0', title: msg, 'data-l': li, 'data-p': p, 'aria-label': msg});
        td.style.background = 'rgba(70,60,180,' + a.toFixed(3) + ')';
        td.addEventListener('focus', () => say(msg));
        td.addEventListener('mouseenter', () => say(msg));
        tr.append(td);
      });
      table.append(tr);
    });
    table.addEventListener('keydown', ev => {
      const c = ev.target; if (c.tagName !== 'TD') return;
      let l = +c.dataset.l, p = +c.dataset.p;
      if (ev.key === 'ArrowRight') p++; else if (ev.key === 'ArrowLeft') p--;
      else if (ev.key === 'ArrowDown') l++; else if (ev.key === 'ArrowUp') l--; else return;
      const n = table.querySelector('td[data-l="' + l + '"][data-p="' + p + '"]');
      if (n) { n.focus(); ev.preventDefault(); }
    });
    $('heatmap').replaceChildren(table);
  };
  sel.addEventListener('change', drawHeat); drawHeat();
}

// neurons
const N = D.neurons;
const layerSel = $('layer'), neuronSel = $('neuron');
if (!N || !Object.keys(N.layers).length) {
  missing('neuron', notes.neurons || 'No neuron lists: capture the site named by dashboard.site (add it to capture.sites).');
} else {
  $('site').textContent = N.site; $('site-of').hidden = false;
  Object.keys(N.layers).sort((a, b) => a - b).forEach(L => layerSel.append(el('option', {value: L}, 'Layer ' + L)));
  const fillNeurons = () => {
    neuronSel.replaceChildren();
    N.layers[layerSel.value].ids.forEach((n, i) => neuronSel.append(el('option', {value: i}, 'neuron ' + n)));
    drawNeuron();
  };
  const entry = (e, scale) => {
    const [d, pos, v] = e, doc = D.docs[d];
    const div = el('div', {class: 'entry'});
    const lo = Math.max(0, pos - N.context), hi = Math.min(doc.toks.length, pos + N.context + 1);
    const line = el('div');
    for (let p = lo; p < hi; p++) {
      const t = tokText(doc.toks[p]);
      const s = el('span', {class: 'tok'}, show(t));
      if (p === pos) {
        const a = v === null || scale === 0 ? 0 : Math.min(1, Math.abs(v) / scale);
        s.style.background = v >= 0 ? 'rgba(220,40,40,' + a.toFixed(3) + ')' : 'rgba(40,90,220,' + a.toFixed(3) + ')';
        s.classList.add('target');
        const msg = JSON.stringify(t) + ' in ' + doc.id + ' (' + doc.split + '), position ' + ((doc.start || 0) + pos) + ': ' + fmt(v);
        s.setAttribute('tabindex', '0'); s.setAttribute('title', msg); s.setAttribute('aria-label', msg);
        s.addEventListener('focus', () => say(msg)); s.addEventListener('mouseenter', () => say(msg));
      }
      line.append(s);
    }
    div.append(line, el('div', {class: 'info'}, doc.id + ' \u00b7 ' + doc.split + ' \u00b7 value ' + fmt(v)));
    return div;
  };
  const drawNeuron = () => {
    const Ld = N.layers[layerSel.value], i = +neuronSel.value;
    const top = Ld.top[i] || [], bottom = Ld.bottom[i] || [];
    let scale = 0; for (const e of top.concat(bottom)) if (e[2] !== null) scale = Math.max(scale, Math.abs(e[2]));
    for (const [id, list] of [['top', top], ['bottom', bottom]]) {
      const box = $(id); box.replaceChildren();
      if (!list.length) box.append(el('p', {class: 'empty'}, 'none'));
      list.forEach(e => box.append(entry(e, scale)));
    }
  };
  layerSel.addEventListener('change', fillNeurons);
  neuronSel.addEventListener('change', drawNeuron);
  const step = k => { const n = neuronSel.options.length; if (!n) return;
    neuronSel.selectedIndex = (neuronSel.selectedIndex + k + n) % n; drawNeuron(); };
  $('prev').addEventListener('click', () => step(-1));
  $('next').addEventListener('click', () => step(1));
  fillNeurons();
}
})();
"""


def render_html(summary: dict[str, Any]) -> str:
    """The dashboard page for ``summary`` as one string."""
    title = html.escape(str(summary.get("title", "LayerScope")))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title><style>{CSS}</style></head>
<body>
<h1>{title}</h1>
<table class="meta" id="meta" aria-label="run metadata"></table>
<div id="status" role="status" aria-live="polite">Hover or focus a cell or token to see its exact value.</div>
<section id="heatmap-panel" aria-labelledby="heatmap-title">
<h2 id="heatmap-title">Residual stream L2 norm, token x layer</h2>
<p id="heatmap-missing" class="missing" role="note" hidden></p>
<div id="heatmap-body">
<div class="controls"><label for="example">Example</label><select id="example"></select></div>
<div class="grid" id="heatmap"></div>
</div>
</section>
<section id="neuron-panel" aria-labelledby="neuron-title">
<h2 id="neuron-title">Neurons<span id="site-of" hidden> of <span id="site"></span></span>: top and bottom activating tokens</h2>
<p id="neuron-missing" class="missing" role="note" hidden></p>
<div id="neuron-body">
<div class="controls">
<label for="layer">Layer</label><select id="layer"></select>
<label for="neuron">Neuron</label><select id="neuron"></select>
<button type="button" id="prev" aria-label="previous neuron">&larr;</button>
<button type="button" id="next" aria-label="next neuron">&rarr;</button>
</div>
<div class="entries">
<div><h3>Top activations</h3><div id="top"></div></div>
<div><h3>Bottom activations</h3><div id="bottom"></div></div>
</div>
</div>
</section>
<script type="application/json" id="data">{embed_json(summary)}</script>
<script>{JS}</script>
</body></html>
"""


def write_dashboard(summary: dict[str, Any], path: str | os.PathLike) -> None:
    """Render and write the dashboard atomically (parent directories are created)."""
    atomic_write_text(Path(path), render_html(summary))
