"""A steered run's page: normal / steered / difference per token x layer, the layer-correlation
curve, and a layer x region x token view drawn on a canvas; one file, no request of any kind.

Every string from the model or the data set reaches the page as JSON data and is set with
textContent, never as markup.
"""

from __future__ import annotations

import html
import os
from importlib import resources
from pathlib import Path
from typing import Any

from layerscope.fileio import atomic_write_text
from layerscope.web.encode import embed_json


def render(data: dict[str, Any]) -> str:
    assets = resources.files("layerscope.web") / "assets"
    js = (assets / "steering.js").read_text(encoding="utf-8")
    css = (assets / "steering.css").read_text(encoding="utf-8")
    title = html.escape(f"LayerScope steering: {data['target']['name']}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title><style>{css}</style></head>
<body>
<header><h1 id="title"></h1><p id="facts"></p></header>
<main>
<section aria-labelledby="h-heat"><h2 id="h-heat">Residual stream per token and layer</h2>
<div class="controls"><label>Example <select id="example"></select></label>
<span role="radiogroup" aria-label="stream" id="views"></span></div>
<div id="bar" class="bar"><span id="bar-min"></span><span class="ramp" id="ramp"></span><span id="bar-max"></span>
<span id="bar-unit"></span></div>
<table id="heat" class="heat" aria-describedby="status"></table>
<p id="status" role="status" aria-live="polite"></p></section>
<section aria-labelledby="h-corr"><h2 id="h-corr">Correlation of the difference with the vector, per layer</h2>
<svg id="curve" width="640" height="200" role="img" aria-label="layer correlation curve"></svg></section>
<section aria-labelledby="h-3d"><h2 id="h-3d">Difference: layer x region x token</h2>
<p class="hint">Drag, or focus the view and use the arrow keys, to rotate.</p>
<canvas id="cube" width="720" height="420" tabindex="0" aria-label="3D view of the difference"></canvas>
<p id="cube-status" role="status"></p></section>
</main>
<script type="application/json" id="data">{embed_json(data)}</script>
<script>{js}</script>
</body></html>
"""


def write_page(data: dict[str, Any], path: str | os.PathLike) -> int:
    text = render(data)
    atomic_write_text(Path(path), text)
    return len(text.encode("utf-8"))
