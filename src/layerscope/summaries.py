"""Summaries for the dashboard: residual-stream norms per token x layer, and top/bottom-k tokens per neuron.

Everything is computed shard by shard, so memory stays bounded whatever the run's size.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from layerscope.reader import Run

log = logging.getLogger("layerscope.summaries")


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def pick_examples(run: Run, n: int) -> list[int]:
    """Up to ``n`` examples, taken round-robin across splits so that every split is represented."""
    queues = [list(range(a, b)) for a, b in run.splits.values()]
    out: list[int] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return sorted(out)


def neuron_extremes(acts, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per neuron, the k highest and k lowest values and their rows: (top_v, top_r, bot_v, bot_r), [width, k]."""
    width = acts.width
    top_v = torch.full((0, width), -math.inf)
    top_r = torch.zeros((0, width), dtype=torch.long)
    bot_v = torch.full((0, width), math.inf)
    bot_r = torch.zeros((0, width), dtype=torch.long)
    for (r0, r1), block in acts.iter_shards():
        x = torch.from_numpy(np.asarray(block, dtype=np.float32))
        x = torch.nan_to_num(x, nan=0.0)
        rows = torch.arange(r0, r1).unsqueeze(1).expand(-1, width)
        cv, cr = torch.cat([top_v, x]), torch.cat([top_r, rows])
        kk = min(k, cv.shape[0])
        v, i = torch.topk(cv, kk, dim=0)
        top_v, top_r = v, torch.gather(cr, 0, i)
        cv, cr = torch.cat([bot_v, x]), torch.cat([bot_r, rows])
        v, i = torch.topk(cv, kk, dim=0, largest=False)
        bot_v, bot_r = v, torch.gather(cr, 0, i)
    return top_v.T.numpy(), top_r.T.numpy(), bot_v.T.numpy(), bot_r.T.numpy()


def summarize(run_dir: str, site: str = "mlp_act", top_k: int = 10, context: int = 8, neurons_per_layer: int = 64,
              heatmap_examples: int = 20, trust_remote_code: bool = False) -> dict[str, Any]:
    """Build the dashboard's summary dict (see layerscope.dashboard for its shape)."""
    from layerscope.fileio import read_json
    from layerscope.models import load_tokenizer
    from layerscope.tokens import token_texts

    run = Run(run_dir)
    md = run.metadata
    tokenizer = load_tokenizer(read_json(run.path / "model" / "manifest.json"), trust_remote_code)
    doc_index: dict[tuple[int, int, int], int] = {}
    docs: list[dict[str, Any]] = []
    texts: list[str] = []
    text_index: dict[str, int] = {}
    token_cache: dict[int, list[int]] = {}

    def doc(e: int, start: int = 0, end: int | None = None) -> int:
        """Index of the doc holding tokens [start, end) of example e (the whole example by default).
        Neuron entries keep only their context window, so the page stays small for long examples."""
        if e not in token_cache:
            toks = []
            for t in token_texts(tokenizer, run.tokens(e)):
                if t not in text_index:
                    text_index[t] = len(texts)
                    texts.append(t)
                toks.append(text_index[t])
            token_cache[e] = toks
        toks = token_cache[e]
        key = (e, start, len(toks) if end is None else end)
        if key not in doc_index:
            ex = run.examples[e]
            doc_index[key] = len(docs)
            docs.append({"id": ex["id"], "split": ex["split"], "start": start, "toks": toks[key[1]:key[2]]})
        return doc_index[key]

    heatmap = None
    resid_layers = [L for L, s in run.arrays if s == "resid_post"
                    and run.activations(L, s).positions == "all"]
    if resid_layers and heatmap_examples > 0:
        chosen = pick_examples(run, heatmap_examples)
        norms = [[[] for _ in resid_layers] for _ in chosen]
        for j, L in enumerate(tqdm(resid_layers, desc="heatmap", unit="layer", mininterval=1.0)):
            acts = run.activations(L, "resid_post")
            for i, e in enumerate(chosen):
                x = acts.example(e).astype(np.float32)
                norms[i][j] = [_finite(v) for v in np.linalg.norm(x, axis=1)]
        heatmap = {"site": "resid_post", "layers": resid_layers, "docs": [doc(e) for e in chosen], "norms": norms}

    neurons = None
    site_layers = [L for L, s in run.arrays if s == site]
    if site_layers:
        layers_out = {}
        for L in tqdm(site_layers, desc=f"top-k {site}", unit="layer", mininterval=1.0):
            acts = run.activations(L, site)
            top_v, top_r, bot_v, bot_r = neuron_extremes(acts, top_k)
            # Neurons with the largest activation range are the ones worth looking at first.
            spread = np.nan_to_num(top_v[:, 0] - bot_v[:, 0], nan=-1.0)
            ids = np.sort(np.argsort(-spread, kind="stable")[:neurons_per_layer])

            def entries(vals, rows_, n):
                out = []
                for v, r in zip(vals[n], rows_[n]):
                    if not math.isfinite(v):
                        continue
                    if acts.positions == "all":
                        e = int(np.searchsorted(run.offsets, r, side="right")) - 1
                        pos = int(r - run.offsets[e])
                    else:
                        e, pos = int(r), int(run.offsets[r + 1] - run.offsets[r] - 1)
                    n_tok = int(run.offsets[e + 1] - run.offsets[e])
                    w0, w1 = max(0, pos - context), min(n_tok, pos + context + 1)
                    out.append([doc(e, w0, w1), pos - w0, _finite(v)])
                return out

            layers_out[str(L)] = {"ids": [int(n) for n in ids], "top": [entries(top_v, top_r, n) for n in ids],
                                  "bottom": [entries(bot_v, bot_r, n) for n in ids]}
        neurons = {"site": site, "k": top_k, "context": context, "layers": layers_out}

    adapter = md.get("adapter")
    meta = {"model": md["model_name"], "revision": md.get("model_revision"),
            "adapter": adapter["name"] if adapter else None, "dataset": md["dataset_name"],
            "examples": md["total_examples"], "tokens": md["total_tokens"],
            "splits": ", ".join(f"{k} ({v['examples']})" for k, v in md["splits"].items()),
            "layers": md["num_layers"], "hidden": md["hidden_dim"], "dtype": md["dtype"],
            "created": md["created"], "layerscope": md["layerscope_version"]}
    log.info("summary: %d docs, %d distinct token texts", len(docs), len(texts))
    return {"title": f"LayerScope: {run.path.name}", "meta": meta, "texts": texts, "docs": docs,
            "heatmap": heatmap, "neurons": neurons}
