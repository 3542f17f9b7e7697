// Loads a dashboard in jsdom, exercises it, and prints what a test asserts on as one JSON line.
const {JSDOM, VirtualConsole} = require('jsdom');
const fs = require('fs');
const vc = new VirtualConsole();
const errors = [];
vc.on('jsdomError', e => errors.push(String(e)));
// No `resources` option: jsdom loads no subresource, as a file:// page with none should need.
const dom = new JSDOM(fs.readFileSync(process.argv[2], 'utf8'), {runScripts: 'dangerously', virtualConsole: vc});
const w = dom.window, d = w.document;
const out = {errors, scripts_run: !!d.querySelector('#meta tr')};
const cell = d.querySelector('#heatmap td');
if (cell) { cell.dispatchEvent(new w.Event('focus')); out.heat_focus = d.getElementById('status').textContent;
  out.heat_title = cell.getAttribute('title'); out.heat_cells = d.querySelectorAll('#heatmap td').length;
  cell.dispatchEvent(new w.KeyboardEvent('keydown', {key: 'ArrowRight', bubbles: true}));
  out.after_arrow = d.activeElement && d.activeElement.dataset ? d.activeElement.dataset.p : null; }
const t = d.querySelector('#top .target');
if (t) { t.dispatchEvent(new w.Event('focus')); out.top_focus = d.getElementById('status').textContent;
  out.top_bg = t.style.background; out.top_tabindex = t.getAttribute('tabindex'); }
const b = d.querySelector('#bottom .target');
if (b) out.bottom_bg = b.style.background;
out.header_tokens = Array.from(d.querySelectorAll('#heatmap th')).map(x => x.textContent);
out.layers = Array.from(d.querySelectorAll('#layer option')).map(o => o.textContent);
out.neurons = d.querySelectorAll('#neuron option').length;
if (out.neurons > 1) { d.getElementById('next').click(); out.after_next = d.getElementById('neuron').selectedIndex; }
for (const name of ['heatmap', 'neuron']) {  // a panel without its inputs says what is missing, as text
  const m = d.getElementById(name + '-missing');
  out[name + '_missing'] = m.hidden ? null : m.textContent;
  out[name + '_missing_children'] = m.children.length;
  out[name + '_body_hidden'] = d.getElementById(name + '-body').hidden;
}
out.neuron_title = d.getElementById('neuron-title').textContent;
out.site_of_hidden = d.getElementById('site-of').hidden;
out.body_text = d.body.textContent;
out.script_tags = d.querySelectorAll('script').length;
console.log(JSON.stringify(out));
