"""Summaries for the dashboard: L2 norms of the residual-stream sites and of the difference between
variants (norms.py), per-neuron statistics, cards and logit effects (neurons.py, unembed.py), LoRA
neurons (lora.py), and the token texts they show.

The result is a dict of plain values and numpy arrays (``layerscope.packed`` writes it as JSON);
layerscope.web.page documents its shape. Everything is computed shard by shard, so memory stays
bounded whatever the run's size. Layers are independent: with ``workers`` > 1 their norms and
neuron statistics are computed in that many forked processes, and the results are put together
(docs, token texts, output tokens) here, in layer order, so the summary does not depend on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from layerscope.analysis import neurons as nz
from layerscope.analysis.lora import lora_summaries
from layerscope.analysis.norms import NORM_SITES, diff_norms, row_norms, site_norms
from layerscope.fileio import read_json, write_json
from layerscope.packed import pack, unpack
from layerscope.store.reader import Run

log = logging.getLogger("layerscope.analysis.summaries")

HIST_BINS = 32
RANGES = 5  # activation ranges a card samples one example from each (sae_vis's "samples across ranges")
TOKEN_TOP = 3  # neurons listed for a token x layer heatmap cell


# The run forked workers read: set before the pool forks, so children inherit it open (a Run, or a
# test's stand-in with its interface, need not be picklable).
_RUN: Any = None

# Bump when what a layer's cached result holds, or how it is computed, changes.
CACHE_FORMAT = 3
TEXTS_FILE = "texts.json"  # the token texts of the examples the last summary showed (LayerCache.texts)


def map_layers(run: Any, fn: Callable[[Any, Any], Any], layers: list[Any], workers: int, desc: str,
               unit: str = "layer") -> list[Any]:
    """``fn(run, L)`` for each layer (or other picklable ``unit`` of work), in order: in this
    process, or in ``workers`` forked ones."""
    global _RUN
    bar = partial(tqdm, total=len(layers), desc=desc, unit=unit, mininterval=1.0, disable=not layers)
    if workers <= 1 or len(layers) < 2:
        return [fn(run, L) for L in bar(layers)]
    _RUN = run
    try:
        # fork, not spawn: a Snakemake script is __main__, and spawn would run it again in each child
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(min(workers, len(layers)), _worker_start, (os.getpid(),)) as pool:
            return list(bar(pool.imap(partial(_call, fn), layers)))
    finally:
        _RUN = None


def _worker_start(parent: int) -> None:
    """In each forked worker: the job's SIGTERM handler (watchdog) would keep the pool from ending
    its idle workers, so plain signals; Ctrl-C is the parent's; and die with the parent, even killed."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _call(fn: Callable[[Any, Any], Any], layer: Any) -> Any:
    return fn(_RUN, layer)


class LayerCache:
    """Each layer's results from the run's earlier summaries, in ``directory``: reused where the
    layer's array has not been captured again since. The key holds the ids of the capture jobs
    that wrote the array (new ones at every capture), the run's splits and the settings the result
    depends on, so a stale entry is never read; entries no summary used are deleted by ``prune``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.used: set[str] = set()

    def key(self, run: Run, kind: str, layer: int, site: str, settings: dict[str, Any]) -> str:
        return self._digest({"kind": kind, "site": site, "layer": layer, "jobs": run.capture_jobs(layer, site),
                             "variant": run.variant, "splits": {k: list(v) for k, v in run.splits.items()},
                             "settings": settings})

    def load(self, kind: str, layer: int, site: str, key: str) -> Any:
        return self._read(self._name(kind, layer, site), key)

    def save(self, kind: str, layer: int, site: str, key: str, value: Any) -> None:
        self._write(self._name(kind, layer, site), key, value)

    def texts(self, run: Run, decoder: str) -> tuple[str, dict[int, list[str]]]:
        """The token texts of the examples the run's last summary showed, ``{example: pieces}``,
        with the key to save them under: valid while the run's tokens and ``decoder`` (the
        tokenizer's identity) are what they were. Decoding is most of what a summary that computes
        one layer again does besides that layer (1024 examples: 1.5 s in one process)."""
        tokens = hashlib.sha256(np.ascontiguousarray(run.offsets, np.int64).tobytes())
        ids = run.group["tokens/ids"]
        for a in range(0, ids.shape[0], 1 << 24):  # 64 MiB at a time, whatever the run's size
            tokens.update(np.ascontiguousarray(ids[a:a + (1 << 24)]).tobytes())
        key = self._digest({"kind": "texts", "decoder": decoder, "tokens": tokens.hexdigest()})
        value = self._read(TEXTS_FILE, key)
        try:
            return key, {} if value is None else dict(zip(value["examples"], value["pieces"]))
        except (KeyError, TypeError):  # an entry of another shape: none
            return key, {}

    def save_texts(self, key: str, pieces: dict[int, list[str]]) -> None:
        self._write(TEXTS_FILE, key, {"examples": list(pieces), "pieces": list(pieces.values())})

    def prune(self) -> None:
        for f in self.dir.glob("*.json"):
            if f.name not in self.used:
                f.unlink(missing_ok=True)

    @staticmethod
    def _digest(ident: dict[str, Any]) -> str:
        from layerscope import __version__

        ident = {"format": CACHE_FORMAT, "version": __version__, **ident}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()

    @staticmethod
    def _name(kind: str, layer: int, site: str) -> str:
        return f"{kind}_L{layer:03d}_{site}.json"

    def _read(self, name: str, key: str) -> Any:
        self.used.add(name)
        try:
            entry = read_json(self.dir / name)
        except (OSError, ValueError):
            return None
        return unpack(entry["value"]) if isinstance(entry, dict) and entry.get("key") == key else None

    def _write(self, name: str, key: str, value: Any) -> None:
        write_json(self.dir / name, {"key": key, "value": pack(value)}, indent=None)


def layer_results(run: Run, fn: Callable[[Any, int], Any], layers: list[int], workers: int, desc: str,
                  cache: LayerCache | None, kind: str, site: str, settings: dict[str, Any]) -> list[Any]:
    """``map_layers``, taking from ``cache`` the layers it holds and adding the ones computed."""
    if cache is None:
        return map_layers(run, fn, layers, workers, desc)
    keys = {L: cache.key(run, kind, L, site, settings) for L in layers}
    found = {L: v for L in layers if (v := cache.load(kind, L, site, keys[L])) is not None}
    todo = [L for L in layers if L not in found]
    if found:
        log.info("%s: %d of %d layers from the earlier summary (arrays not captured since)", desc, len(found),
                 len(layers))
    for L, v in zip(todo, map_layers(run, fn, todo, workers, desc)):
        cache.save(kind, L, site, keys[L], v)
        found[L] = v
    return [found[L] for L in layers]


def pick_examples(run: Run, n: int) -> list[int]:
    """Up to ``n`` examples, taken round-robin across splits so that every split is represented."""
    queues = [list(range(a, b)) for a, b in run.splits.values()]
    out: list[int] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return sorted(out)


def missing_heatmap(run: Run, heatmap_examples: int) -> str | None:
    """Why the run has no token x layer heatmap, naming the config keys that give one; None if it has one.
    Runs with norm sites at the last position only still get the layer x example view."""
    norm_arrays = [(L, s) for L, s in run.arrays if s in NORM_SITES]
    if not norm_arrays:
        return ("No heatmaps: none of resid_post, attn_out, mlp_out was captured; add one to capture.sites.")
    if not any(run.activations(L, s).per_token for L, s in norm_arrays):
        return ("No token x layer heatmap: the sites were captured at the last position only, so the page shows "
                "the layer x example view; capture them with capture.positions: all (or per layer in "
                "capture.overrides) for a token x layer view.")
    if heatmap_examples <= 0:
        return "No token x layer heatmap: dashboard.heatmap_examples is 0; set it above 0."
    return None


def missing_neurons(run: Run, site: str) -> str | None:
    """Why the run has no neuron index for ``site``, naming the config keys that give it; None if it has one."""
    if any(s == site for _, s in run.arrays):
        return None
    return (f"No neuron index: {site} (dashboard.site) was not captured; add {site} to capture.sites, "
            f"or set dashboard.site to a captured site ({', '.join(run.sites) or 'none'}).")


class Texts:
    """Token texts (one table of distinct strings) and docs: spans of examples as indices into it."""

    def __init__(self, run: Run, decoder: Any, cached: dict[int, list[str]] | None = None) -> None:
        from layerscope.data.tokens import TokenTexts

        self.run, self.pieces = run, TokenTexts(decoder)
        self.index: dict[str, int] = {}
        self.cache: dict[int, list[int]] = {}
        # pieces decoded ahead (decode_ahead) or ``cached`` (an earlier summary's), not yet in the table
        self.decoded: dict[int, list[str]] = dict(cached or {})
        self.docs: dict[tuple[int, int, int], int] = {}
        self.examples: dict[int, int] = {}

    def decode_ahead(self, examples: Any, workers: int) -> None:
        """Decode ``examples``' tokens in ``workers`` forked processes, for the docs that will show them:
        decoding is most of what the summary does after its layers, in one process otherwise (a
        1024-example summary: 1.5 s). The table of texts fills in ``doc``'s order all the same."""
        todo = sorted({int(e) for e in examples} - self.cache.keys() - self.decoded.keys())
        if workers <= 1 or len(todo) < 2:
            return
        batches = [todo[i::4 * workers] for i in range(min(len(todo), 4 * workers))]
        for batch, pieces in zip(batches, map_layers(self, _decode_batch, batches, workers, "token texts", "batch")):
            self.decoded.update(zip(batch, pieces))

    def text(self, s: str) -> int:
        return self.index.setdefault(s, len(self.index))

    def shown(self) -> dict[int, list[str]]:
        """The pieces of every example a doc shows, by example."""
        texts = list(self.index)
        return {e: [texts[i] for i in idx] for e, idx in self.cache.items()}

    def example(self, e: int) -> int:
        """Row of example ``e`` in the examples table."""
        return self.examples.setdefault(int(e), len(self.examples))

    def doc(self, e: int, start: int = 0, end: int | None = None) -> int:
        """Index of the doc holding tokens [start, end) of example e (default: all of it)."""
        if e not in self.cache:
            pieces = self.decoded.pop(e, None)
            self.cache[e] = [self.text(t) for t in (pieces if pieces is not None else self.pieces(self.run.tokens(e)))]
        key = (int(e), int(start), len(self.cache[e]) if end is None else int(end))
        self.example(e)
        return self.docs.setdefault(key, len(self.docs))

    def token_texts(self, ids: np.ndarray) -> np.ndarray:
        """Text-table indices of single vocabulary tokens (each decoded alone)."""
        out = np.empty(ids.shape, np.int64)
        for i, t in np.ndenumerate(ids):
            try:
                piece = "".join(self.pieces([int(t)]))
            except Exception:  # an id past the tokenizer's vocabulary (padded lm_head)
                piece = f"<id {int(t)}>"
            out[i] = self.text(piece)
        return out

    def tables(self) -> dict[str, Any]:
        """``texts``, ``examples`` (id, split index, token count) and ``docs`` (columnar)."""
        splits = list(self.run.splits)
        ex = sorted(self.examples, key=self.examples.get)
        keys = sorted(self.docs, key=self.docs.get)
        toks = [np.asarray(self.cache[e][a:b], np.int64) for e, a, b in keys]
        return {"texts": list(self.index),
                "examples": {"index": np.array(ex, np.int64),
                             "id": [str(self.run.examples[e]["id"]) for e in ex],
                             "split": np.array([splits.index(self.run.examples[e]["split"]) for e in ex], np.int64),
                             "n_tokens": np.array([int(self.run.offsets[e + 1] - self.run.offsets[e]) for e in ex],
                                                  np.int64)},
                "docs": {"example": np.array([self.examples[e] for e, _, _ in keys], np.int64),
                         "start": np.array([a for _, a, _ in keys], np.int64),
                         "offsets": np.concatenate([[0], np.cumsum([len(t) for t in toks])]).astype(np.int64),
                         "toks": np.concatenate(toks) if toks else np.zeros(0, np.int64)}}


def _decode_batch(texts: Texts, batch: list[int]) -> list[list[str]]:
    """The token texts of each example of ``batch`` (in a forked worker: ``texts`` is inherited)."""
    return [texts.pieces(texts.run.tokens(e)) for e in batch]


def other_variants(run: Run) -> list[Run]:
    """The run's other variants (``base`` beside an adapter), each checked to hold the same tokens."""
    from layerscope.analysis.compare import check_same_tokens

    out = []
    for name in list(getattr(run, "variants", {}))[1:]:
        other = Run(run.path, name)
        check_same_tokens(run, other)
        out.append(other)
    return out


def _layer_norms(site: str, run: Run, layer: int) -> np.ndarray:
    return row_norms(run.activations(layer, site))


def token_heatmap_examples(run: Run, chosen: list[int]) -> list[int]:
    """The examples of the token x layer heatmap: ``chosen``, where a norm site has a row per token."""
    per_token = any(run.activations(L, s).per_token for L, s in run.arrays if s in NORM_SITES)
    return chosen if per_token else []


def norm_summaries(run: Run, texts: Texts, chosen: list[int], token_examples: list[int], example_columns: int,
                   workers: int = 1, cache: LayerCache | None = None,
                   known: dict[tuple[int, str], np.ndarray] | None = None) -> dict[str, Any]:
    """The heatmaps' data for every norm site the run captured (see norms.site_norms), for the
    ``chosen`` examples; ``token_examples``: theirs that the token x layer heatmap shows
    (token_heatmap_examples). ``known``: norms already computed, by (layer, site) (the neuron scan's)."""
    known = known or {}
    columns = pick_examples(run, example_columns)
    sites = {}
    for site in NORM_SITES:
        layers = [L for L, s in run.arrays if s == site]
        if layers:
            log.info("norms of %s", site)
            todo = [L for L in layers if (L, site) not in known]
            norms = dict(zip(todo, layer_results(run, partial(_layer_norms, site), todo, workers, f"norms {site}",
                                                 cache, "norms", site, {})))
            norms.update({L: known[L, site] for L in layers if L not in norms})
            sites[site] = site_norms(run, site, chosen, columns, norms_of=norms.pop)
    for other in other_variants(run):
        for site in NORM_SITES:
            log.info("norms of %s: %s - %s", site, run.variant, other.variant)
            v = diff_norms(run, other, site, chosen, columns)
            if v is not None:
                sites[f"{site}:{run.variant}-{other.variant}"] = v
    return {"sites": sites, "token_docs": [texts.doc(e) for e in token_examples],
            "columns": np.array([texts.example(e) for e in columns], np.int64)}


def _layer_neurons(site: str, top_k: int, context: int, neurons_per_layer: int, token_examples: list[int],
                   run: Run, layer: int) -> dict[str, Any]:
    """One layer's neuron statistics and cards. Its entries' ``doc`` index ``spans``, the (example,
    start, end) spans they show, for the caller to turn into docs (Texts lives in one process). A norm
    site's scan also gives its rows' norms (``norms``), sparing the heatmap a second read of the array."""
    acts = run.activations(layer, site)
    sc = nz.scan(run, acts, top_k, norms=site in NORM_SITES)
    best, sel = sc.selectivity(np.array([acts.map.offsets[b] - acts.map.offsets[a]  # rows per split
                                         for a, b in run.splits.values()]))
    cards = nz.pick_cards(sc, sel, neurons_per_layer)
    lo, hi = sc.min[cards], sc.max[cards]
    out: dict[str, Any] = {"width": acts.width, "positions": acts.positions, "max": sc.max, "min": sc.min,
                           "mean": sc.mean, "sd": sc.sd, "split_mean": sc.split_mean, "best": best, "sel": sel,
                           "cards": cards, "hist_lo": lo, "hist_hi": hi,
                           "hist": nz.histograms(acts, cards, lo, hi, HIST_BINS)}
    spans: list[tuple[int, int, int]] = []

    def span(e: int, a: int, b: int) -> int:
        spans.append((int(e), int(a), int(b)))
        return len(spans) - 1

    out["entries"], out["ctx"] = nz.card_entries(run, acts, cards, sc.top_e[cards], sc.bot_e[cards], context,
                                                 span, nz.range_samples(run, acts, cards, RANGES))
    token_top = None
    if acts.positions == "all" and token_examples:
        ids, vals = nz.token_top(acts, token_examples, TOKEN_TOP)
        token_top = {"ids": ids, "values": vals}
    # one packed array, not thousands of JSON lists: the per-layer cache reads it back in one go
    return {"out": out, "spans": np.array(spans, np.int64).reshape(-1, 3), "token_top": token_top,
            "norms": sc.norms}


def neuron_layers(run: Run, site: str, top_k: int, context: int, neurons_per_layer: int,
                  token_examples: list[int], workers: int = 1, cache: LayerCache | None = None) -> dict[int, Any]:
    """``_layer_neurons`` of every layer that captured ``site``, by layer (from ``cache`` where it holds them)."""
    wanted = [L for L, s in run.arrays if s == site]
    fn = partial(_layer_neurons, site, top_k, context, neurons_per_layer, token_examples)
    settings = {"top_k": top_k, "context": context, "cards": neurons_per_layer, "token_examples": token_examples,
                "bins": HIST_BINS, "ranges": RANGES, "token_top": TOKEN_TOP}
    return dict(zip(wanted, layer_results(run, fn, wanted, workers, f"neurons {site}", cache, "neurons", site,
                                          settings)))


def neuron_summaries(texts: Texts, site: str, top_k: int, context: int, neurons_per_layer: int,
                     output_tokens: int, results: dict[int, Any], unembed: Any) -> dict[str, Any]:
    """Index statistics of every neuron of ``site``, and cards for ``neurons_per_layer`` per layer, from
    ``neuron_layers``' ``results``: their spans become docs, their cards get output tokens."""
    layers: dict[str, Any] = {}
    token_top: dict[str, Any] = {}
    for L, r in results.items():
        out, cards = r["out"], r["out"]["cards"]
        docs = np.array([texts.doc(*sp) for sp in r["spans"].tolist()], np.int64)
        out["entries"]["doc"] = docs[out["entries"]["doc"]] if len(docs) else out["entries"]["doc"]
        if unembed is not None and len(cards):
            up, up_v, down, down_v = unembed.logit_effects(L, cards, output_tokens)
            out.update(out_up=texts.token_texts(up), out_up_v=up_v.astype(np.float32),
                       out_down=texts.token_texts(down), out_down_v=down_v.astype(np.float32))
        if r["token_top"] is not None:
            token_top[str(L)] = r["token_top"]
        layers[str(L)] = out
    return {"site": site, "k": top_k, "context": context, "bins": HIST_BINS, "cards_per_layer": neurons_per_layer,
            "layers": layers, "token_top": token_top}


def summarize(run_dir: str, site: str = "mlp_act", top_k: int = 10, context: int = 8, neurons_per_layer: int = 64,
              heatmap_examples: int = 20, example_columns: int = 512, output_tokens: int = 10,
              budget_mib: float = 10, trust_remote_code: bool = False, workers: int = 1,
              cache_dir: str | None = None) -> dict[str, Any]:
    """Build the dashboard's summary dict for a finished run directory (its shape: layerscope.web.page).
    ``budget_mib`` is the page's, applied when the page is written; recorded here for it. ``workers``:
    processes computing layers at once. ``cache_dir``: where each layer's results are kept for the
    next summary of this run, which computes again only the layers captured since (LayerCache)."""
    from layerscope.data.tokens import load_decoder
    from layerscope.fileio import read_json

    run = Run(run_dir)
    manifest = read_json(run.path / "model" / "manifest.json")
    adapter_json = run.path / "model" / "adapter.json"
    if adapter_json.is_file():
        manifest = {**manifest, "adapter": read_json(adapter_json).get("adapter")}
    unembed, note = None, None
    if site == "mlp_act" and output_tokens > 0:
        from layerscope.analysis.unembed import Unembedding

        try:
            unembed = Unembedding(manifest)
        except (OSError, ValueError, KeyError) as e:  # an odd checkpoint layout: say so, keep the rest
            note = f"No output tokens: the unembedding could not be read from the checkpoint ({e})."
    elif site != "mlp_act":
        note = f"No output tokens: they are defined for mlp_act neurons, not {site}."
    else:
        note = "No output tokens: dashboard.output_tokens is 0."
    # the tokenizer's identity for the token texts' cache: the model directory's files as fetched
    files = manifest["model"].get("files")
    decoder_id = json.dumps([files, trust_remote_code], sort_keys=True) if files else None
    return build_summary(run, load_decoder(manifest, trust_remote_code), unembed, site=site, top_k=top_k,
                         context=context, neurons_per_layer=neurons_per_layer, heatmap_examples=heatmap_examples,
                         example_columns=example_columns, output_tokens=output_tokens, budget_mib=budget_mib,
                         output_note=note, workers=workers, cache=LayerCache(cache_dir) if cache_dir else None,
                         decoder_id=decoder_id)


def build_summary(run: Run, decoder: Any, unembed: Any, site: str, top_k: int, context: int, neurons_per_layer: int,
                  heatmap_examples: int, example_columns: int, output_tokens: int, budget_mib: float,
                  output_note: str | None = None, workers: int = 1, cache: LayerCache | None = None,
                  decoder_id: str | None = None) -> dict[str, Any]:
    """The summary of ``run`` (a Run, or anything with its interface), token texts from ``decoder``,
    output tokens from ``unembed`` (an analysis.unembed.Unembedding, or None). With a ``cache``
    and the decoder's identity (``decoder_id``), the token texts of examples the last summary
    showed are taken from it."""
    md = run.metadata
    texts_key, cached_texts = cache.texts(run, decoder_id) if cache is not None and decoder_id else (None, {})
    texts = Texts(run, decoder, cached_texts)
    notes = {"heatmap": missing_heatmap(run, heatmap_examples), "neurons": missing_neurons(run, site)}
    for note in notes.values():
        if note:
            log.warning("%s", note)
    chosen = pick_examples(run, heatmap_examples)
    token_examples = token_heatmap_examples(run, chosen)
    # the neuron scan first: for a norm site it gives the heatmap's norms too (one read of each layer)
    results = None
    if notes["neurons"] is None:
        results = neuron_layers(run, site, top_k, context, neurons_per_layer, token_examples, workers, cache)
    texts.decode_ahead(np.concatenate([token_examples, *(r["spans"][:, 0] for r in (results or {}).values())]),
                       workers)
    known = {(L, site): r["norms"] for L, r in (results or {}).items() if r["norms"] is not None}
    norms = norm_summaries(run, texts, chosen, token_examples, example_columns, workers, cache, known)
    neurons = None
    if results is not None:
        neurons = neuron_summaries(texts, site, top_k, context, neurons_per_layer, output_tokens, results, unembed)
        notes["output_tokens"] = output_note if unembed is None else None
    if cache is not None:
        cache.prune()
    lora = lora_summaries(run, texts.doc, top_k, context)
    adapter = md.get("adapter")
    meta = {"model": md["model_name"], "revision": md.get("model_revision"),
            "adapter": adapter["name"] if adapter else None, "dataset": md["dataset_name"],
            "examples": md["total_examples"], "tokens": md["total_tokens"],
            "splits": ", ".join(f"{k} ({v['examples']})" for k, v in md["splits"].items()),
            "layers": md["num_layers"], "hidden": md["hidden_dim"], "dtype": md["dtype"],
            "created": md["created"], "layerscope": md["layerscope_version"]}
    tables = texts.tables()
    log.info("summary: %d docs, %d distinct token texts", len(texts.docs), len(tables["texts"]))
    if texts_key is not None and (shown := texts.shown()).keys() != cached_texts.keys():
        cache.save_texts(texts_key, shown)
    # the browser keeps interpretations per run under this key (page: localStorage)
    run_key = "|".join(str(x) for x in (run.path.name, md["model_name"], meta["adapter"], md["dataset_name"]))
    return {"version": 3, "title": f"LayerScope: {run.path.name}", "meta": meta, "run_key": run_key,
            "budget_mib": budget_mib, "splits": list(run.splits),
            "split_sizes": [b - a for a, b in run.splits.values()],
            **tables, "norms": norms, "neurons": neurons, "lora": lora, "notes": notes}
