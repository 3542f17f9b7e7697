"""Assemble the dashboard page: the HTML skeleton, the inline CSS and JS assets, and the data.

The summary (layerscope.analysis.summaries.summarize, arrays as numpy or packed) holds:

* ``title``, ``meta`` ({str: scalar}), ``splits`` / ``split_sizes``, ``budget_mib``;
* ``texts`` (distinct token strings); ``examples`` (columnar: ``index`` in the run, ``id``,
  ``split`` index, ``n_tokens``); ``docs`` (columnar spans of examples: ``example`` row,
  ``start`` token, ``offsets`` into ``toks``, ``toks`` indices into ``texts``);
* ``norms``: ``sites`` {site: norms.site_norms(...)}, and for a run with variants {"SITE:adapter-base":
  norms.diff_norms(...)} (with ``label`` and ``unit``), ``token_docs`` (docs of the token x layer
  examples), ``columns`` (example rows of the layer x example view);
* ``neurons`` (or None): ``site``, ``k``, ``context``, ``bins``, ``layers`` {"L": index arrays over
  every neuron (``max``, ``min``, ``mean``, ``sd``, ``split_mean``, ``best``, ``sel``) and cards
  (``cards`` ids in rank order, ``hist*``, ``entries`` columnar, ``ctx`` values, ``out_*``)},
  ``token_top`` {"L": ``ids``/``values`` [token rows of the token docs, 3]};
* ``lora`` (or None): ``k``, ``context``, ``layers`` {"L": {"modules": [paths], PATH: statistics,
  ``entries``/``ctx`` as cards have them, ``keys`` (interpretation key stems)}} (analysis.lora);
* ``run_key``: what the browser keeps this run's interpretations under;
* ``notes`` {"heatmap", "neurons", "output_tokens"}: why a part is missing, naming config keys.

The page builds every element with textContent/setAttribute, never innerHTML, so no string
from a model or a data set can become markup. Its CSP forbids every request but one kind: to its
own origin, which only a page served by ``layerscope serve`` (web.serve) makes, for
``interpretations.json``; opened from disk it makes none.
"""

from __future__ import annotations

import html
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from layerscope.fileio import atomic_write_text
from layerscope.packed import unpack
from layerscope.web import budget
from layerscope.web.encode import embed_json

MIB = 1 << 20
# connect-src 'self': the interpretations file, when `layerscope serve` serves the page; nothing else
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'"


def asset(name: str) -> str:
    """An inline asset (assets/NAME), as packaged with layerscope.web."""
    return resources.files("layerscope.web").joinpath("assets", name).read_text(encoding="utf-8")


def script() -> str:
    """dashboard.js with the assets it names in ``/*@include NAME*/`` lines inlined (one scope)."""
    return re.sub(r"/\*@include ([\w.-]+)\*/", lambda m: asset(m.group(1)), asset("dashboard.js"))


def _document(title: str, data: str) -> str:
    t = html.escape(title)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>{t}</title><style>{asset("dashboard.css")}</style></head>
<body>
{asset("body.html").replace("{{title}}", t)}
<script type="application/json" id="data">{data}</script>
<script>{script()}</script>
</body></html>
"""


def render_html(summary: dict[str, Any], budget_mib: float | None = None) -> str:
    """The page for ``summary``, cut to ``budget_mib`` (default: the summary's own, else 10 MiB)."""
    s = unpack(summary)
    if s.get("version") != 3:
        raise ValueError("summary.json was written by an older LayerScope; re-create it "
                         "(snakemake --cores 1 -R summarize)")
    limit = budget_mib if budget_mib is not None else s.get("budget_mib") or 10
    base = len(_document(str(s.get("title", "")), "").encode("utf-8"))
    s["page"] = {}
    size = lambda x: base + len(embed_json(x).encode("utf-8"))  # noqa: E731
    s["page"] = budget.fit(s, size, int(limit * MIB))
    s["page"]["budget_mib"] = limit
    return _document(str(s.get("title") or "LayerScope"), embed_json(s))


def write_dashboard(summary: dict[str, Any], path: str | os.PathLike, budget_mib: float | None = None) -> int:
    """Render and write the page atomically; returns its size in bytes."""
    text = render_html(summary, budget_mib)
    atomic_write_text(Path(path), text)
    return len(text.encode("utf-8"))
