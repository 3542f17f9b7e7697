"""Seed 000's steering files: one JSON per steered run x prompt (example), for its 3D viewers.

Per layer, ``normal_activations`` / ``steered_activations`` / ``difference_activations`` hold
the prompt's residual stream (resid_post) averaged over its tokens and downsampled to
``downsampled_regions`` regions (means of near-equal runs of dimensions); the same per token is
in ``token_difference_activations`` (an addition of ours, for a layer x region x token view).
``layer_correlations``: per layer, the Pearson correlation of the prompt's mean difference with
the injected vector (1 at the injection layer); ``total_intensity``: the sum over layers of the
difference's mean L2 norm; ``peak_activation_layer``: where that norm is largest.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.analysis.steering import correlation, example_rows, layer_views, regions
from layerscope.errors import LayerScopeError
from layerscope.fileio import read_json
from layerscope.interop.common import check_out, staged_dir
from layerscope.store.reader import Run


def export_steering(run_dir: str | os.PathLike, target: str, out: str | os.PathLike, n_regions: int = 64,
                    force: bool = False, examples: list[int] | None = None) -> Path:
    """Write one seed-000 JSON file per example of ``target`` (a steered run of ``steering.runs``)."""
    run = Run(run_dir)
    if not 1 <= n_regions <= run.metadata["hidden_dim"]:
        raise LayerScopeError(f"--regions {n_regions}: must be between 1 and the hidden size, "
                              f"{run.metadata['hidden_dim']}")
    info_path = run.path / "steering" / target / "summary.json"
    if not info_path.is_file():
        raise LayerScopeError(f"{run.path}: no steered run {target!r} (no {info_path.relative_to(run.path)}); "
                              f"steered runs: {', '.join(steered_runs(run.path)) or 'none'}")
    summary = read_json(info_path)
    t = summary["target"]
    steered = Run(run_dir, f"steer-{target}")
    vector = np.load(run.path / "steering" / "vectors" / f"{t['concept']}.npy", allow_pickle=False)
    v = (vector if vector.ndim == 1 else vector[t["layer"]]).astype(np.float64)
    layers = [L for L in run.layers if (L, "resid_post") in run.arrays]
    positions = {run.metadata["arrays"][f"layer_{L:02d}/resid_post"]["positions"] for L in layers}
    if positions != {"all"}:
        raise LayerScopeError(f"{run.path}: seed 000's files hold every token; capture resid_post with positions: all")
    from layerscope.data.tokens import load_decoder, token_texts

    decoder = load_decoder(read_json(run.path / "model" / "manifest.json"))
    dest = check_out(run, Path(out), force)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    views = {L: layer_views(run, steered, L) for L in layers}
    with staged_dir(dest) as tmp:
        for e in examples if examples is not None else range(len(run)):
            ex = run.examples[e]
            doc: dict[str, Any] = {
                "metadata": {"model": run.metadata["model_name"], "prompt": ex.get("text") or "",
                             "concept_name": t["concept"], "injection_layer": t["layer"],
                             "injection_strength": t["strength"], "sequence_length": int(ex["n_tokens"]),
                             "num_layers": run.metadata["num_layers"], "hidden_size": run.metadata["hidden_dim"],
                             "downsampled_regions": n_regions, "timestamp": stamp, "example_id": ex["id"],
                             "positions": t["positions"]},
                "normal_activations": {}, "steered_activations": {}, "difference_activations": {},
                "token_difference_activations": {},
                "tokens": token_texts(decoder, run.tokens(e).tolist()), "layer_correlations": {}}
            intensity = {}
            for L, (a, b) in views.items():
                x, y = example_rows(a, e), example_rows(b, e)
                d = y - x
                for key, arr in (("normal", x), ("steered", y), ("difference", d)):
                    doc[f"{key}_activations"][str(L)] = regions(arr.mean(0), n_regions).round(6).tolist()
                doc["token_difference_activations"][str(L)] = regions(d, n_regions).round(6).tolist()
                doc["layer_correlations"][str(L)] = round(correlation(d.mean(0), v), 6)
                intensity[L] = float(np.linalg.norm(d, axis=1).mean())
            doc["peak_activation_layer"] = max(intensity, key=intensity.get)
            doc["total_intensity"] = round(sum(intensity.values()), 6)
            doc["top_correlated_layers"] = sorted(intensity, key=lambda L: -doc["layer_correlations"][str(L)])[:3]
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(ex["id"]))
            (tmp / f"{target}_{e:05d}_{name}.json").write_text(json.dumps(doc), encoding="utf-8")
    return dest


def steered_runs(run_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in (run_dir / "steering").glob("*/summary.json"))
