"use strict";
(function () {
  const data = JSON.parse(document.getElementById("data").textContent);
  function unpack(o) {
    if (o && typeof o === "object" && o.__array__) {
      const bin = atob(o.b64), bytes = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      const T = {float32: Float32Array, float64: Float64Array, int8: Int8Array, uint8: Uint8Array, int16: Int16Array,
                 uint16: Uint16Array, int32: Int32Array, uint32: Uint32Array}[o.__array__];
      return {a: new T(bytes.buffer), shape: o.shape};
    }
    if (Array.isArray(o)) return o.map(unpack);
    if (o && typeof o === "object") { const r = {}; for (const k in o) r[k] = unpack(o[k]); return r; }
    return o;
  }
  const D = unpack(data), $ = id => document.getElementById(id);
  const VIEWS = ["normal", "steered", "difference"];
  const S = {e: 0, v: 2, r: 0, c: 0, yaw: 0.6, pitch: 0.5};
  const fmt = x => Number(x).toPrecision(4);
  const t = D.target;
  $("title").textContent = "Steering " + t.concept + " at layer " + t.layer + ", strength " + t.strength;
  $("facts").textContent = D.model + "; positions " + t.positions + "; peak layer " + D.peak_layer +
    "; total intensity " + fmt(D.total_intensity);
  D.examples.forEach((ex, i) => {
    const o = document.createElement("option");
    o.value = i; o.textContent = ex.id + " (" + ex.split + ")";
    $("example").appendChild(o);
  });
  VIEWS.forEach((name, i) => {
    const b = document.createElement("button");
    b.type = "button"; b.textContent = name; b.setAttribute("role", "radio"); b.dataset.view = i;
    b.addEventListener("click", () => { S.v = i; draw(); });
    $("views").appendChild(b);
  });
  $("example").addEventListener("change", ev => { S.e = +ev.target.value; S.c = 0; draw(); });
  function at(ex, v, r, c) { const n = ex.norms, L = n.shape[1], T = n.shape[2]; return n.a[(v * L + r) * T + c]; }
  function colour(x, max) {
    const f = max > 0 ? Math.min(1, x / max) : 0;
    return "rgb(" + Math.round(255 - 155 * f) + "," + Math.round(255 - 215 * f) + "," + Math.round(255 - 215 * f) + ")";
  }
  function draw() {
    const ex = D.examples[S.e], n = ex.norms, L = n.shape[1], T = n.shape[2];
    document.querySelectorAll("#views button").forEach(b => b.setAttribute("aria-checked", +b.dataset.view === S.v));
    let max = 0;
    for (let r = 0; r < L; r++) for (let c = 0; c < T; c++) max = Math.max(max, at(ex, S.v, r, c));
    $("bar-min").textContent = "0"; $("bar-max").textContent = fmt(max);
    $("bar-unit").textContent = "L2 norm of the " + VIEWS[S.v] + " residual stream";
    $("ramp").style.background = "linear-gradient(to right, " + colour(0, 1) + ", " + colour(1, 1) + ")";
    const table = $("heat");
    table.replaceChildren();
    const head = table.insertRow(), corner = document.createElement("th");
    corner.textContent = "layer \\ token"; head.appendChild(corner);
    for (let c = 0; c < T; c++) { const th = document.createElement("th"); th.textContent = ex.tokens[c]; head.appendChild(th); }
    for (let r = 0; r < L; r++) {
      const tr = table.insertRow(), th = document.createElement("th");
      th.textContent = D.layers[r]; tr.appendChild(th);
      for (let c = 0; c < T; c++) {
        const td = tr.insertCell(), x = at(ex, S.v, r, c);
        td.style.background = colour(x, max); td.dataset.r = r; td.dataset.c = c;
        td.tabIndex = (r === S.r && c === S.c) ? 0 : -1;
        td.title = fmt(x);
        td.addEventListener("focus", () => { S.r = r; S.c = c; say(); });
      }
    }
    say(); curve(); cube();
  }
  function say() {
    const ex = D.examples[S.e];
    $("status").textContent = VIEWS[S.v] + " at layer " + D.layers[S.r] + ", token " + S.c + " " +
      JSON.stringify(ex.tokens[S.c]) + ": " + fmt(at(ex, S.v, S.r, S.c));
  }
  $("heat").addEventListener("keydown", ev => {
    const ex = D.examples[S.e], L = ex.norms.shape[1], T = ex.norms.shape[2];
    const move = {ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1]}[ev.key];
    if (!move) return;
    ev.preventDefault();
    const r = Math.max(0, Math.min(L - 1, S.r + move[0])), c = Math.max(0, Math.min(T - 1, S.c + move[1]));
    const cur = $("heat").querySelector("td[tabindex='0']"); if (cur) cur.tabIndex = -1;
    const td = $("heat").querySelector("td[data-r='" + r + "'][data-c='" + c + "']");
    td.tabIndex = 0; td.focus();
  });
  function curve() {
    const svg = $("curve"), W = 640, H = 200, pad = 30, ns = "http://www.w3.org/2000/svg";
    svg.replaceChildren();
    const n = D.layers.length, x = i => pad + (W - 2 * pad) * (n > 1 ? i / (n - 1) : 0.5);
    const y = v => H - pad - (H - 2 * pad) * (v + 1) / 2;
    const axis = document.createElementNS(ns, "line");
    axis.setAttribute("x1", pad); axis.setAttribute("x2", W - pad); axis.setAttribute("y1", y(0)); axis.setAttribute("y2", y(0));
    axis.setAttribute("stroke", "#aaa"); svg.appendChild(axis);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", D.correlation.map((v, i) => x(i) + "," + y(v)).join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", "#c33"); svg.appendChild(line);
    D.correlation.forEach((v, i) => {
      const dot = document.createElementNS(ns, "circle");
      dot.setAttribute("cx", x(i)); dot.setAttribute("cy", y(v)); dot.setAttribute("r", D.layers[i] === t.layer ? 5 : 3);
      dot.setAttribute("class", "point"); dot.dataset.layer = D.layers[i]; dot.dataset.value = v;
      const title = document.createElementNS(ns, "title");
      title.textContent = "layer " + D.layers[i] + ": correlation " + fmt(v); dot.appendChild(title);
      svg.appendChild(dot);
    });
  }
  function cube() {
    const cv = $("cube"), g = cv.getContext("2d"), ex = D.examples[S.e], R = ex.regions;
    const L = R.shape[0], G = R.shape[1], T = R.shape[2];
    g.clearRect(0, 0, cv.width, cv.height);
    let max = 0;
    for (let i = 0; i < R.a.length; i++) max = Math.max(max, Math.abs(R.a[i]));
    const cy = Math.cos(S.yaw), sy = Math.sin(S.yaw), cp = Math.cos(S.pitch), sp = Math.sin(S.pitch);
    const pts = [];
    for (let l = 0; l < L; l++) for (let r = 0; r < G; r++) for (let c = 0; c < T; c++) {
      const v = R.a[(l * G + r) * T + c];
      const X = c / Math.max(1, T - 1) - 0.5, Z = r / Math.max(1, G - 1) - 0.5, Y = l / Math.max(1, L - 1) - 0.5;
      const x1 = X * cy - Z * sy, z1 = X * sy + Z * cy, y1 = Y * cp - z1 * sp, z2 = Y * sp + z1 * cp;
      pts.push([z2, cv.width / 2 + x1 * 420, cv.height / 2 - y1 * 300, v]);
    }
    pts.sort((a, b) => a[0] - b[0]);
    for (const [, px, py, v] of pts) {
      const f = max > 0 ? Math.abs(v) / max : 0;
      g.fillStyle = v >= 0 ? "rgba(200,40,40," + f + ")" : "rgba(40,60,200," + f + ")";
      g.fillRect(px - 2, py - 2, 4, 4);
    }
    $("cube-status").textContent = "rotation " + fmt(S.yaw) + ", tilt " + fmt(S.pitch) + "; largest |difference| " + fmt(max);
  }
  $("cube").addEventListener("keydown", ev => {
    const d = {ArrowLeft: [-0.2, 0], ArrowRight: [0.2, 0], ArrowUp: [0, -0.2], ArrowDown: [0, 0.2]}[ev.key];
    if (!d) return;
    ev.preventDefault(); S.yaw += d[0]; S.pitch += d[1]; cube();
  });
  let drag = null;
  $("cube").addEventListener("pointerdown", ev => { drag = [ev.clientX, ev.clientY]; });
  window.addEventListener("pointerup", () => { drag = null; });
  $("cube").addEventListener("pointermove", ev => {
    if (!drag) return;
    S.yaw += (ev.clientX - drag[0]) / 150; S.pitch += (ev.clientY - drag[1]) / 150; drag = [ev.clientX, ev.clientY]; cube();
  });
  draw();
})();
