"""What a steered run did downstream: the difference from the normal run, layer by layer.

The difference arrays are not stored: steered minus normal is computed by the reader from the
two stores when asked (a third copy of every array would cost as much disk as the steered run
itself, and it is one subtraction away).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from layerscope.store.reader import Activations, Run


def regions(x: np.ndarray, n: int) -> np.ndarray:
    """Downsample the last axis into ``n`` regions, each the mean of its (near-equal) run of dims."""
    bounds = np.linspace(0, x.shape[-1], n + 1).round().astype(int)
    sums = np.add.reduceat(x, bounds[:-1], axis=-1)
    return sums / np.diff(bounds)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else 0.0


def layer_views(normal: Run, steered: Run, layer: int) -> tuple[Activations, Activations]:
    """resid_post at ``layer`` of the normal and the steered run; below the steered run's first
    block the two runs are the same stream, so the normal view stands for both."""
    a = normal.activations(layer, "resid_post")
    return a, steered.activations(layer, "resid_post") if (layer, "resid_post") in steered.arrays else a


def example_rows(view: Activations, e: int) -> np.ndarray:
    """Example ``e``'s rows as float64 [rows, width] (one row for a last-position array)."""
    return np.atleast_2d(np.asarray(view[e], dtype=np.float64))


def pairs(normal: Run, steered: Run, layer: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(example, normal rows, steered rows) of resid_post at ``layer``."""
    a, b = layer_views(normal, steered, layer)
    for i in range(len(a)):
        yield i, example_rows(a, i), example_rows(b, i)


def summarize(run_dir: str | os.PathLike, target: dict[str, Any], vector: np.ndarray, n_regions: int = 64,
              top: int = 3) -> dict[str, Any]:
    """Per layer over every token of the run: correlation of the mean difference with the injected
    vector, mean L2 norm of the difference; the peak layer, total intensity, top correlated layers,
    and per layer the mean normal / steered / difference in ``n_regions`` regions."""
    normal, steered = Run(run_dir), Run(run_dir, f"steer-{target['name']}")
    layers = [L for L in normal.layers if (L, "resid_post") in normal.arrays]
    out: dict[str, Any] = {"target": target, "layers": layers, "correlation": {}, "intensity": {},
                           "regions": {"normal": {}, "steered": {}, "difference": {}}, "n_regions": n_regions}
    for L in layers:
        v = vector if vector.ndim == 1 else vector[target["layer"]]
        sums = {k: np.zeros(normal.metadata["hidden_dim"]) for k in ("normal", "steered", "difference")}
        norm_sum, rows = 0.0, 0
        for _, x, y in pairs(normal, steered, L):
            d = y - x
            sums["normal"] += x.sum(0)
            sums["steered"] += y.sum(0)
            sums["difference"] += d.sum(0)
            norm_sum += float(np.linalg.norm(d, axis=1).sum())
            rows += len(d)
        out["correlation"][L] = correlation(sums["difference"] / max(rows, 1), v.astype(np.float64))
        out["intensity"][L] = norm_sum / max(rows, 1)
        for k, s in sums.items():
            out["regions"][k][L] = regions(s / max(rows, 1), n_regions).round(6).tolist()
    out["peak_layer"] = max(layers, key=lambda L: out["intensity"][L])
    out["total_intensity"] = float(sum(out["intensity"].values()))
    out["top_correlated_layers"] = sorted(layers, key=lambda L: -out["correlation"][L])[:top]
    return out


def page_data(run_dir: str | os.PathLike, summary: dict[str, Any], examples: int = 8) -> dict[str, Any]:
    """What the steering page shows, for the first ``examples`` examples: per layer and token the L2
    norm of the normal, steered and difference streams, and the difference in regions (for the
    layer x region x token view); plus the summary's per-layer curves. The tokens are those every
    layer holds: all of them, the last one where a layer holds one row per example, a span's."""
    from layerscope.data.tokens import load_decoder, token_texts
    from layerscope.fileio import read_json

    t = summary["target"]
    normal, steered = Run(run_dir), Run(run_dir, f"steer-{t['name']}")
    layers = summary["layers"]
    decoder = load_decoder(read_json(normal.path / "model" / "manifest.json"))
    n_regions = summary["n_regions"]
    docs = []
    views = [layer_views(normal, steered, L) for L in layers]
    for e in range(min(examples, len(normal))):
        # the tokens every layer holds: all of them, the last (or answer) token, or a span's
        held = [a.map.positions_of(np.arange(a.map.offsets[e], a.map.offsets[e + 1])) for a, _ in views]
        keep = held[0]
        for h in held[1:]:
            keep = np.intersect1d(keep, h)
        norms = np.zeros((3, len(layers), len(keep)), dtype=np.float32)
        reg = np.zeros((len(layers), n_regions, len(keep)), dtype=np.float32)
        for li, (a, b) in enumerate(views):
            sel = np.searchsorted(held[li], keep)
            x, y = example_rows(a, e)[sel], example_rows(b, e)[sel]
            d = y - x
            norms[:, li] = [np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1), np.linalg.norm(d, axis=1)]
            reg[li] = regions(d, n_regions).T
        texts = token_texts(decoder, normal.tokens(e).tolist())
        docs.append({"id": normal.examples[e]["id"], "split": normal.examples[e]["split"],
                     "tokens": [texts[int(p)] for p in keep], "norms": norms, "regions": reg})
    return {"target": t, "model": normal.metadata["model_name"], "layers": layers,
            "correlation": [summary["correlation"][str(L)] if str(L) in summary["correlation"]
                            else summary["correlation"][L] for L in layers],
            "intensity": [summary["intensity"][str(L)] if str(L) in summary["intensity"] else summary["intensity"][L]
                          for L in layers],
            "peak_layer": summary["peak_layer"], "total_intensity": summary["total_intensity"],
            "n_regions": n_regions, "examples": docs}
