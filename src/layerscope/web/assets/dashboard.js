// LayerScope dashboard. Reads its data from the #data element only, writes strings into the page
// only through textContent and setAttribute (never markup), and makes no request: everything it
// draws comes from this file. The one exception: served by `layerscope serve`, it reads and saves
// interpretations.json at its own origin (interpretations.js). Assets named in /*@include*/ lines
// are inlined there by layerscope.web.page, in this one scope.
(function () {
'use strict';

// ---- data: JSON with {"__array__": dtype, "shape", "b64"} objects decoded into typed arrays ----
const TYPED = {float32: Float32Array, float64: Float64Array, int8: Int8Array, uint8: Uint8Array,
  int16: Int16Array, uint16: Uint16Array, int32: Int32Array, uint32: Uint32Array};
const decode = o => {
  if (Array.isArray(o)) return o.map(decode);
  if (o === null || typeof o !== 'object') return o;
  if (o.__array__) {
    const bin = atob(o.b64), bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const a = new TYPED[o.__array__](bytes.buffer);
    a.shape = o.shape;
    return a;
  }
  const out = {};
  for (const k of Object.keys(o)) out[k] = decode(o[k]);
  return out;
};
const D = decode(JSON.parse(document.getElementById('data').textContent));
const row = (a, i) => a.subarray(i * a.shape[1], (i + 1) * a.shape[1]);  // row i of a 2-D typed array

// ---- small helpers ----
const $ = id => document.getElementById(id);
const el = (tag, attrs, text) => {
  const e = document.createElement(tag);
  for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
};
const say = s => { $('status').textContent = s; };
const fmt = v => (v === null || v === undefined || Number.isNaN(v)) ? 'n/a' : String(Number(Number(v).toPrecision(4)));
// Token text as it is, whitespace made visible (spaces stay: .tok is white-space:pre).
const show = t => t === undefined ? '?' : t === '' ? '\u2205'
  : t.replace(/\r/g, '\u240d').replace(/\n/g, '\u23ce').replace(/\t/g, '\u2192');
const splits = D.splits || [];
const EX = D.examples || {index: [], id: [], split: [], n_tokens: []};
const DOCS = D.docs || {example: [], start: [], offsets: [0], toks: []};
const exLabel = r => EX.id[r] + ' (' + splits[EX.split[r]] + ')';
const docToks = d => DOCS.toks.subarray(DOCS.offsets[d], DOCS.offsets[d + 1]);
const notes = D.notes || {};

// ---- state in the URL hash: every view can be linked to and restored ----
const S = {s: '', v: '', x: 0, a: 0, b: 1, d: 0, m: 'global', c: '0.0', L: '', n: -1, q: '', o: 'max', t: 'position',
  l: '', r: 0};  // l, r: the LoRA view's layer and neuron
const readHash = () => {
  const p = new URLSearchParams(location.hash.slice(1));
  for (const k of Object.keys(S)) if (p.has(k)) S[k] = typeof S[k] === 'number' ? Number(p.get(k)) : p.get(k);
};
const hashOf = patch => {
  const p = new URLSearchParams();
  const st = Object.assign({}, S, patch || {});
  for (const k of Object.keys(st)) p.set(k, String(st[k]));
  return '#' + p.toString();
};
const saveHash = () => { history.replaceState(null, '', hashOf()); };

// ---- colour scales ----
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
const DIVERGING = [[33, 102, 172], [247, 247, 247], [178, 24, 43]];
const ramp = (stops, t) => {
  t = Math.min(1, Math.max(0, t)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(t)), f = t - i, a = stops[i], b = stops[i + 1];
  return 'rgb(' + [0, 1, 2].map(k => Math.round(a[k] + (b[k] - a[k]) * f)).join(',') + ')';
};
const gradient = stops => 'linear-gradient(90deg,' + stops.map(s => 'rgb(' + s.join(',') + ')').join(',') + ')';

// header
for (const k of Object.keys(D.meta || {})) {
  const tr = el('tr');
  tr.append(el('th', {scope: 'row'}, k), el('td', {}, D.meta[k] === null ? 'n/a' : String(D.meta[k])));
  $('meta').append(tr);
}
const page = D.page || {};
if ((page.cut && page.cut.length) || page.over) {
  const parts = (page.cut || []).map(c => c.what + ' ' + c.before + ' \u2192 ' + c.after);
  $('budget-note').textContent = 'This page was cut to fit dashboard.budget_mib = ' + page.budget_mib + ' MiB (page: '
    + (page.size / 1048576).toFixed(2) + ' MiB)' + (parts.length ? ': ' + parts.join('; ') + '.' : '.')
    + (page.over ? ' It is still over the budget: raise dashboard.budget_mib or lower dashboard.neurons_per_layer.' : '')
    + ' Raise dashboard.budget_mib to keep more.';
  $('budget-note').hidden = false;
}

// ---- roving tabindex: one tab stop per widget, arrow keys inside it ----
// items(): the focusable elements in order; cols: items per row (1 for a list).
const roving = (container, items, cols, onMove) => {
  const all = items();
  all.forEach((e, i) => e.setAttribute('tabindex', i === 0 ? '0' : '-1'));
  container.addEventListener('keydown', ev => {
    const list = items(), i = list.indexOf(ev.target);
    if (i < 0) return;
    const w = cols(), n = list.length;
    let j = i;
    switch (ev.key) {
      case 'ArrowRight': j = w > 1 && (i % w) < w - 1 ? i + 1 : i; break;
      case 'ArrowLeft': j = w > 1 && (i % w) > 0 ? i - 1 : i; break;
      case 'ArrowDown': j = i + w < n ? i + w : i; break;
      case 'ArrowUp': j = i - w >= 0 ? i - w : i; break;
      case 'Home': j = w > 1 ? i - (i % w) : 0; break;
      case 'End': j = w > 1 ? Math.min(n - 1, i - (i % w) + w - 1) : n - 1; break;
      case 'PageDown': j = Math.min(n - 1, i + 10 * w); break;
      case 'PageUp': j = Math.max(0, i - 10 * w); break;
      default: return;
    }
    ev.preventDefault();
    if (j !== i) { focusItem(list, j); if (onMove) onMove(list[j]); }
  });
  container.addEventListener('focusin', ev => {
    const list = items();
    if (list.indexOf(ev.target) >= 0) list.forEach(e => e.setAttribute('tabindex', e === ev.target ? '0' : '-1'));
  });
};
const focusItem = (list, j) => {
  list.forEach((e, k) => e.setAttribute('tabindex', k === j ? '0' : '-1'));
  list[j].focus();
};

// ================= heatmaps =================
const NS = (D.norms && D.norms.sites) || {};
const sites = Object.keys(NS);
const heat = {matrix: null};
const VIEWS = {tokens: 'token x layer, one example', posmean: 'token position x layer, split mean',
  examples: 'layer x example (last token)', splits: 'layer x split mean (last token)'};
// a difference site (SITE:adapter-base, two variants of the run) names itself by its label
const siteLabel = s => (NS[s] && NS[s].label) || s;
const tokenDocs = (D.norms && D.norms.token_docs) || [];
const columns = (D.norms && D.norms.columns) || [];

const viewsOf = site => {
  const v = NS[site], out = [];
  if (v.token_layers && tokenDocs.length) out.push('tokens');
  if (v.token_layers) out.push('posmean');
  out.push('examples', 'splits');
  return out;
};

// The matrix a view shows: rows (layers), columns, values, and what a cell says and links to.
const buildMatrix = () => {
  const v = NS[S.s], A = splits[S.a], B = splits[S.b], diff = !!S.d && splits.length > 1;
  const m = {rows: [], cols: [], colTitles: [], vals: [], diverging: false, unit: v.unit || 'L2 norm of ' + S.s,
    cell: null, caption: ''};
  if (S.v === 'tokens') {
    const d = tokenDocs[S.x], toks = docToks(d), T = v.tokens[S.x], r = DOCS.example[d];
    m.rows = v.token_layers.map(L => 'L' + L);
    m.cols = Array.from(toks, t => show(D.texts[t]));
    m.colTitles = Array.from(toks, (t, p) => 'position ' + p + ': ' + show(D.texts[t]));
    m.vals = v.token_layers.map((L, j) => Array.from(row(T, j)));
    m.cell = (j, p) => siteLabel(S.s) + ', layer ' + v.token_layers[j] + ", token '" + show(D.texts[toks[p]]) + "' (position " + p
      + ') of ' + exLabel(r);
    m.caption = 'Example ' + exLabel(r) + ': ' + toks.length + ' tokens. Enter on a cell lists the neurons most active there.';
    m.layers = v.token_layers;
  } else if (S.v === 'posmean') {
    const P = v.split_pos[A].shape[1], cA = v.pos_count[A], cB = v.pos_count[B];
    const cols = [];
    for (let p = 0; p < P; p++) if (cA[p] > 0 && (!diff || cB[p] > 0)) cols.push(p);
    m.rows = v.token_layers.map(L => 'L' + L);
    m.cols = cols.map(p => String(p));
    m.colTitles = cols.map(p => 'position ' + p + ': ' + cA[p] + ' examples of ' + A + (diff ? ', ' + cB[p] + ' of ' + B : ''));
    m.vals = v.token_layers.map((L, j) => cols.map(p => diff ? row(v.split_pos[A], j)[p] - row(v.split_pos[B], j)[p]
      : row(v.split_pos[A], j)[p]));
    m.cell = (j, c) => siteLabel(S.s) + ', layer ' + v.token_layers[j] + ', position ' + cols[c] + ', mean over ' + (diff ? A + ' \u2212 ' + B : A);
    m.caption = 'Mean L2 norm at each token position over the examples of ' + (diff ? A + ' minus ' + B : A)
      + ' that are that long.';
    m.layers = v.token_layers;
  } else if (S.v === 'examples') {
    m.rows = v.layers.map(L => 'L' + L);
    m.cols = Array.from(columns, r => EX.id[r]);
    m.colTitles = Array.from(columns, r => exLabel(r));
    m.vals = v.layers.map((L, j) => Array.from(row(v.last, j)));
    m.cell = (j, c) => siteLabel(S.s) + ', layer ' + v.layers[j] + ', last token of ' + exLabel(columns[c]);
    m.caption = columns.length + ' of ' + (D.meta && D.meta.examples) + ' examples (round-robin over splits). '
      + 'Enter on a cell opens the example as token x layer when the page has it.';
    m.layers = v.layers;
  } else {
    m.rows = v.layers.map(L => 'L' + L);
    m.cols = diff ? [A + ' \u2212 ' + B] : splits.slice();
    m.colTitles = m.cols.map((c, i) => diff ? c : c + ' (' + D.split_sizes[i] + ' examples)');
    m.vals = v.layers.map((L, j) => diff ? [v.split_last[A][j] - v.split_last[B][j]] : splits.map(s => v.split_last[s][j]));
    m.cell = (j, c) => siteLabel(S.s) + ', layer ' + v.layers[j] + ', mean at the last token over ' + m.cols[c];
    m.caption = 'Mean over every example of each split of the L2 norm at its last token.';
    m.layers = v.layers;
  }
  if (diff && (S.v === 'posmean' || S.v === 'splits')) { m.diverging = true; m.unit = 'difference of ' + (v.unit || 'L2 norm of ' + S.s) + ' (' + A + ' \u2212 ' + B + ')'; }
  return m;
};

// Colour position t in [0, 1] of every value, and the colour bar's ends and ticks.
const scaleOf = m => {
  const finite = v => v !== null && Number.isFinite(v);
  let lo = Infinity, hi = -Infinity, pos = Infinity;
  for (const r of m.vals) for (const v of r) if (finite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); if (v > 0) pos = Math.min(pos, v); }
  if (!(hi >= lo)) { lo = 0; hi = 1; }
  if (m.diverging) {
    const a = Math.max(Math.abs(lo), Math.abs(hi)) || 1;
    if (S.m === 'layer') return {t: (v, j) => { const r = Math.max(...m.vals[j].filter(finite).map(Math.abs)) || 1; return 0.5 + v / r / 2; },
      lo: -1, hi: 1, unit: m.unit + ', per layer: fraction of the row\u2019s largest |difference|', ticks: [-1, 0, 1]};
    return {t: v => 0.5 + v / a / 2, lo: -a, hi: a, unit: m.unit, ticks: [-a, 0, a]};
  }
  if (S.m === 'log') {
    const l0 = Math.log10(pos === Infinity ? 1 : pos), l1 = Math.log10(hi > 0 ? hi : 1), span = (l1 - l0) || 1;
    return {t: v => v > 0 ? (Math.log10(v) - l0) / span : 0, lo: Math.pow(10, l0), hi: Math.pow(10, l1),
      unit: m.unit + ' (log scale)', ticks: [0, 0.25, 0.5, 0.75, 1].map(f => Math.pow(10, l0 + f * span)), log: true};
  }
  if (S.m === 'layer') {
    const mx = m.vals.map(r => Math.max(0, ...r.filter(finite)) || 1);
    return {t: (v, j) => v / mx[j], lo: 0, hi: 1, unit: m.unit + ', per layer: fraction of the row\u2019s maximum',
      ticks: [0, 0.25, 0.5, 0.75, 1]};
  }
  const top = hi > 0 ? hi : 1;
  return {t: v => v / top, lo: 0, hi: top, unit: m.unit, ticks: [0, 0.25, 0.5, 0.75, 1].map(f => f * top)};
};

const drawColorbar = (sc, m) => {
  $('cb-ramp').style.background = gradient(m.diverging ? DIVERGING : VIRIDIS);
  $('cb-lo').textContent = fmt(sc.lo); $('cb-hi').textContent = fmt(sc.hi); $('cb-unit').textContent = sc.unit;
  $('colorbar').setAttribute('aria-label', 'colour bar: ' + fmt(sc.lo) + ' to ' + fmt(sc.hi) + ', ' + sc.unit);
  const ticks = $('cb-ticks');
  ticks.replaceChildren();
  const span = sc.log ? Math.log10(sc.hi / sc.lo) || 1 : (sc.hi - sc.lo) || 1;
  for (const v of sc.ticks) {
    const f = sc.log ? Math.log10(v / sc.lo) / span : (v - sc.lo) / span;
    const s = el('span', {}, fmt(v)); s.style.left = (f * 100).toFixed(1) + '%'; ticks.append(s);
  }
  ticks.style.marginLeft = ($('cb-ramp').offsetLeft - $('colorbar').offsetLeft) + 'px';
};

const cellMsg = (m, j, c) => { const v = m.vals[j][c]; return m.cell(j, c) + ': ' + fmt(v); };

const drawHeat = () => {
  const m = heat.matrix = buildMatrix(), sc = scaleOf(m);
  drawColorbar(sc, m);
  $('heat-caption').textContent = m.caption;
  const table = el('table', {role: 'grid', 'aria-label': VIEWS[S.v] + ': ' + m.unit, 'aria-rowcount': String(m.rows.length + 1)});
  const thead = el('thead'), head = el('tr'), tbody = el('tbody');
  head.append(el('th', {class: 'row', scope: 'col'}, 'layer'));
  m.cols.forEach((c, i) => head.append(el('th', {scope: 'col', title: m.colTitles[i]}, c)));
  thead.append(head);
  const stops = m.diverging ? DIVERGING : VIRIDIS;
  m.rows.forEach((r, j) => {
    const tr = el('tr');
    tr.append(el('th', {class: 'row', scope: 'row'}, r));
    m.vals[j].forEach((v, c) => {
      const td = el('td', {role: 'gridcell', 'data-r': String(j), 'data-c': String(c), tabindex: '-1'});
      if (v === null || !Number.isFinite(v)) td.className = 'na';
      else td.style.background = ramp(stops, sc.t(v, j));
      tr.append(td);
    });
    tbody.append(tr);
  });
  table.append(thead, tbody);
  $('heatmap').replaceChildren(table);
  const [r0, c0] = S.c.split('.').map(Number);
  const start = table.querySelector('td[data-r="' + r0 + '"][data-c="' + c0 + '"]') || table.querySelector('td');
  if (start) start.setAttribute('tabindex', '0');
  $('cell-links').hidden = true;
};

const heatCells = () => Array.from($('heatmap').querySelectorAll('td'));
const onCell = td => {
  if (!td || td.tagName !== 'TD' || !heat.matrix) return;
  const j = +td.dataset.r, c = +td.dataset.c;
  say(cellMsg(heat.matrix, j, c));
  S.c = j + '.' + c; saveHash();
};

// Enter on a cell: the neurons most active at that token, or the example's token view.
const openCell = td => {
  const j = +td.dataset.r, c = +td.dataset.c, m = heat.matrix;
  if (S.v === 'tokens') {
    const N = D.neurons, L = String(m.layers[j]), tt = N && N.token_top && N.token_top[L];
    const box = $('cell-links'), ul = $('cell-neurons');
    ul.replaceChildren();
    box.hidden = false;
    if (!tt) {
      $('cell-links-title').textContent = N ? 'No neuron list for layer ' + L + ' (its ' + N.site
        + ' was not captured at every position, or the page budget dropped these links).' : 'No neuron index in this run.';
      return;
    }
    let rowBase = 0;
    for (let i = 0; i < S.x; i++) rowBase += docToks(tokenDocs[i]).length;
    const ids = row(tt.ids, rowBase + c), vals = row(tt.values, rowBase + c);
    $('cell-links-title').textContent = 'Neurons of ' + N.site + ' most active at this token, layer ' + L + ':';
    ids.forEach((n, i) => {
      const a = el('a', {href: hashOf({L: L, n: n}), 'data-n': String(n)}, 'neuron ' + n + ' (' + fmt(vals[i]) + ')');
      const li = el('li');
      li.append(a);
      ul.append(li);
    });
    ul.querySelector('a').focus();
  } else if (S.v === 'examples') {
    const r = columns[c], i = tokenDocs.findIndex(d => DOCS.example[d] === r);
    if (i >= 0) { location.hash = hashOf({v: 'tokens', x: i, c: j + '.' + (EX.n_tokens[r] - 1)}); }
    else say(exLabel(r) + ' is not among the token x layer examples of this page (dashboard.heatmap_examples).');
  }
};

const setupHeat = () => {
  if (!sites.length) {
    $('heat-body').hidden = true;
    $('heat-missing').textContent = notes.heatmap || 'No heatmaps: capture resid_post, attn_out or mlp_out.';
    $('heat-missing').hidden = false;
    return false;
  }
  if (notes.heatmap) { $('heat-missing').textContent = notes.heatmap; $('heat-missing').hidden = false; }
  sites.forEach(s => $('heat-site').append(el('option', {value: s}, siteLabel(s))));
  tokenDocs.forEach((d, i) => $('heat-example').append(el('option', {value: String(i)}, exLabel(DOCS.example[d]))));
  splits.forEach((s, i) => { $('heat-a').append(el('option', {value: String(i)}, s)); $('heat-b').append(el('option', {value: String(i)}, s)); });
  const grid = $('heatmap');
  roving(grid, heatCells, () => heat.matrix ? heat.matrix.cols.length : 1, onCell);
  grid.addEventListener('focusin', ev => onCell(ev.target));
  grid.addEventListener('mouseover', ev => { if (ev.target.tagName === 'TD') say(cellMsg(heat.matrix, +ev.target.dataset.r, +ev.target.dataset.c)); });
  grid.addEventListener('keydown', ev => { if (ev.key === 'Enter' && ev.target.tagName === 'TD') { ev.preventDefault(); openCell(ev.target); } });
  grid.addEventListener('click', ev => { if (ev.target.tagName === 'TD') { ev.target.focus(); openCell(ev.target); } });
  roving($('cell-neurons'), () => Array.from($('cell-neurons').querySelectorAll('a')), () => 1);
  const change = (id, key, num) => $(id).addEventListener('change', () => {
    S[key] = $(id).type === 'checkbox' ? ($(id).checked ? 1 : 0) : num ? Number($(id).value) : $(id).value;
    if (key !== 'm' && key !== 'd') S.c = '0.0';
    renderHeat();
  });
  change('heat-site', 's'); change('heat-view', 'v'); change('heat-example', 'x', true); change('heat-a', 'a', true);
  change('heat-b', 'b', true); change('heat-diff', 'd'); change('heat-norm', 'm');
  return true;
};

const syncHeatControls = () => {
  if (!NS[S.s]) S.s = sites[0];
  const views = viewsOf(S.s);
  if (!views.includes(S.v)) S.v = views[0];
  $('heat-view').replaceChildren(...views.map(v => el('option', {value: v}, VIEWS[v])));
  if (!(S.x >= 0 && S.x < tokenDocs.length)) S.x = 0;
  if (!(S.a >= 0 && S.a < splits.length)) S.a = 0;
  if (!(S.b >= 0 && S.b < splits.length)) S.b = Math.min(1, splits.length - 1);
  $('heat-site').value = S.s; $('heat-view').value = S.v; $('heat-example').value = String(S.x);
  $('heat-a').value = String(S.a); $('heat-b').value = String(S.b); $('heat-diff').checked = !!S.d; $('heat-norm').value = S.m;
  $('heat-example-box').hidden = S.v !== 'tokens';
  $('heat-split-box').hidden = !(S.v === 'posmean' || S.v === 'splits');
  $('heat-diff').disabled = splits.length < 2;
};

// ================= 3D view (seed 003): bars of height = norm over a token x layer floor =================
const three = {yaw: -0.6, pitch: 0.55, drag: null};
const drawThree = () => {
  const v = NS[S.s], cv = $('three');
  const ok = v && v.token_layers && tokenDocs.length;
  $('three-body').hidden = !ok; $('three-missing').hidden = !!ok;
  if (!ok) { $('three-missing').textContent = 'The 3D view needs a site captured at every position (capture.positions: all) and dashboard.heatmap_examples above 0.'; return; }
  const d = tokenDocs[S.x], toks = docToks(d), T = v.tokens[S.x], nL = v.token_layers.length, nT = toks.length;
  let order = Array.from(toks, (t, p) => p);
  const meanOf = p => { let s = 0; for (let j = 0; j < nL; j++) s += row(T, j)[p] || 0; return s / nL; };
  if (S.t === 'token') order.sort((a, b) => D.texts[toks[a]] < D.texts[toks[b]] ? -1 : D.texts[toks[a]] > D.texts[toks[b]] ? 1 : a - b);
  else if (S.t === 'norm') order.sort((a, b) => meanOf(b) - meanOf(a) || a - b);
  let mx = 0;
  for (let j = 0; j < nL; j++) for (const x of row(T, j)) if (Number.isFinite(x)) mx = Math.max(mx, x);
  const ctx = cv.getContext('2d'), W = cv.width, H = cv.height;
  ctx.clearRect(0, 0, W, H);
  const cy = Math.cos(three.yaw), sy = Math.sin(three.yaw), cp = Math.cos(three.pitch), sp = Math.sin(three.pitch);
  const size = Math.max(nT, nL), unit = Math.min(W, H) * 0.9 / size;
  // world: x = token column, z = layer, y = height; rotate about y (yaw), then x (pitch)
  const proj = (x, y, z) => {
    const X = x * cy - z * sy, Z = x * sy + z * cy;
    const Y = y * cp - Z * sp, Z2 = y * sp + Z * cp;
    return [W / 2 + X * unit, H * 0.62 - Y * unit, Z2];
  };
  const hScale = size * 0.45;
  const bars = [];
  order.forEach((p, i) => {
    for (let j = 0; j < nL; j++) {
      const val = row(T, j)[p];
      if (!Number.isFinite(val)) continue;
      const x = i - nT / 2, z = j - nL / 2, h = mx > 0 ? val / mx * hScale : 0;
      bars.push({b: proj(x, 0, z), t: proj(x, h, z), depth: proj(x, 0, z)[2], c: ramp(VIRIDIS, mx > 0 ? val / mx : 0)});
    }
  });
  bars.sort((a, b) => b.depth - a.depth);  // painter's order: far bars first
  ctx.lineCap = 'round';
  ctx.lineWidth = Math.max(2, unit * 0.55);
  for (const bar of bars) { ctx.strokeStyle = bar.c; ctx.beginPath(); ctx.moveTo(bar.b[0], bar.b[1]); ctx.lineTo(bar.t[0], bar.t[1]); ctx.stroke(); }
  // axes and labels
  ctx.strokeStyle = '#888'; ctx.lineWidth = 1; ctx.fillStyle = '#333'; ctx.font = '11px sans-serif';
  const axis = (a, b, label) => { const p = proj(...a), q = proj(...b); ctx.beginPath(); ctx.moveTo(p[0], p[1]); ctx.lineTo(q[0], q[1]); ctx.stroke(); ctx.fillText(label, q[0] + 4, q[1]); };
  axis([-nT / 2 - 1, 0, -nL / 2 - 1], [nT / 2, 0, -nL / 2 - 1], 'token ' + (S.t === 'position' ? '(position)' : S.t === 'token' ? '(sorted by text)' : '(by mean norm)'));
  axis([-nT / 2 - 1, 0, -nL / 2 - 1], [-nT / 2 - 1, 0, nL / 2], 'layer');
  axis([-nT / 2 - 1, 0, -nL / 2 - 1], [-nT / 2 - 1, hScale, -nL / 2 - 1], 'L2 norm, max ' + fmt(mx));
  cv.setAttribute('aria-label', '3D bars of the L2 norm of ' + S.s + ' for ' + exLabel(DOCS.example[d]) + ': ' + nT
    + ' tokens x ' + nL + ' layers, largest ' + fmt(mx) + '. Arrow keys rotate.');
  cv.dataset.bars = String(bars.length);
  cv.dataset.order = order.join(',');
};
const setupThree = () => {
  const cv = $('three');
  cv.addEventListener('keydown', ev => {
    const step = 0.12;
    if (ev.key === 'ArrowLeft') three.yaw -= step; else if (ev.key === 'ArrowRight') three.yaw += step;
    else if (ev.key === 'ArrowUp') three.pitch = Math.min(1.5, three.pitch + step);
    else if (ev.key === 'ArrowDown') three.pitch = Math.max(-0.2, three.pitch - step); else return;
    ev.preventDefault(); drawThree();
  });
  cv.addEventListener('pointerdown', ev => { three.drag = [ev.clientX, ev.clientY, three.yaw, three.pitch]; });
  window.addEventListener('pointerup', () => { three.drag = null; });
  cv.addEventListener('pointermove', ev => {
    if (!three.drag) return;
    three.yaw = three.drag[2] + (ev.clientX - three.drag[0]) * 0.01;
    three.pitch = Math.max(-0.2, Math.min(1.5, three.drag[3] + (ev.clientY - three.drag[1]) * 0.01));
    drawThree();
  });
  $('three-order').addEventListener('change', () => { S.t = $('three-order').value; saveHash(); drawThree(); });
};

// ================= neurons: index and cards =================
const N = D.neurons && Object.keys(D.neurons.layers || {}).length ? D.neurons : null;
const nLayers = N ? Object.keys(N.layers).sort((a, b) => a - b) : [];
const cardOf = (Ld, n) => { for (let i = 0; i < Ld.cards.length; i++) if (Ld.cards[i] === n) return i; return -1; };
const entriesOf = (Ld, c, kind) => {
  const e = Ld.entries, out = [];
  for (let i = 0; i < e.card.length; i++) if (e.card[i] === c && e.kind[i] === kind) out.push(i);
  return out;
};
const SORTS = {max: 'max', sel: 'selectivity', mean: 'mean', min: 'min', id: 'id'};

const indexRows = Ld => {
  const W = Ld.max.length, q = S.q.trim().toLowerCase();
  let ids = Array.from({length: W}, (_, i) => i);
  if (q) {
    if (/^\d+$/.test(q)) ids = ids.filter(i => String(i).startsWith(q));
    else {
      const hit = new Set();
      for (let c = 0; c < Ld.cards.length; c++) {
        const words = [];
        for (const i of entriesOf(Ld, c, 0)) { const d = Ld.entries.doc[i]; words.push(D.texts[docToks(d)[Ld.entries.pos[i]]]); }
        if (Ld.out_up) for (const t of row(Ld.out_up, c)) words.push(D.texts[t]);
        if (words.some(w => w.toLowerCase().includes(q))) hit.add(Ld.cards[c]);
      }
      ids = ids.filter(i => hit.has(i));
    }
  }
  const key = {max: i => -Ld.max[i], min: i => Ld.min[i], mean: i => -Ld.mean[i], sel: i => -Math.abs(Ld.sel[i]), id: i => i}[S.o] || (i => i);
  ids.sort((a, b) => (key(a) - key(b)) || (a - b));
  return ids;
};

const LIMIT = 300;  // rows drawn at once; the count line says how many match
const drawIndex = () => {
  const Ld = N.layers[S.L], ids = indexRows(Ld), W = Ld.max.length;
  const shown = ids.slice(0, LIMIT);
  $('n-count').textContent = 'Layer ' + S.L + ': all ' + W + ' neurons of ' + N.site + ' indexed, ' + Ld.cards.length
    + ' with a full card (dashboard.neurons_per_layer); ' + ids.length + ' match' + (S.q ? ' "' + S.q + '"' : '')
    + (ids.length > LIMIT ? ', first ' + LIMIT + ' shown' : '') + '; sorted by ' + SORTS[S.o] + '.';
  const table = el('table', {role: 'grid', 'aria-label': 'neurons of layer ' + S.L});
  const thead = el('thead'), head = el('tr');
  for (const [k, label] of [['id', 'neuron'], ['max', 'max'], ['min', 'min'], ['mean', 'mean'], ['sel', 'selectivity'], ['', 'card']]) {
    const th = el('th', {scope: 'col'});
    if (k) { const b = el('button', {type: 'button', 'data-sort': k, 'aria-pressed': String(S.o === k), tabindex: '-1'}, label + (S.o === k ? ' \u25be' : '')); th.append(b); }
    else th.textContent = label;
    head.append(th);
  }
  thead.append(head);
  const tbody = el('tbody');
  for (const i of shown) {
    const c = cardOf(Ld, i);
    const tr = el('tr', {'data-n': String(i), tabindex: '-1', 'aria-selected': String(i === S.n)});
    const sel = splits.length > 1 ? fmt(Ld.sel[i]) + ' ' + splits[Ld.best[i]] : 'n/a';
    for (const t of [String(i), fmt(Ld.max[i]), fmt(Ld.min[i]), fmt(Ld.mean[i]), sel, c >= 0 ? '\u2713' : '']) tr.append(el('td', {}, t));
    tbody.append(tr);
  }
  table.append(thead, tbody);
  $('n-index').replaceChildren(table);
  const cur = table.querySelector('tr[data-n="' + S.n + '"]') || table.querySelector('tbody tr');
  if (cur) cur.setAttribute('tabindex', '0');
  const firstBtn = table.querySelector('th button');
  if (firstBtn) firstBtn.setAttribute('tabindex', '0');
};

const tokSpan = (t, v, scale, target, msg) => {
  const s = el('span', {class: 'tok' + (target ? ' target' : ''), title: msg}, show(t));
  if (v !== null && Number.isFinite(v) && scale > 0) {
    const a = Math.min(1, Math.abs(v) / scale) * 0.85;
    s.style.background = (v >= 0 ? 'rgba(220,40,40,' : 'rgba(40,90,220,') + a.toFixed(3) + ')';
  }
  return s;
};

const drawCard = () => {
  const card = $('n-card'), Ld = N.layers[S.L], n = S.n;
  card.replaceChildren();
  if (!(n >= 0 && n < Ld.max.length)) { card.append(el('p', {class: 'empty'}, 'Choose a neuron in the index (Enter or click).')); return; }
  const c = cardOf(Ld, n);
  card.append(el('h3', {id: 'card-title'}, 'Layer ' + S.L + ' \u00b7 neuron ' + n + ' (' + N.site + ')'));
  const stats = el('div', {class: 'stats'});
  const rankSel = (() => { let r = 1; for (let i = 0; i < Ld.sel.length; i++) if (Math.abs(Ld.sel[i]) > Math.abs(Ld.sel[n])) r++; return r; })();
  const items = [['max', fmt(Ld.max[n])], ['min', fmt(Ld.min[n])], ['mean', fmt(Ld.mean[n])], ['sd', fmt(Ld.sd[n])]];
  if (splits.length > 1) items.push(['selectivity', fmt(Ld.sel[n]) + ' for ' + splits[Ld.best[n]]], ['selectivity rank', rankSel + ' of ' + Ld.sel.length]);
  for (const [k, v] of items) { const d = el('div'); d.append(el('span', {class: 'k'}, k + ' '), document.createTextNode(v)); stats.append(d); }
  card.append(stats);
  // per-split means
  card.append(el('h3', {}, 'Mean per split'));
  const bars = el('div', {class: 'bars', 'data-kind': 'split-means'});
  let big = 0;
  splits.forEach((s, i) => { big = Math.max(big, Math.abs(row(Ld.split_mean, i)[n]) || 0); });
  splits.forEach((s, i) => {
    const v = row(Ld.split_mean, i)[n], line = el('div', {'data-split': s});
    const bar = el('span', {class: 'bar'}); bar.style.width = (big > 0 ? Math.abs(v) / big * 160 : 0).toFixed(1) + 'px';
    if (v < 0) bar.style.background = '#c0504d';
    line.append(el('span', {}, s), bar, el('span', {class: 'v'}, fmt(v)));
    bars.append(line);
  });
  card.append(bars);
  if (c < 0) {
    card.append(el('p', {class: 'empty'}, 'No full card for this neuron: the page has cards for ' + Ld.cards.length
      + ' neurons of this layer (dashboard.neurons_per_layer, and the page budget).'));
    return;
  }
  // histogram over every value of the neuron
  const counts = row(Ld.hist, c), lo = Ld.hist_lo[c], hi = Ld.hist_hi[c];
  const over = Ld.positions === 'all' ? 'every token' : (Ld.positions === 'last' || Ld.positions === 'answer')
    ? 'every example' : 'every ' + Ld.positions + ' token';  // a span: its tokens only
  card.append(el('h3', {}, 'Activation histogram (' + over + ')'));
  // bars as plain elements: one per bin, height proportional to its count
  const maxc = Math.max(1, ...counts), hist = el('div', {id: 'hist', role: 'img',
    'aria-label': 'histogram of ' + counts.length + ' bins from ' + fmt(lo) + ' to ' + fmt(hi) + ', tallest ' + maxc});
  const bins = el('div', {class: 'bins'});
  counts.forEach((k, i) => {
    const b = el('span', {class: 'bin', title: fmt(lo + (hi - lo) * i / counts.length) + ' to '
      + fmt(lo + (hi - lo) * (i + 1) / counts.length) + ': ' + k});
    b.style.height = (k > 0 ? Math.max(1, k / maxc * 80) : 0).toFixed(1) + 'px';
    bins.append(b);
  });
  const axis = el('div', {class: 'axis'});
  axis.append(el('span', {}, fmt(lo)), el('span', {}, fmt(hi)));
  hist.append(bins, axis);
  card.append(hist);
  // output tokens through the unembedding
  card.append(el('h3', {}, 'Output tokens (direct path through the unembedding, logit change per unit of activation)'));
  if (Ld.out_up) {
    const out = el('div', {class: 'out'});
    for (const [label, ids, vals] of [['promotes', Ld.out_up, Ld.out_up_v], ['suppresses', Ld.out_down, Ld.out_down_v]]) {
      const box = el('div', {'data-kind': label}), ol = el('ol');
      box.append(el('span', {class: 'k'}, label));
      row(ids, c).forEach((t, i) => { const li = el('li'); li.append(el('span', {class: 'tok'}, show(D.texts[t])), document.createTextNode(' ' + fmt(row(vals, c)[i]))); ol.append(li); });
      box.append(ol); out.append(box);
    }
    card.append(out);
  } else card.append(el('p', {class: 'empty'}, notes.output_tokens || 'No output tokens in this page.'));
  // top / bottom activating examples, one entry per example, context coloured token by token
  const scale = Math.max(Math.abs(Ld.max[n]) || 0, Math.abs(Ld.min[n]) || 0);
  for (const [kind, title] of [[0, 'Top activations (one per example)'], [1, 'Bottom activations (one per example)'],
                               [2, 'Samples across activation ranges (lowest range first; peak of each example)']]) {
    card.append(el('h3', {}, title), entryList(Ld, c, kind, scale, 'layer ' + S.L + ', neuron ' + n, Number(S.L)));
  }
};

// The top (kind 0) or bottom (kind 1) examples of card c of table T (a layer of neuron cards, or a
// LoRA module: both hold entries and ctx), one per example, every context token coloured by its own
// value at full colour for |value| = scale. One tab stop; Up/Down move between entries, Left/Right
// between the tokens of one (each value in the status line), Enter opens the whole example.
const entryList = (T, c, kind, scale, what, layer) => {
  const ul = el('ul', {class: 'entries', 'data-kind': ['top', 'bottom', 'ranges'][kind]});
  const list = entriesOf(T, c, kind);
  if (!list.length) ul.append(el('li', {class: 'empty'}, 'none'));
  for (const i of list) {
    const e = T.entries, d = e.doc[i], toks = docToks(d), r = DOCS.example[d], start = DOCS.start[d];
    const pos = e.pos[i], off = e.ctx_off[i];
    const li = el('li', {class: 'entry', tabindex: '-1'});
    const line = el('div', {class: 'ctx'});
    toks.forEach((t, p) => {
      const v = T.ctx[off + p], msg = "'" + show(D.texts[t]) + "' position " + (start + p) + ' of ' + exLabel(r) + ': ' + fmt(v);
      const sp = tokSpan(D.texts[t], Number.isNaN(v) ? null : v, scale, p === pos, msg);
      sp.dataset.msg = what + ', token ' + msg;
      line.append(sp);
    });
    const msg = what + ", token '" + show(D.texts[toks[pos]]) + "' of " + exLabel(r) + ', position ' + (start + pos) + ': ' + fmt(e.value[i]);
    li.setAttribute('aria-label', msg); li.dataset.msg = msg; li.dataset.pos = String(pos); li.dataset.cur = String(pos);
    const info = el('div', {class: 'info'}, exLabel(r) + ' \u00b7 position ' + (start + pos) + ' \u00b7 value ' + fmt(e.value[i]) + ' \u00b7 ');
    const ti = tokenDocs.findIndex(dd => DOCS.example[dd] === r), ci = Array.from(columns).indexOf(r);
    let link = null;
    const v = NS[S.s] || NS[sites[0]];
    if (ti >= 0 && v && v.token_layers) {
      const j = v.token_layers.indexOf(layer);
      link = hashOf({v: 'tokens', x: ti, c: Math.max(0, j) + '.' + (start + pos)});
    } else if (ci >= 0 && v) {
      link = hashOf({v: 'examples', c: Math.max(0, v.layers.indexOf(layer)) + '.' + ci});
    }
    if (link) info.append(el('a', {href: link, tabindex: '-1', class: 'to-example'}, 'whole example \u2192'));
    else info.append(el('span', {class: 'empty'}, 'example not in the heatmaps of this page'));
    li.append(line, info);
    ul.append(li);
  }
  const items = () => Array.from(ul.querySelectorAll('li.entry'));
  if (!items().length) return ul;
  const cursor = (li, p) => {  // the token of an entry that Left/Right reached
    const spans = li.querySelectorAll('.tok');
    spans.forEach((sp, k) => sp.classList.toggle('cur', k === p));
    li.dataset.cur = String(p);
    say(p === Number(li.dataset.pos) ? li.dataset.msg : spans[p].dataset.msg);
  };
  roving(ul, items, () => 1, li => say(li.dataset.msg));
  ul.addEventListener('focusin', ev => { if (ev.target.dataset && ev.target.dataset.msg) cursor(ev.target, Number(ev.target.dataset.pos)); });
  ul.addEventListener('focusout', ev => { if (ev.target.querySelectorAll) ev.target.querySelectorAll('.tok.cur').forEach(sp => sp.classList.remove('cur')); });
  ul.addEventListener('mouseover', ev => { const sp = ev.target.closest && ev.target.closest('.tok'); if (sp && sp.dataset.msg) say(sp.dataset.msg); });
  ul.addEventListener('keydown', ev => {
    const li = ev.target;
    if (!li.classList || !li.classList.contains('entry')) return;
    if (ev.key === 'ArrowLeft' || ev.key === 'ArrowRight') {
      const p = Number(li.dataset.cur) + (ev.key === 'ArrowRight' ? 1 : -1);
      if (p >= 0 && p < li.querySelectorAll('.tok').length) cursor(li, p);
      return;
    }
    if (ev.key !== 'Enter') return;
    const a = li.querySelector('a.to-example');
    if (a) { ev.preventDefault(); a.click(); }
  });
  return ul;
};

const setupNeurons = () => {
  if (!N) {
    $('neuron-body').hidden = true;
    $('neuron-missing').textContent = notes.neurons || 'No neuron index in this run: capture the site named by dashboard.site.';
    $('neuron-missing').hidden = false;
    return false;
  }
  $('neuron-title').textContent = 'Neurons of ' + N.site;
  nLayers.forEach(L => $('n-layer').append(el('option', {value: L}, 'Layer ' + L)));
  $('n-layer').addEventListener('change', () => { S.L = $('n-layer').value; S.n = -1; renderNeurons(); });
  $('n-search').addEventListener('input', () => { S.q = $('n-search').value; saveHash(); drawIndex(); });
  $('n-sort').addEventListener('change', () => { S.o = $('n-sort').value; saveHash(); drawIndex(); });
  const idx = $('n-index');
  const rowsOf = () => Array.from(idx.querySelectorAll('tbody tr'));
  roving(idx, rowsOf, () => 1);
  roving(idx, () => Array.from(idx.querySelectorAll('th button')), () => 100);
  const pick = tr => {
    S.n = Number(tr.dataset.n); saveHash();
    rowsOf().forEach(r => r.setAttribute('aria-selected', String(r === tr)));
    drawCard();
  };
  idx.addEventListener('keydown', ev => {
    if (ev.target.tagName === 'TR' && (ev.key === 'Enter' || ev.key === ' ')) { ev.preventDefault(); pick(ev.target); }
  });
  idx.addEventListener('click', ev => {
    const b = ev.target.closest('button[data-sort]');
    if (b) { S.o = b.dataset.sort; $('n-sort').value = S.o; saveHash(); drawIndex(); idx.querySelector('button[data-sort="' + S.o + '"]').focus(); return; }
    const tr = ev.target.closest('tbody tr'); if (tr) { tr.focus(); pick(tr); }
  });
  idx.addEventListener('focusin', ev => {
    if (ev.target.tagName === 'TR') { const i = Number(ev.target.dataset.n), Ld = N.layers[S.L];
      say('layer ' + S.L + ', neuron ' + i + ': max ' + fmt(Ld.max[i]) + ', min ' + fmt(Ld.min[i]) + ', mean ' + fmt(Ld.mean[i])
        + (splits.length > 1 ? ', selectivity ' + fmt(Ld.sel[i]) + ' for ' + splits[Ld.best[i]] : '') + '. Enter opens its card.'); }
  });
  return true;
};

const syncNeuronControls = () => {
  if (!N.layers[S.L]) { S.L = nLayers[0]; }
  const Ld = N.layers[S.L];
  if (!(S.n >= 0 && S.n < Ld.max.length)) S.n = Ld.cards.length ? Ld.cards[0] : -1;
  if (!SORTS[S.o]) S.o = 'max';
  $('n-layer').value = S.L; $('n-search').value = S.q; $('n-sort').value = S.o;
};

/*@include interpretations.js*/
/*@include lora.js*/

// ---- one render from the state; the hash is rewritten, links push new entries ----
const hasHeat = setupHeat(), hasNeurons = setupNeurons(), hasLora = setupLora();
setupThree();
// Each control redraws only its own panel; a hash change (a followed link, Back) redraws all.
function renderHeat() {
  if (hasHeat) { syncHeatControls(); drawHeat(); $('three-order').value = S.t; drawThree(); }
  else { $('three-body').hidden = true; $('three-missing').hidden = false; $('three-missing').textContent = 'No 3D view: it needs the heatmaps\u2019 norms.'; }
  saveHash();
}
function renderNeurons() {
  if (hasNeurons) { syncNeuronControls(); drawIndex(); drawCard(); }
  saveHash();
}
const render = () => { renderHeat(); renderNeurons(); renderLora(); };
readHash();
render();
window.addEventListener('hashchange', () => {
  const before = Object.assign({}, S);
  readHash();
  render();
  // a followed link lands on what it names: the card, or the heatmap cell
  if (before.n !== S.n || before.L !== S.L) { $('n-card').focus(); $('n-card').scrollIntoView({block: 'nearest'}); }
  else if (before.v !== S.v || before.x !== S.x || before.c !== S.c) {
    const td = $('heatmap').querySelector('td[tabindex="0"]');
    if (td) { td.focus(); td.scrollIntoView({block: 'nearest', inline: 'nearest'}); }
  }
});
})();
