// ================= LoRA neurons (seed 002): one layer's adapted modules side by side =================
// For the chosen layer and LoRA neuron, each module's highest (positive) and lowest (negative)
// activating examples, one per example, every context token coloured by its own value, and per panel
// an interpretation and a star (interpretations.js).
const LO = D.lora && Object.keys(D.lora.layers || {}).length ? D.lora : null;
const loraLayers = LO ? Object.keys(LO.layers).sort((a, b) => a - b) : [];
const loraRank = L => Math.max(...LO.layers[L].modules.map(m => LO.layers[L][m].width));
const SIGNS = [[0, 'positive', 'Positive: highest activations'], [1, 'negative', 'Negative: lowest activations']];

const setupLora = () => {
  if (!LO) { $('lora-panel').hidden = true; return false; }
  $('lora-panel').hidden = false;
  loraLayers.forEach(L => $('lora-layer').append(el('option', {value: L}, 'Layer ' + L)));
  $('lora-layer').addEventListener('change', () => { S.l = $('lora-layer').value; renderLora(); });
  $('lora-neuron').addEventListener('change', () => { S.r = Number($('lora-neuron').value); renderLora(); });
  const known = new Set();
  for (const L of loraLayers) for (const m of LO.layers[L].modules) for (const stem of LO.layers[L][m].keys)
    for (const [, sign] of SIGNS) known.add(stem + '_' + sign);
  setupInterp(known);
  return true;
};

const syncLoraControls = () => {
  if (!LO.layers[S.l]) S.l = loraLayers[0];
  const R = loraRank(S.l);
  if (!(S.r >= 0 && S.r < R)) S.r = 0;
  $('lora-layer').value = S.l;
  $('lora-neuron').replaceChildren(...Array.from({length: R}, (_, n) => el('option', {value: String(n)}, String(n))));
  $('lora-neuron').value = String(S.r);
  $('lora-neuron-box').hidden = R < 2;
};

const drawLora = () => {
  const Ld = LO.layers[S.l], n = S.r, box = $('lora-modules');
  $('lora-caption').textContent = 'Layer ' + S.l + ': ' + Ld.modules.length + ' adapted module' + (Ld.modules.length > 1 ? 's' : '')
    + ' (' + Ld.modules.join(', ') + '). Each LoRA neuron is one output of a module\u2019s A projection; a list keeps the '
    + LO.k + ' examples with the highest (lowest) value at any token, one entry per example, with ' + LO.context
    + ' tokens each side, coloured by that neuron (red positive, blue negative; outlined: the token the value is at).';
  widgets.clear();
  box.replaceChildren();
  for (const m of Ld.modules) {
    const T = Ld[m], col = el('div', {class: 'module', 'data-module': m});
    col.append(el('h3', {}, m + (T.width > 1 ? ' \u00b7 neuron ' + n + ' of ' + T.width : ' (rank 1)')));
    if (n >= T.width) { col.append(el('p', {class: 'empty'}, 'This module has rank ' + T.width + ': no neuron ' + n + '.')); box.append(col); continue; }
    const stats = el('div', {class: 'stats'});
    for (const [k, v] of [['max', T.max[n]], ['min', T.min[n]], ['mean', T.mean[n]], ['sd', T.sd[n]]]) {
      const d = el('div', {'data-stat': k}); d.append(el('span', {class: 'k'}, k + ' '), document.createTextNode(fmt(v))); stats.append(d);
    }
    col.append(stats);
    const scale = Math.max(Math.abs(T.max[n]) || 0, Math.abs(T.min[n]) || 0);
    for (const [kind, sign, title] of SIGNS) {
      const key = T.keys[n] + '_' + sign, panel = el('div', {class: 'panel', 'data-kind': sign, 'data-key': key});
      const what = 'layer ' + S.l + ', ' + m + ', LoRA neuron ' + n;
      panel.append(el('h4', {}, title + ' (top ' + LO.k + ', one per example)'),
        entryList(T, n, kind, scale, what, Number(S.l)), interpBox(key, what + ', ' + sign));
      col.append(panel);
    }
    box.append(col);
  }
};

function renderLora() {
  if (hasLora) { syncLoraControls(); drawLora(); }
  saveHash();
}
