// ================= interpretations (seed 002): a text and a star per LoRA panel =================
// Kept in this browser (localStorage, one item per run: D.run_key) and, when `layerscope serve`
// serves the page, in the run's interpretations.json too: the page finds the server by asking its
// own origin for that file, and only when it was loaded over http from this machine, so a page
// opened from disk makes no request at all. Entries merge key by key, the newer lastModified
// winning (the incoming one on a tie): the rules of layerscope.web.interpretations.
const IKEY = /^layer_[0-9]{1,6}_[A-Za-z0-9_.-]{1,160}_(positive|negative)$/;
const ITIME = /^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?(Z|[+-][0-9]{2}:[0-9]{2})$/;
const IMAX_TEXT = 20000, IMAX_KEYS = 200000, IMAX_BYTES = 8 << 20;
const LOOPBACK = ['127.0.0.1', 'localhost', '[::1]'];
const interp = {entries: {}, dirty: new Set(), server: false, saving: false, timer: null, retry: 0,
  local: 'layerscope.interpretations:' + (D.run_key || D.title || ''), storage: true, saved: ''};
const serverURL = location.protocol === 'http:' && LOOPBACK.includes(location.hostname) ? 'interpretations.json' : null;
const widgets = new Map();  // key -> {ta, star} of the panels drawn now

// The entries of an interpretations document, or an Error naming the first problem.
const validateInterp = doc => {
  const isObj = o => o !== null && typeof o === 'object' && !Array.isArray(o);
  if (!isObj(doc) || !isObj(doc.interpretations)) throw new Error('not an interpretations file: expected {"interpretations": {KEY: {...}}}');
  const keys = Object.keys(doc.interpretations), out = {};
  if (keys.length > IMAX_KEYS) throw new Error('too many interpretations (' + keys.length + ' > ' + IMAX_KEYS + ')');
  for (const k of keys) {
    const e = doc.interpretations[k];
    if (!IKEY.test(k)) throw new Error(JSON.stringify(k.slice(0, 80)) + ': not a panel key (layer_L_MODULE_positive or _negative)');
    if (!isObj(e) || typeof e.text !== 'string' || typeof e.starred !== 'boolean')
      throw new Error(k + ': expected {"text": string, "starred": true or false, "lastModified": ISO time}');
    if (e.text.length > IMAX_TEXT && Array.from(e.text).length > IMAX_TEXT) throw new Error(k + ': text longer than ' + IMAX_TEXT + ' characters');
    const o = {text: e.text, starred: e.starred};
    if (e.lastModified !== undefined && e.lastModified !== null) {
      if (typeof e.lastModified !== 'string' || !ITIME.test(e.lastModified) || Number.isNaN(Date.parse(e.lastModified)))
        throw new Error(k + ': lastModified is not an ISO 8601 time with its zone (2024-01-20T10:30:00Z)');
      o.lastModified = e.lastModified;
    }
    out[k] = o;
  }
  return out;
};
const timeOf = e => e && e.lastModified ? Date.parse(e.lastModified) : -Infinity;
// Merge validated entries in, key by key; returns the keys taken.
const mergeInterp = incoming => {
  const taken = [];
  for (const k of Object.keys(incoming)) {
    const e = Object.assign({}, incoming[k]);
    if (!e.lastModified) e.lastModified = new Date().toISOString();
    if (!interp.entries[k] || timeOf(e) >= timeOf(interp.entries[k])) { interp.entries[k] = e; taken.push(k); }
  }
  return taken;
};
const interpDoc = () => {
  const out = {};
  for (const k of Object.keys(interp.entries).sort()) out[k] = interp.entries[k];
  return {interpretations: out};
};

const interpState = text => {
  const all = Object.values(interp.entries), written = all.filter(e => e.text.trim()).length, starred = all.filter(e => e.starred).length;
  const where = interp.server ? 'saved in this browser and in the run\u2019s interpretations.json' + (interp.saved ? ' (' + interp.saved + ')' : '')
    : interp.storage ? 'saved in this browser (export to keep a file)' : 'browser storage is not available here: export to keep them';
  $('interp-state').textContent = 'Interpretations: ' + written + ' written, ' + starred + ' starred; ' + where + '.' + (text ? ' ' + text : '');
};
const interpMessage = (text, bad) => {
  const p = $('interp-msg');
  p.textContent = text; p.hidden = !text; p.className = bad ? 'missing' : 'hint';
  p.setAttribute('role', bad ? 'alert' : 'status');
};
const persistLocal = () => {
  if (!interp.storage) return;
  try { localStorage.setItem(interp.local, JSON.stringify(interpDoc())); }
  catch (err) { interp.storage = false; }
};
// Show merged entries in the panels drawn now (not in the box being typed in).
const refreshWidgets = keys => {
  for (const k of keys) {
    const w = widgets.get(k), e = interp.entries[k];
    if (!w || !e) continue;
    if (document.activeElement !== w.ta) w.ta.value = e.text;
    w.star.checked = e.starred;
  }
};

const schedulePush = delay => {
  if (!interp.server) return;
  clearTimeout(interp.timer);
  interp.timer = setTimeout(pushInterp, delay === undefined ? 300 : delay);
};
// PUT the changed entries; the server merges them into the file and answers with all of it.
const pushInterp = async () => {
  if (!interp.server || interp.saving || !interp.dirty.size) return;
  const keys = Array.from(interp.dirty), body = {interpretations: {}};
  interp.dirty.clear();
  for (const k of keys) body.interpretations[k] = interp.entries[k];
  interp.saving = true;
  try {
    const r = await fetch(serverURL, {method: 'PUT', cache: 'no-store', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify(body)});
    if (!r.ok) throw new Error('HTTP ' + r.status + ': ' + (await r.text()).slice(0, 200));
    const taken = mergeInterp(validateInterp(await r.json()));
    persistLocal(); refreshWidgets(taken);
    interp.retry = 0; interp.saved = 'last at ' + new Date().toLocaleTimeString();
    interpState();
  } catch (err) {
    keys.forEach(k => interp.dirty.add(k));
    interp.retry = Math.min(30000, (interp.retry || 1000) * 2);
    interpState('Not saved to the server (' + err.message + '); kept in this browser, trying again.');
  } finally {
    interp.saving = false;
    if (interp.dirty.size) schedulePush(interp.retry || 300);
  }
};

const editInterp = (key, patch) => {
  const old = interp.entries[key] || {text: '', starred: false};
  interp.entries[key] = {text: patch.text !== undefined ? patch.text : old.text,
    starred: patch.starred !== undefined ? patch.starred : old.starred, lastModified: new Date().toISOString()};
  persistLocal();
  interp.dirty.add(key);
  schedulePush();
  interpState();
};

// The text box and star of one panel.
let interpIds = 0;
const interpBox = (key, title) => {
  const id = 'interp-' + (++interpIds), box = el('div', {class: 'interp', 'data-key': key});
  const ta = el('textarea', {id: id, rows: '2', 'data-key': key, placeholder: 'What does this panel pick out?', maxlength: String(IMAX_TEXT)});
  const star = el('input', {type: 'checkbox', id: id + '-star', 'data-key': key});
  const e = interp.entries[key];
  ta.value = e ? e.text : ''; star.checked = !!(e && e.starred);
  ta.addEventListener('input', () => editInterp(key, {text: ta.value}));
  star.addEventListener('change', () => editInterp(key, {starred: star.checked}));
  box.append(el('label', {for: id}, 'Interpretation of ' + title), ta, star, el('label', {for: id + '-star', class: 'star'}, '\u2605 star'));
  widgets.set(key, {ta, star});
  return box;
};

const exportInterp = () => {
  const blob = new Blob([JSON.stringify(interpDoc(), null, 2) + '\n'], {type: 'application/json'});
  const a = el('a', {href: URL.createObjectURL(blob), download: 'interpretations.json'});
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
};

const importInterp = async (file, known) => {
  let incoming;
  try {
    if (file.size > IMAX_BYTES) throw new Error('the file is larger than ' + (IMAX_BYTES >> 20) + ' MiB');
    let doc;
    try { doc = JSON.parse(await file.text()); } catch (err) { throw new Error('not JSON (' + err.message + ')'); }
    incoming = validateInterp(doc);
  } catch (err) {
    interpMessage('Not imported: ' + file.name + ': ' + err.message + ' Nothing was changed.', true);
    return;
  }
  const keys = Object.keys(incoming), taken = mergeInterp(incoming);
  taken.forEach(k => interp.dirty.add(k));
  persistLocal(); refreshWidgets(taken); schedulePush(0); interpState();
  const older = keys.length - taken.length, unknown = keys.filter(k => !known.has(k)).length;
  interpMessage('Imported ' + taken.length + ' of ' + keys.length + ' interpretations from ' + file.name
    + (older ? '; ' + older + ' older than the page\u2019s were left as they were' : '')
    + (unknown ? '; ' + unknown + ' name no panel of this page (kept in the file)' : '') + '.', false);
};

// Load this browser's copy, then the server's; known: every panel key of the page.
const setupInterp = known => {
  try {
    const raw = localStorage.getItem(interp.local);
    if (raw) mergeInterp(validateInterp(JSON.parse(raw)));
  } catch (err) {
    if (err && err.name === 'SecurityError') interp.storage = false;
    else interpMessage('This browser\u2019s copy of the interpretations could not be read (' + err.message + '); it was left as it is.', true);
  }
  $('interp-export').addEventListener('click', exportInterp);
  $('interp-import').addEventListener('change', () => {
    const f = $('interp-import').files[0];
    $('interp-import').value = '';
    if (f) importInterp(f, known);
  });
  interpState();
  if (serverURL) connectInterp();
};
const connectInterp = async () => {
  try {
    const r = await fetch(serverURL, {cache: 'no-store'});
    if (!r.ok || r.headers.get('X-LayerScope') !== 'interpretations') { interpState('(No LayerScope server here: run `python -m layerscope serve RUN` to save to a file.)'); return; }
    const server = validateInterp(await r.json());
    refreshWidgets(mergeInterp(server));
    // what this browser holds that the file lacks, or holds newer, goes to the file
    for (const k of Object.keys(interp.entries)) if (!server[k] || timeOf(interp.entries[k]) > timeOf(server[k])) interp.dirty.add(k);
    interp.server = true;
    persistLocal(); interpState(); schedulePush(0);
  } catch (err) {
    interpState('(The server\u2019s interpretations could not be read: ' + err.message + '.)');
  }
};
