"""A capture job: run one block of decoder layers over one part of the examples.

The job reads the residual stream entering its block (or starts from the embeddings), stops
the forward pass after the last layer it needs, and hands the stream leaving the block to the
job above. Forward hooks give each captured array's rows to its router (router.py), which
streams them into shard files. Variants (the adapter's model, the base model without it, and
the model with one of the more adapters active instead, whose LoRA sites are its own) run on the
same tokens from the same load, one forward pass each per batch, into their own stores and
boundaries.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from layerscope.capture import sites as S
from layerscope.capture.batches import Window, batch_arrays, padding, plan_windows, runs
from layerscope.capture.chain import Boundary, BoundaryWriter, part_examples
from layerscope.capture.journal import Journal, progress_dir
from layerscope.capture.partial import load_block, weight_bytes
from layerscope.capture.router import ArrayJob, BufferPool, Router
from layerscope.config import Block, dumps_stable
from layerscope.data.dataset import load_answer_index, load_spans, load_tokens
from layerscope.errors import DataError, ModelError
from layerscope.models.adapters import LORA_SITES, split_site
from layerscope.models.architectures import Widths, chain_widths
from layerscope.models.loading import resolve_device, resolve_dtype
from layerscope.store.layout import STORAGE_DTYPES, array_metadata, make_layout, prepare_array, write_marker
from layerscope.store.rows import PER_EXAMPLE, RowMap, array_rows, is_span, row_dim, span_names
from layerscope.store.shards import chunk_encoder, direct_io_supported, shard_key
from layerscope.store.writer import ShardWriter

log = logging.getLogger("layerscope.capture.run")

WRITER_THREADS = 4
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def main_variant(manifest: dict[str, Any]) -> str:
    """The variant a run's main store holds: the adapter's model where there is one, else the model."""
    return "adapter" if manifest.get("adapter") else "base"


@dataclass
class Variant:
    """One forward pass per batch of a job: what it captures, into which store, along which chain."""

    name: str
    root: Path
    captures: list[tuple[int, str, str]]
    boundary_in: str | os.PathLike | None = None
    boundary_out: str | os.PathLike | None = None
    jobs: list[ArrayJob] = field(default_factory=list)
    chain: "Chain | None" = None
    adapter: str | None = None  # one of the more adapters: the PEFT adapter active in its pass, whose LoRA it captures


def plan_arrays(captures: list[tuple[int, str, str]], params: dict[str, Any], widths: Widths,
                rows: dict[str, RowMap], part: int) -> list[ArrayJob]:
    """This part's share of every array in ``captures`` ((layer, site, positions) triples); ``rows``:
    each position mode's rows (store/rows.py)."""
    st = params["store"]
    itemsize = STORAGE_DTYPES[params["dtype"]].itemsize
    jobs = []
    for layer, site, pos in captures:
        width = widths.site(layer, site)
        lay = make_layout(rows[pos].n_rows, width, itemsize, params["parts"], st["chunk_mib"], st["shard_mib"])
        r0, r1 = lay.part_range(part)
        jobs.append(ArrayJob(layer, site, pos, lay, r0, r1))
    return jobs


def resume_arrays(jobs: list[ArrayJob], journal: Journal, part: int) -> None:
    """Keep the shards a killed attempt finished: the leading run of each array's part whose files are in place."""
    for j in jobs:
        done = journal.shards.get(j.name, {})
        for s in j.layout.shard_range(part):
            if s not in done or not shard_key(j.array_dir, s).is_file():
                break
            j.kept[s] = done[s]
            j.start = min(j.r1, (s + 1) * j.layout.shard_rows)
        j.written = sorted(j.kept)


def first_window(windows: list[Window], jobs: list[ArrayJob], rows: dict[str, RowMap],
                 boundary_windows: int | None) -> int:
    """The first window that an unfinished shard or boundary still needs (``len(windows)``: none).

    Windows keep the uninterrupted run's batches, so the recomputed rows are the same bytes.
    """
    k = len(windows) if boundary_windows is None else boundary_windows
    for j in jobs:
        if j.start < j.r1:
            e = int(rows[j.positions].examples_of(np.array([j.start]))[0])
            k = min(k, next(i for i, w in enumerate(windows) if w.e1 > e))
    return k


def row_maps(dataset_dir: str | os.PathLike, offsets: np.ndarray, answer_index: np.ndarray, positions: set[str],
             spans: list | None) -> dict[str, RowMap]:
    """The rows of each position mode in ``positions``; refuses a span no example records."""
    out = {}
    for pos in positions:
        if is_span(pos):
            if spans is None or pos not in span_names(spans):
                raise DataError(f"{dataset_dir}: no example records the span {pos!r} (its examples record "
                                f"{', '.join(sorted(span_names(spans or []))) or 'no spans'}; role spans need a fast "
                                "tokenizer's character offsets), so its arrays would hold nothing")
        out[pos] = array_rows(pos, offsets, spans, answer_index, where=f"{dataset_dir}: ")
    return out


def run_capture(manifest: dict[str, Any], dataset_dir: str | os.PathLike, store_root: str | os.PathLike,
                params: dict[str, Any], part: int, captures: list[tuple[int, str, str]], device: str = "auto",
                boundary_in: str | os.PathLike | None = None, boundary_out: str | os.PathLike | None = None,
                group: str = "", loaded: tuple[Any, Any] | None = None,
                variants: dict[str, dict[str, Any]] | None = None, steer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run decoder layers ``params["block"]`` over this part of the examples: capture ``captures``
    into the store (with completion markers), read the residual stream entering the block from
    ``boundary_in`` (None: start from the embeddings) and write the one leaving it to ``boundary_out``.

    ``variants``: more forward passes on the same tokens, by name (``base``: the adapter
    disabled; a name in ``manifest["adapters"]``: that adapter active instead, its LoRA sites
    read from its own A and B with its own ranks), each ``{"store_root", "captures",
    "boundary_in", "boundary_out"}``.
    ``steer``: a steered run (``{"name", "layer", "strength", "positions", "vector"}``): the
    vector times the strength is added to the residual stream leaving ``layer`` (if this block
    holds it; above it, the steered stream arrives through the boundaries). A steered chain
    starts from the normal run's boundary entering the block that holds the layer.
    ``loaded`` is an already loaded (model, tokenizer) pair on ``device``, to skip loading.
    """
    t_start = time.perf_counter()
    normal_params = params
    if steer is not None:
        if variants:
            raise ModelError("capture: a steered run has no variants")
        vec = np.ascontiguousarray(steer["vector"], dtype=np.float32)
        if vec.shape != (manifest["model"]["hidden_size"],):
            raise ModelError(f"steering {steer['name']}: vector of shape {list(vec.shape)}, the model's residual "
                             f"stream is {manifest['model']['hidden_size']} wide")
        steer = {**steer, "vector": vec}
        # what the steered stream is computed from: its boundaries must not pass for the normal ones
        params = {**params, "steer": {k: v for k, v in steer.items() if k != "vector"}
                  | {"vector_sha256": hashlib.sha256(vec.tobytes()).hexdigest()}}
    m = manifest["model"]
    start, end = params["block"]
    if not 0 <= start <= end < m["num_layers"]:
        raise ModelError(f"capture: layers {start}..{end} are out of range for model {m['id']} with "
                         f"{m['num_layers']} layers; re-plan the workflow")
    token_ids, offsets = load_tokens(dataset_dir)
    answer_index = load_answer_index(dataset_dir, offsets)
    n_ex = len(offsets) - 1
    main = main_variant(manifest) if steer is None else f"steer-{steer['name']}"
    more = manifest.get("adapters") or {}
    vs = [Variant(main, Path(store_root), captures, boundary_in, boundary_out)]
    for name, v in (variants or {}).items():
        known = ("base", *more) if main == "adapter" else ()
        if name == main or name not in known:
            raise ModelError(f"capture: no variant {name!r} for this job (its main store holds {main!r}; "
                             f"variants: {', '.join(known) or 'none'})")
        if name == "base" and any(split_site(s)[0] in LORA_SITES for _, s, _ in v["captures"]):
            raise ModelError("capture: the base variant runs without the adapter: it has no LoRA sites")
        vs.append(Variant(name, Path(v["store_root"]), v["captures"], v.get("boundary_in"), v.get("boundary_out"),
                          adapter=name if name in more else None))
    positions = {p for v in vs for _, _, p in v.captures}
    # The examples' spans decide the rows of span arrays, and where any part's rows begin (the
    # examples a part computes count every layout, see part_examples); a run of one part
    # computes every example whatever its layouts.
    recorded = load_spans(dataset_dir) if params["parts"] > 1 or any(map(is_span, positions)) else None
    rows = row_maps(dataset_dir, offsets, answer_index, positions, recorded)
    # Every variant's arrays are cut from the same example spans, so they cover every variant's widths.
    spans = part_examples(offsets, chain_widths(manifest), params["dtype"], params["parts"], params["store"], part,
                          recorded)
    for v in vs:
        # a more adapter's LoRA sites have its own modules and ranks; every other pass has the main adapter's
        v.jobs = plan_arrays(v.captures, params, Widths.of(manifest, v.adapter), rows, part)
        for j in v.jobs:
            j.array_dir = v.root / f"layer_{j.layer:02d}" / j.site
            j.variant = "" if v.name == main else v.name
        # the first block of a steered chain reads the normal run's boundary
        first_steered = steer is not None and start <= steer["layer"]
        v.chain = Chain(manifest, params, offsets, spans, v.boundary_in, v.boundary_out, v.name,
                        input_key=(normal_params, main_variant(manifest)) if first_steered else None)
    jobs = [j for v in vs for j in v.jobs]
    journal = Journal(progress_dir(store_root), f"{group or 'capture'}_part{part}",
                      progress_key(manifest, params, part, vs, spans))
    if journal.load():
        resume_arrays(jobs, journal, part)
    for v in vs:
        for j in v.jobs:
            dims = (row_dim(j.positions), "neuron" if j.site == "mlp_act" else "hidden")
            attrs = {"layer": j.layer, "site": j.site, "positions": j.positions, "parts": params["parts"],
                     "variant": v.name}
            prepare_array(v.root, j.layer, j.site, part, j.layout, array_metadata(j.layout, params["dtype"],
                                                                                  params["store"], attrs, dims),
                          keep=set(j.kept))
    log.info("job %s part %d: layers %d..%d, %d arrays (%s), examples %s of %d, boundary in %s, out %s", group,
             part, start, end, len(jobs), ", ".join(v.name for v in vs),
             " ".join(f"[{a}, {b})" for a, b in spans) or "none", n_ex, boundary_in or "(embeddings)",
             boundary_out or "(none)")
    shared = JobStats()
    stats: dict[str, Any] = {"examples": [list(sp) for sp in spans], "tokens": vs[0].chain.tokens}
    stats["resumed"] = _capture_examples(manifest, params, device, vs, token_ids, offsets, answer_index, rows, part,
                                         group, journal, shared, loaded, steer)
    elapsed = time.perf_counter() - t_start
    stats["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    stats["weight_mib"] = round(shared.weight_bytes / 2**20, 1)
    stats["padding"] = shared.padding
    for v in vs:
        for i, j in enumerate(v.jobs):
            # a part without examples made no routers: nothing was stored, nothing to count
            counts = v.chain.routers[i].counts() if v.chain.routers else {"nonfinite": 0, "clipped": 0}
            if counts["nonfinite"]:
                log.warning("%s layer %d %s: %d values stored as NaN or inf (%d out of %s range)%s", v.name, j.layer,
                            j.site, counts["nonfinite"], counts["clipped"], params["dtype"],
                            "; capture.dtype: bfloat16 keeps float32's range" if counts["clipped"] else "")
            write_marker(v.root, j.layer, j.site, part, j.positions,
                         {"rows": [j.r0, j.r1], "shards": j.written, "variant": v.name, **stats, **counts,
                          "seconds": round(elapsed, 3)})
    journal.remove()
    log.info("job %s part %d done in %.1f s (%d tokens, %.0f tokens/s, weights %.1f MiB, peak RSS %.0f MiB)", group,
             part, elapsed, stats["tokens"], stats["tokens"] / max(elapsed, 1e-9), stats["weight_mib"],
             stats["peak_rss_mib"])
    return stats


@dataclass
class JobStats:
    weight_bytes: int = 0
    padding: float = 0.0


def progress_key(manifest: dict[str, Any], params: dict[str, Any], part: int, vs: list[Variant],
                 spans: list[tuple[int, int]]) -> dict[str, Any]:
    """What a killed attempt's progress must match to be kept: the job, its arrays, and its input boundaries."""
    def source(path) -> list[int] | None:
        if not path:
            return None
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]

    return {"block": list(params["block"]), "part": part, "fingerprint": fingerprint(manifest, params),
            "arrays": [[j.name, j.r0, j.r1, j.layout.chunk_rows, j.layout.shard_rows] for v in vs for j in v.jobs],
            "spans": [list(sp) for sp in spans],
            "boundaries": {v.name: [source(v.boundary_in), bool(v.boundary_out)] for v in vs}}


class Chain:
    """The boundaries of one variant of a job: the residual stream it starts from and the one it hands on."""

    def __init__(self, manifest: dict[str, Any], params: dict[str, Any], offsets: np.ndarray,
                 spans: list[tuple[int, int]], boundary_in, boundary_out, variant: str,
                 input_key: tuple[dict[str, Any], str] | None = None) -> None:
        """``input_key``: (params, variant) the input boundary was written under, where not this job's."""
        self.start, self.end = params["block"]
        self.spans = spans
        self.variant = variant
        # A boundary holds the spans' tokens one after another: where each span's first token goes.
        self.span_row: dict[int, int] = {}
        rows = 0
        for a, b in spans:
            self.span_row[a] = rows
            rows += int(offsets[b] - offsets[a])
        self.tokens = rows
        # What a boundary must have been computed from: same model files, examples, settings and variant.
        self.key = {"examples": [list(sp) for sp in spans], "tokens": rows,
                    "fingerprint": fingerprint(manifest, params), "variant": variant}
        self.input = Boundary(boundary_in) if boundary_in else None
        if self.input is not None:
            key = self.key if input_key is None else {**self.key, "fingerprint": fingerprint(manifest, input_key[0]),
                                                      "variant": input_key[1]}
            self.input.check(layer=self.start, **key)
        self.output_path = boundary_out
        self.output: BoundaryWriter | None = None
        self.routers: list[Router] = []


def fingerprint(manifest: dict[str, Any], params: dict[str, Any]) -> str:
    """A hash of the model and adapter files and the job settings that shape the residual stream."""
    parts = {k: v for k, v in manifest.items() if v and k != "adapters"}
    parts |= {f"adapters.{n}": a for n, a in (manifest.get("adapters") or {}).items()}
    files = {k: [(f["path"], f["sha256"]) for f in v["files"]] for k, v in parts.items()}
    rest = {k: v for k, v in params.items() if k != "block"}
    return hashlib.sha256(dumps_stable({"files": files, "params": rest}).encode()).hexdigest()[:16]


def _capture_examples(manifest, params, device, vs: list[Variant], token_ids, offsets, answer_index,
                      rows: dict[str, RowMap], part, group, journal: Journal, shared: JobStats, loaded=None,
                      steer=None) -> dict[str, int] | None:
    """Run the batches; returns what a resumed attempt kept (None when it started afresh)."""
    dev = resolve_device(device)
    m = manifest["model"]
    tdtype = resolve_dtype(params["model_dtype"], dev)
    dtype_name = str(tdtype).removeprefix("torch.")
    first = vs[0].chain
    if not first.spans:  # a part with no examples: nothing to run, an empty boundary to hand on
        for v in vs:
            if v.chain.output_path:
                BoundaryWriter(v.chain.output_path, 0, m["hidden_size"], dtype_name,
                               {"layer": first.end + 1, **v.chain.key}).close()
        return None
    jobs = [j for v in vs for j in v.jobs]
    stop = Block(first.start, first.end, tuple(j.layer for j in jobs), first.input is not None,
                 bool(first.output_path)).stop
    if loaded is not None:
        model, tokenizer = loaded
    else:
        model, tokenizer = load_block(manifest, dev, params["model_dtype"], params["trust_remote_code"], first.start,
                                      stop)
    shared.weight_bytes = weight_bytes(model)
    layer_mods = S.decoder_layers(model, m["num_layers"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    pool = BufferPool(TORCH_DTYPES[params["dtype"]], pin=dev.startswith("cuda"))
    # Writer threads overlap the disk with the model. Where torch keeps every core busy (a CPU
    # capture), writes must cost it no processor time: O_DIRECT lets the disk copy by DMA, and
    # without it buffered writes go inline, since on a thread they stall the matrix products
    # (benchmarks/capture.py). With a GPU or spare cores, buffered writes on threads let the
    # page cache absorb bursts. Each array keeps to one thread, so its chunks reach its shard
    # file in order; each lane has room for a burst of one chunk per array plus a few.
    cpu_bound = not dev.startswith("cuda") and (os.cpu_count() or 1) <= torch.get_num_threads()
    direct = cpu_bound and bool(jobs) and direct_io_supported(vs[0].root)
    threads = min(WRITER_THREADS, len(jobs)) if direct or not cpu_bound else 0
    writer = ShardWriter(depth=2 * math.ceil(max(len(jobs), 1) / max(threads, 1)) + 4, threads=threads)
    log.info("writing with %s I/O on %d writer thread(s)", "direct" if direct else "buffered", threads)
    encode = chunk_encoder(params["store"], STORAGE_DTYPES[params["dtype"]].itemsize)
    batch: dict[str, Any] = {}
    handles = []

    def rows_of(x: torch.Tensor) -> torch.Tensor:
        """The real tokens of a [batch, seq, width] tensor, flat, in example order."""
        return x.reshape(-1, x.shape[-1]) if batch["sel"] is None else x[batch["sel"]]

    def route(v: Variant, i: int, x: torch.Tensor) -> None:
        # Copy out inside the hook, so the model frees its activations as it would without us.
        if batch["variant"] is not v:
            return
        router = v.chain.routers[i]
        pos = v.jobs[i].positions
        if pos in PER_EXAMPLE:  # one row per example: its last token, or its answer position
            got = x[batch["rows"], batch[pos]]
            for (e0, k0, _, _), k1 in zip(batch["runs"], batch["k_ends"]):
                router.add(e0, got[k0:k1])
        elif pos == "all":
            got = rows_of(x)
            for e0, _, f0, f1 in batch["runs"]:
                router.add(int(offsets[e0]), got[f0:f1])
        else:  # a span: its tokens of each example, gathered in store order
            idx, cuts = batch["spans"][pos]
            got = x.reshape(-1, x.shape[-1])[idx]
            for g0, s0, s1 in cuts:
                router.add(g0, got[s0:s1])

    def hand_on(x: torch.Tensor) -> None:
        out = batch["variant"].chain.output
        rows = rows_of(S.first_tensor(x)).to("cpu")
        for (_, _, f0, f1), brow in zip(batch["runs"], batch["brows"]):
            out.write(brow, rows[f0:f1])

    def take_over(module, args, kwargs):
        # The stream entering the block replaces whatever the pass-throughs below handed up.
        h = batch["h_in"]
        return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    if steer is not None and first.start <= steer["layer"] <= first.end:
        # First of the layer's forward hooks, so the captured resid_post and the boundary carry it.
        vec = torch.as_tensor(steer["vector"] * steer["strength"], dtype=tdtype, device=dev)

        def add_vector(mod, args, out):
            h = S.first_tensor(out)
            if steer["positions"] == "all":  # real tokens only: padding stays as the model left it
                h = h + batch["mask"].unsqueeze(-1).to(h.dtype) * vec
            else:
                h = h.clone()
                h[batch["rows"], batch["last"]] += vec
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handles.append(layer_mods[steer["layer"]].register_forward_hook(add_vector, prepend=True))
    lane = 0
    for v in vs:
        for i, j in enumerate(v.jobs):
            v.chain.routers.append(Router(j, pool, writer, encode, direct, lane=lane, journal=journal))
            handles.append(S.attach(layer_mods[j.layer], j.layer, j.site, lambda x, v=v, i=i: route(v, i, x),
                                    adapter=v.adapter))
            lane += 1
        if v.chain.output_path:
            v.chain.output = BoundaryWriter(v.chain.output_path, v.chain.tokens, m["hidden_size"], dtype_name,
                                            {"layer": first.end + 1, **v.chain.key},
                                            partial=journal.partial(v.name))
    if first.output_path:
        handles.append(layer_mods[first.end].register_forward_hook(lambda mod, a, o: hand_on(o)))
    embed_dim = 0
    if first.input is not None:
        handles.append(layer_mods[first.start].register_forward_pre_hook(take_over, with_kwargs=True))
        embed_dim = model.get_input_embeddings().weight.shape[-1]
    handles.append(S.attach_stop(layer_mods[stop]))
    # A base pass runs the adapter's model with the adapter switched off (PEFT's own switch); a
    # pass of one of the more adapters makes it the active one for that pass.
    passes = [(v, model.disable_adapter if v.name == "base" and hasattr(model, "disable_adapter")
               else (lambda name=v.adapter: _active_adapter(model, name)) if v.adapter is not None
               else contextlib.nullcontext) for v in vs]
    span_rows = {p: rows[p] for p in {j.positions for j in jobs} if is_span(p)}
    bs = params["batch_size"]
    left = params["padding_side"] == "left"
    windows = plan_windows(first.spans, offsets, bs, params["length_window"])
    n_batches = sum(len(w.batches) for w in windows)
    outputs = [v.chain.output for v in vs if v.chain.output is not None]
    written = journal.batches if outputs and all(o.resumed for o in outputs) else 0
    k0 = first_window(windows, jobs, rows, written if outputs else None)
    kept = sum(len(j.kept) for j in jobs)
    skipped = sum(len(w.batches) for w in windows[:k0])
    # a fresh attempt may skip windows too, where no array of it has rows there: that resumes nothing
    resumed = ({"kept_shards": kept, "skipped_batches": skipped, "batches": n_batches}
               if journal.loaded and (kept or k0) else None)
    waste, in_order = padding(windows, offsets, bs)
    shared.padding = round(waste, 4)
    log.info("padding: %.1f%% of batch positions (%.1f%% in data set order; capture.length_window %d)",
             100 * waste, 100 * in_order, params["length_window"])
    if resumed:
        log.info("resuming: %d finished shards kept, %d of %d batches skipped", kept, skipped, n_batches)
    journal.start(resumed=bool(resumed), batches=written)
    ok = False
    try:
        with torch.inference_mode(), tqdm(desc=f"capture {group} part {part}", unit="batch", mininterval=1.0,
                                          initial=skipped, total=n_batches) as bar:
            for k in range(k0, len(windows)):
                for examples in windows[k].batches:
                    inputs = _prepare_batch(examples, windows[k].span, first, batch, token_ids, offsets,
                                            answer_index, span_rows, pad_id, left, dev, tdtype, embed_dim)
                    for v, switch in passes:
                        batch["variant"] = v
                        if v.chain.input is not None:
                            batch["h_in"] = _boundary_rows(v.chain, batch, dev, tdtype)
                        with switch():
                            try:
                                model(**inputs, attention_mask=batch["mask"], position_ids=batch["pos"],
                                      use_cache=False)
                            except S.StopForward:
                                pass
                    bar.update()
                if outputs:  # the window's boundary rows are all written
                    journal.batches_done(k + 1)
        for v in vs:
            for r in v.chain.routers:
                r.done()
        ok = True
    finally:
        for h in handles:
            h.remove()
        try:
            writer.close()
        except Exception:
            if ok:
                raise
        finally:
            if not ok:
                for v in vs:
                    for r in v.chain.routers:
                        r.abort()
                    if v.chain.output is not None:
                        v.chain.output.abort()
                journal.close()
    for o in outputs:
        o.close()
    return resumed


@contextlib.contextmanager
def _active_adapter(model, name: str):
    """PEFT's active adapter is ``name`` inside, the main one (``default``) again after."""
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter("default")


def _prepare_batch(examples: np.ndarray, span: int, chain: Chain, batch: dict[str, Any], token_ids: np.ndarray,
                   offsets: np.ndarray, answer_index: np.ndarray, span_rows: dict[str, RowMap], pad_id: int,
                   left: bool, dev: str, tdtype: torch.dtype, embed_dim: int) -> dict[str, torch.Tensor]:
    """Tokens, mask and positions of one batch (shared by its variants' passes), and where the
    hooks put its rows (``batch``); returns the model's inputs."""
    ids, mask, lens = batch_arrays(token_ids, offsets, examples, pad_id, left)
    mask_t = torch.from_numpy(mask).to(dev, non_blocking=True)
    padded = bool((lens != ids.shape[1]).any())
    last = np.full(len(lens), ids.shape[1] - 1) if left else lens - 1
    answer = last - (lens - 1) + answer_index[examples]  # the answer's index within the example, padded like it
    rs = runs(examples, offsets)
    k_ends = [k for _, k, _, _ in rs[1:]] + [len(examples)]
    # where each run's rows go in a boundary, which holds the span's tokens one after another
    brows = [chain.span_row[span] + int(offsets[e0] - offsets[span]) for e0, _, _, _ in rs]
    batch["spans"] = {name: _span_selection(rm, examples, offsets, rs, k_ends, ids.shape[1] - lens if left
                                            else np.zeros_like(lens), ids.shape[1], dev)
                      for name, rm in span_rows.items()}
    batch.update(runs=rs, brows=brows, k_ends=k_ends, mask=mask_t,
                 pos=(mask_t.cumsum(-1) - 1).clamp(min=0), mask_np=mask, sel=mask_t.bool() if padded else None,
                 rows=torch.arange(len(examples), device=dev), last=torch.from_numpy(last).to(dev),
                 answer=torch.from_numpy(answer).to(dev))
    if chain.input is None:
        return {"input_ids": torch.from_numpy(ids).to(dev, non_blocking=True)}
    # Only the shape, dtype and device of the embeddings matter below the block.
    return {"inputs_embeds": torch.zeros((len(examples), ids.shape[1], embed_dim), dtype=tdtype, device=dev)}


def _span_selection(rm: RowMap, examples: np.ndarray, offsets: np.ndarray, rs: list, k_ends: list[int],
                    shift: np.ndarray, width: int, dev: str) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Where a span's tokens are in a batch's [batch * seq] positions (``shift``: each example's
    left padding), in store order, and per run of consecutive examples its first row in the
    array and its slice of the selection."""
    idx = [rm.tokens[rm.offsets[e]:rm.offsets[e + 1]] - offsets[e] + shift[k] + k * width
           for k, e in enumerate(examples)]
    cuts, s = [], 0
    for (e0, k0, _, _), k1 in zip(rs, k_ends):
        e1 = int(examples[k1 - 1]) + 1
        n = int(rm.offsets[e1] - rm.offsets[e0])
        cuts.append((int(rm.offsets[e0]), s, s + n))
        s += n
    return torch.from_numpy(np.concatenate(idx) if idx else np.zeros(0, np.int64)).to(dev), cuts


def _boundary_rows(chain: Chain, batch: dict[str, Any], dev: str, tdtype: torch.dtype) -> torch.Tensor:
    """The stream entering the block for this batch, from the variant's boundary, padded like the batch."""
    flat = torch.cat([chain.input.rows(b, b + f1 - f0) for (_, _, f0, f1), b in zip(batch["runs"], batch["brows"])])
    mask = batch["mask_np"]
    h = torch.zeros((*mask.shape, flat.shape[-1]), dtype=flat.dtype)
    h[torch.from_numpy(mask).bool()] = flat
    return h.to(dev, dtype=tdtype)
