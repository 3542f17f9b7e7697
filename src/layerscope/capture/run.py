"""A capture job: run the model over one part of the examples and write one group of layers.

The forward pass stops after the highest layer the job needs. Forward hooks copy rows into
per-array chunk buffers; each full chunk goes to a writer thread that streams it into its
shard file, which is renamed into place once complete (see shards.py).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from layerscope.capture import sites as S
from layerscope.capture.chain import Boundary, BoundaryWriter, part_examples
from layerscope.capture.journal import Journal, progress_dir
from layerscope.models.architectures import Widths
from layerscope.config import Block, dumps_stable
from layerscope.data.dataset import load_tokens
from layerscope.errors import ModelError
from layerscope.models.loading import resolve_device, resolve_dtype
from layerscope.capture.partial import load_block, weight_bytes
from layerscope.store.shards import ShardFile, aligned_empty, chunk_encoder, direct_io_supported, shard_key
from layerscope.store.layout import (STORAGE_DTYPES, Layout, array_metadata, make_layout, prepare_array, write_marker)
from layerscope.store.writer import ShardWriter

log = logging.getLogger("layerscope.capture.run")

WRITER_THREADS = 4
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ArrayJob:
    """One array's share of this job: its layout and row range, and where its directory is."""

    layer: int
    site: str
    positions: str
    layout: Layout
    r0: int
    r1: int
    array_dir: Path | None = None
    written: list[int] = field(default_factory=list)
    start: int = -1  # the first row still to write (past r0 where a killed attempt finished shards)
    kept: dict[int, dict[str, int]] = field(default_factory=dict)  # finished shards -> their value counts

    def __post_init__(self) -> None:
        if self.start < 0:
            self.start = self.r0

    @property
    def name(self) -> str:
        return f"layer_{self.layer:02d}/{self.site}/{self.positions}"


class BufferPool:
    """Reusable host chunk buffers (pinned when copying from a GPU): a long capture allocates a
    handful of chunks once instead of one per chunk."""

    def __init__(self, dtype: torch.dtype, pin: bool) -> None:
        self.dtype, self.pin = dtype, pin
        self._free: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def acquire(self, rows: int, width: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get((rows, width))
            if free:
                return free.pop()
        if self.pin:
            return torch.empty((rows, width), dtype=self.dtype, pin_memory=True)
        nbytes = rows * width * self.dtype.itemsize
        return torch.from_numpy(aligned_empty(nbytes)).view(self.dtype).view(rows, width)

    def release(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault(tuple(buf.shape), []).append(buf)


def as_storage_numpy(buf: torch.Tensor) -> np.ndarray:
    """The numpy view that goes to disk: bfloat16 as its raw 16-bit pattern."""
    if buf.dtype == torch.bfloat16:
        return buf.view(torch.int16).numpy().view(np.uint16)
    return buf.numpy()


class Router:
    """Copies captured rows into chunk buffers (converting to the storage dtype on the way) and
    hands each full chunk to the writer thread, which streams it into its shard file; the
    forward pass never waits on the disk, and memory holds about one chunk per array."""

    def __init__(self, job: ArrayJob, pool: BufferPool, writer: ShardWriter, encode, direct: bool = False,
                 lane: int = 0, journal: Journal | None = None) -> None:
        self.j, self.pool, self.writer, self.encode, self.direct, self.lane = job, pool, writer, encode, direct, lane
        self.journal = journal
        self.cuda = pool.pin
        # Chunks being filled (buffer, rows filled so far): a batch of examples sorted by length
        # fills rows out of order, and a chunk goes to its shard file only once it and every
        # chunk before it are complete.
        self.open: dict[int, list] = {}
        self.complete: set[int] = set()
        self.next = job.start // job.layout.chunk_rows
        self.shard_file: ShardFile | None = None
        self.opened: list[ShardFile] = []  # to remove their temporary files if the job fails
        # Values stored as NaN/inf, and infinities where the storage dtype's range is narrower than
        # float32's (float16 overflows silently). Only this array's writer lane updates them.
        self.nonfinite = sum(c["nonfinite"] for c in job.kept.values())
        self.clipped = sum(c["clipped"] for c in job.kept.values())
        self.narrow = pool.dtype == torch.float16
        self._at_close = self.counts()

    def _flush_chunk(self, chunk: int, buf: torch.Tensor, filled: int) -> None:
        j, pool = self.j, self.pool
        lay = j.layout
        if self.shard_file is None:
            self.shard_file = ShardFile(j.array_dir, chunk * lay.chunk_rows // lay.shard_rows,
                                        lay.shard_rows // lay.chunk_rows, self.encode, self.direct)
            self.opened.append(self.shard_file)
        sf = self.shard_file
        if filled < lay.chunk_rows:  # only at the end of the array: pad the inner chunk with the fill value
            buf[filled:].fill_(float("nan"))
        event = None
        if self.cuda:  # device-to-host copies were queued non-blocking: wait for them off the main thread
            event = torch.cuda.Event()
            event.record()

        def write() -> None:
            if event is not None:
                event.synchronize()
            real = buf[:filled]
            if not bool(torch.isfinite(real).all()):
                self.nonfinite += int((~torch.isfinite(real)).sum())
                self.clipped += int(torch.isinf(real).sum()) if self.narrow else 0
            sf.append(as_storage_numpy(buf))
            pool.release(buf)

        self.writer.submit(write, self.lane)
        chunk_end = (chunk + 1) * lay.chunk_rows
        shard = chunk * lay.chunk_rows // lay.shard_rows
        if chunk_end % lay.shard_rows == 0 or min(chunk_end, lay.rows) >= j.r1:
            self.writer.submit(lambda: self._close(sf, shard), self.lane)
            j.written.append(shard)
            self.shard_file = None

    def _close(self, sf: ShardFile, shard: int) -> None:
        # On the array's writer lane, after all of the shard's chunks: the counts are the shard's own.
        sf.close()
        now = self.counts()
        if self.journal is not None:
            self.journal.shard_done(self.j.name, shard, {k: now[k] - self._at_close[k] for k in now})
        self._at_close = now

    def add(self, g0: int, rows: torch.Tensor) -> None:
        """``rows`` hold global rows [g0, g0 + len(rows)); keep the ones in this job's range."""
        j = self.j
        lay = j.layout
        lo, hi = max(g0, j.start), min(g0 + len(rows), j.r1)
        cr = lay.chunk_rows
        while lo < hi:
            chunk = lo // cr
            c0 = chunk * cr
            end = min(hi, c0 + cr)
            slot = self.open.get(chunk)
            if slot is None:
                slot = self.open[chunk] = [self.pool.acquire(cr, lay.width), 0]
            slot[0][lo - c0:end - c0].copy_(rows[lo - g0:end - g0], non_blocking=self.cuda)
            slot[1] += end - lo
            lo = end
            if slot[1] == min(c0 + cr, j.r1) - max(c0, j.start):
                self.complete.add(chunk)
                while self.next in self.complete:  # as soon as it can go: buffers get reused
                    c = self.next
                    self.complete.discard(c)
                    buf, _ = self.open.pop(c)
                    self._flush_chunk(c, buf, min((c + 1) * cr, j.r1) - c * cr)
                    self.next += 1

    def counts(self) -> dict[str, int]:
        return {"nonfinite": self.nonfinite, "clipped": self.clipped}

    def done(self) -> None:
        if self.open or self.shard_file is not None:
            raise RuntimeError(f"layer {self.j.layer} {self.j.site}: chunks {sorted(self.open) or self.next} "
                               "incomplete at end of job")

    def abort(self) -> None:
        for sf in self.opened:
            sf.abort()


def plan_arrays(captures: list[tuple[int, str, str]], params: dict[str, Any], widths: Widths,
                n_examples: int, n_tokens: int, part: int) -> list[ArrayJob]:
    """This part's share of every array in ``captures`` ((layer, site, positions) triples)."""
    st = params["store"]
    itemsize = STORAGE_DTYPES[params["dtype"]].itemsize
    jobs = []
    for layer, site, pos in captures:
        rows = n_examples if pos == "last" else n_tokens
        width = widths.site(layer, site)
        lay = make_layout(rows, width, itemsize, params["parts"], st["chunk_mib"], st["shard_mib"])
        r0, r1 = lay.part_range(part)
        jobs.append(ArrayJob(layer, site, pos, lay, r0, r1))
    return jobs


def resume_arrays(jobs: list[ArrayJob], journal: Journal, root: Path, part: int) -> None:
    """Keep the shards a killed attempt finished: the leading run of each array's part whose files are in place."""
    for j in jobs:
        done = journal.shards.get(j.name, {})
        for s in j.layout.shard_range(part):
            if s not in done or not shard_key(root / f"layer_{j.layer:02d}" / j.site, s).is_file():
                break
            j.kept[s] = done[s]
            j.start = min(j.r1, (s + 1) * j.layout.shard_rows)
        j.written = sorted(j.kept)


@dataclass
class Window:
    """Consecutive examples [e0, e1) of span ``span``, run as batches of similar length: each
    batch holds the examples it holds in data set order, and its rows reach the store in place."""

    span: int
    e0: int
    e1: int
    batches: list[np.ndarray]


def plan_windows(spans: list[tuple[int, int]], offsets: np.ndarray, batch_size: int, window: int) -> list[Window]:
    """Cut each span into windows of ``window`` batches and batch each window's examples by length.

    Only the examples and settings decide the batches (never what a job captures), so every
    job layout computes the same rows from the same batches. ``window`` 1 keeps data set order.
    """
    lens = np.diff(offsets)
    out = []
    for sa, sb in spans:
        for w0 in range(sa, sb, window * batch_size):
            w1 = min(w0 + window * batch_size, sb)
            order = w0 + np.argsort(-lens[w0:w1], kind="stable")  # longest first: memory peaks at the start
            out.append(Window(sa, w0, w1, [np.sort(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]))
    return out


def first_window(windows: list[Window], jobs: list[ArrayJob], offsets: np.ndarray, boundary_windows: int | None) -> int:
    """The first window that an unfinished shard or boundary still needs (``len(windows)``: none).

    Windows keep the uninterrupted run's batches, so the recomputed rows are the same bytes.
    """
    k = len(windows) if boundary_windows is None else boundary_windows
    for j in jobs:
        if j.start < j.r1:
            e = j.start if j.positions == "last" else int(np.searchsorted(offsets, j.start, side="right")) - 1
            k = min(k, next(i for i, w in enumerate(windows) if w.e1 > e))
    return k


def run_capture(manifest: dict[str, Any], dataset_dir: str | os.PathLike, store_root: str | os.PathLike,
                params: dict[str, Any], part: int, captures: list[tuple[int, str, str]], device: str = "auto",
                boundary_in: str | os.PathLike | None = None, boundary_out: str | os.PathLike | None = None,
                group: str = "", loaded: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Run decoder layers ``params["block"]`` over this part of the examples: capture ``captures``
    into the store (with completion markers), read the residual stream entering the block from
    ``boundary_in`` (None: start from the embeddings) and write the one leaving it to ``boundary_out``.

    ``loaded`` is an already loaded (model, tokenizer) pair on ``device``, to skip loading.
    """
    t_start = time.perf_counter()
    m = manifest["model"]
    start, end = params["block"]
    if not 0 <= start <= end < m["num_layers"]:
        raise ModelError(f"capture: layers {start}..{end} are out of range for model {m['id']} with "
                         f"{m['num_layers']} layers; re-plan the workflow")
    token_ids, offsets = load_tokens(dataset_dir)
    n_ex, n_tok = len(offsets) - 1, int(offsets[-1])
    root = Path(store_root)
    widths = Widths.of(manifest)
    jobs = plan_arrays(captures, params, widths, n_ex, n_tok, part)
    spans = part_examples(offsets, widths.all(), params["dtype"], params["parts"], params["store"], part)
    chain = Chain(manifest, params, offsets, spans, boundary_in, boundary_out)
    journal = Journal(progress_dir(root), f"{group or 'capture'}_part{part}",
                      progress_key(manifest, params, part, jobs, spans, boundary_in, boundary_out))
    if journal.load():
        resume_arrays(jobs, journal, root, part)
    for j in jobs:
        dims = ("example" if j.positions == "last" else "token", "neuron" if j.site == "mlp_act" else "hidden")
        attrs = {"layer": j.layer, "site": j.site, "positions": j.positions, "parts": params["parts"]}
        prepare_array(root, j.layer, j.site, part, j.layout, array_metadata(j.layout, params["dtype"],
                                                                            params["store"], attrs, dims),
                      keep=set(j.kept))
    log.info("job %s part %d: layers %d..%d, %d arrays, examples %s of %d, boundary in %s, out %s", group, part,
             start, end, len(jobs), " ".join(f"[{a}, {b})" for a, b in spans) or "none", n_ex,
             boundary_in or "(embeddings)", boundary_out or "(none)")
    stats: dict[str, Any] = {"examples": [list(sp) for sp in spans], "tokens": chain.tokens}
    stats["resumed"] = _capture_examples(manifest, params, device, jobs, token_ids, offsets, root, part, group,
                                         chain, journal, loaded)
    elapsed = time.perf_counter() - t_start
    stats["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    stats["weight_mib"] = round(chain.weight_bytes / 2**20, 1)
    stats["padding"] = chain.padding
    for i, j in enumerate(jobs):
        # a part without examples made no routers: nothing was stored, nothing to count
        counts = chain.routers[i].counts() if chain.routers else {"nonfinite": 0, "clipped": 0}
        if counts["nonfinite"]:
            log.warning("layer %d %s: %d values stored as NaN or inf (%d out of %s range)%s", j.layer, j.site,
                        counts["nonfinite"], counts["clipped"], params["dtype"],
                        "; capture.dtype: bfloat16 keeps float32's range" if counts["clipped"] else "")
        write_marker(root, j.layer, j.site, part, j.positions, {"rows": [j.r0, j.r1], "shards": j.written, **stats,
                                                                  **counts, "seconds": round(elapsed, 3)})
    journal.remove()
    log.info("job %s part %d done in %.1f s (%d tokens, %.0f tokens/s, weights %.1f MiB, peak RSS %.0f MiB)", group,
             part, elapsed, stats["tokens"], stats["tokens"] / max(elapsed, 1e-9), stats["weight_mib"],
             stats["peak_rss_mib"])
    return stats


def padding(windows: list[Window], offsets: np.ndarray, bs: int) -> tuple[float, float]:
    """The share of batch positions that are padding: in the batches the job runs, and in
    batches taken in data set order."""
    lens = np.diff(offsets)
    real = sum(int(lens[b].sum()) for w in windows for b in w.batches)
    if not real:
        return 0.0, 0.0
    ran = sum(int(lens[b].max()) * len(b) for w in windows for b in w.batches)
    in_order = sum(int(lens[b0:min(b0 + bs, w.e1)].max()) * (min(b0 + bs, w.e1) - b0)
                   for w in windows for b0 in range(w.e0, w.e1, bs))
    return 1 - real / ran, 1 - real / in_order


def progress_key(manifest: dict[str, Any], params: dict[str, Any], part: int, jobs: list[ArrayJob],
                 spans: list[tuple[int, int]], boundary_in, boundary_out) -> dict[str, Any]:
    """What a killed attempt's progress must match to be kept: the job, its arrays, and its input boundary."""
    src = None
    if boundary_in:
        st = os.stat(boundary_in)
        src = [st.st_size, st.st_mtime_ns]
    return {"block": list(params["block"]), "part": part, "fingerprint": fingerprint(manifest, params),
            "arrays": [[j.name, j.r0, j.r1, j.layout.chunk_rows, j.layout.shard_rows] for j in jobs],
            "spans": [list(sp) for sp in spans], "boundary_in": src, "boundary_out": bool(boundary_out)}


class Chain:
    """The boundaries of one job: the residual stream it starts from and the one it hands on."""

    def __init__(self, manifest: dict[str, Any], params: dict[str, Any], offsets: np.ndarray,
                 spans: list[tuple[int, int]], boundary_in, boundary_out) -> None:
        self.start, self.end = params["block"]
        self.spans = spans
        # A boundary holds the spans' tokens one after another: where each span's first token goes.
        self.span_row: dict[int, int] = {}
        rows = 0
        for a, b in spans:
            self.span_row[a] = rows
            rows += int(offsets[b] - offsets[a])
        self.tokens = rows
        # What a boundary must have been computed from: same model files, examples and settings.
        self.key = {"examples": [list(sp) for sp in spans], "tokens": rows,
                    "fingerprint": fingerprint(manifest, params)}
        self.input = Boundary(boundary_in) if boundary_in else None
        if self.input is not None:
            self.input.check(layer=self.start, **self.key)
        self.output_path = boundary_out
        self.output: BoundaryWriter | None = None
        self.routers: list[Router] = []
        self.weight_bytes = 0
        self.padding = 0.0


def fingerprint(manifest: dict[str, Any], params: dict[str, Any]) -> str:
    """A hash of the model and adapter files and the job settings that shape the residual stream."""
    files = {k: [(f["path"], f["sha256"]) for f in v["files"]] for k, v in manifest.items() if v}
    rest = {k: v for k, v in params.items() if k != "block"}
    return hashlib.sha256(dumps_stable({"files": files, "params": rest}).encode()).hexdigest()[:16]


def _batch(token_ids: np.ndarray, offsets: np.ndarray, examples: np.ndarray, pad_id: int, left: bool):
    lens = (offsets[examples + 1] - offsets[examples]).astype(np.int64)
    T = int(lens.max())
    ids = np.full((len(examples), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(examples), T), dtype=np.int64)
    for k, e in enumerate(examples):
        row = token_ids[offsets[e]:offsets[e + 1]]
        sl = slice(T - len(row), T) if left else slice(0, len(row))
        ids[k, sl] = row
        mask[k, sl] = 1
    return ids, mask, lens


def _runs(examples: np.ndarray, offsets: np.ndarray) -> list[tuple[int, int, int, int]]:
    """A batch's examples as runs of consecutive ones: (first example, batch index of it,
    first and end row of the run in the batch's flat real tokens)."""
    cut = np.flatnonzero(np.diff(examples) != 1) + 1
    runs, flat = [], 0
    for k0, k1 in zip(np.r_[0, cut], np.r_[cut, len(examples)]):
        e0, e1 = int(examples[k0]), int(examples[k1 - 1]) + 1
        n = int(offsets[e1] - offsets[e0])
        runs.append((e0, int(k0), flat, flat + n))
        flat += n
    return runs


def _capture_examples(manifest, params, device, jobs, token_ids, offsets, root: Path, part, group, chain: Chain,
                      journal: Journal, loaded=None) -> dict[str, int] | None:
    """Run the batches; returns what a resumed attempt kept (None when it started afresh)."""
    dev = resolve_device(device)
    m = manifest["model"]
    tdtype = resolve_dtype(params["model_dtype"], dev)
    dtype_name = str(tdtype).removeprefix("torch.")
    if not chain.spans:  # a part with no examples: nothing to run, an empty boundary to hand on
        if chain.output_path:
            BoundaryWriter(chain.output_path, 0, m["hidden_size"], dtype_name, {"layer": chain.end + 1,
                                                                                 **chain.key}).close()
        return None
    stop = Block(chain.start, chain.end, tuple(j.layer for j in jobs), chain.input is not None,
                 bool(chain.output_path)).stop
    if loaded is not None:
        model, tokenizer = loaded
    else:
        model, tokenizer = load_block(manifest, dev, params["model_dtype"], params["trust_remote_code"], chain.start,
                                      stop)
    chain.weight_bytes = weight_bytes(model)
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
    direct = cpu_bound and bool(jobs) and direct_io_supported(root)
    threads = min(WRITER_THREADS, len(jobs)) if direct or not cpu_bound else 0
    writer = ShardWriter(depth=2 * math.ceil(max(len(jobs), 1) / max(threads, 1)) + 4, threads=threads)
    log.info("writing with %s I/O on %d writer thread(s)", "direct" if direct else "buffered", threads)
    encode = chunk_encoder(params["store"], STORAGE_DTYPES[params["dtype"]].itemsize)
    routers = chain.routers
    batch: dict[str, Any] = {}
    handles = []

    def rows_of(x: torch.Tensor) -> torch.Tensor:
        """The real tokens of a [batch, seq, width] tensor, flat, in example order."""
        return x.reshape(-1, x.shape[-1]) if batch["sel"] is None else x[batch["sel"]]

    def route(i: int, x: torch.Tensor) -> None:
        # Copy out inside the hook, so the model frees its activations as it would without us.
        if jobs[i].positions == "last":
            rows, ends = x[batch["rows"], batch["last"]], batch["k_ends"]
            for (e0, k0, _, _), k1 in zip(batch["runs"], ends):
                routers[i].add(e0, rows[k0:k1])
        else:
            rows = rows_of(x)
            for e0, _, f0, f1 in batch["runs"]:
                routers[i].add(int(offsets[e0]), rows[f0:f1])

    def hand_on(x: torch.Tensor) -> None:
        rows = rows_of(S.first_tensor(x)).to("cpu")
        for (_, _, f0, f1), brow in zip(batch["runs"], batch["brows"]):
            chain.output.write(brow, rows[f0:f1])

    def take_over(module, args, kwargs):
        # The stream entering the block replaces whatever the pass-throughs below handed up.
        h = batch["h_in"]
        return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    for i, j in enumerate(jobs):
        j.array_dir = root / f"layer_{j.layer:02d}" / j.site
        routers.append(Router(j, pool, writer, encode, direct, lane=i, journal=journal))
        handles.append(S.attach(layer_mods[j.layer], j.layer, j.site, lambda x, i=i: route(i, x)))
    if chain.output_path:
        chain.output = BoundaryWriter(chain.output_path, chain.tokens, m["hidden_size"],
                                      dtype_name, {"layer": chain.end + 1, **chain.key}, partial=journal.boundary)
        handles.append(layer_mods[chain.end].register_forward_hook(lambda mod, a, o: hand_on(o)))
    embed_dim = 0
    if chain.input is not None:
        handles.append(layer_mods[chain.start].register_forward_pre_hook(take_over, with_kwargs=True))
        embed_dim = model.get_input_embeddings().weight.shape[-1]
    handles.append(S.attach_stop(layer_mods[stop]))
    bs = params["batch_size"]
    left = params["padding_side"] == "left"
    windows = plan_windows(chain.spans, offsets, bs, params["length_window"])
    n_batches = sum(len(w.batches) for w in windows)
    written = journal.batches if chain.output is not None and chain.output.resumed else 0
    k0 = first_window(windows, jobs, offsets, written if chain.output is not None else None)
    kept = sum(len(j.kept) for j in jobs)
    skipped = sum(len(w.batches) for w in windows[:k0])
    resumed = {"kept_shards": kept, "skipped_batches": skipped, "batches": n_batches} if kept or k0 else None
    waste, in_order = padding(windows, offsets, bs)
    chain.padding = round(waste, 4)
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
                sa = windows[k].span
                for examples in windows[k].batches:
                    _run_batch(model, examples, sa, chain, batch, token_ids, offsets, pad_id, left, dev, tdtype,
                               embed_dim)
                    bar.update()
                if chain.output is not None:  # the window's boundary rows are all written
                    journal.batches_done(k + 1)
        for r in routers:
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
                for r in routers:
                    r.abort()
                if chain.output is not None:
                    chain.output.abort()
                journal.close()
    if chain.output is not None:
        chain.output.close()
    return resumed


def _run_batch(model, examples: np.ndarray, span: int, chain: Chain, batch: dict[str, Any], token_ids: np.ndarray,
               offsets: np.ndarray, pad_id: int, left: bool, dev: str, tdtype: torch.dtype, embed_dim: int) -> None:
    """One forward pass over ``examples``; the hooks route its rows (see ``batch``)."""
    ids, mask, lens = _batch(token_ids, offsets, examples, pad_id, left)
    mask_t = torch.from_numpy(mask).to(dev, non_blocking=True)
    pos_t = (mask_t.cumsum(-1) - 1).clamp(min=0)
    padded = bool((lens != ids.shape[1]).any())
    last = np.full(len(lens), ids.shape[1] - 1) if left else lens - 1
    runs = _runs(examples, offsets)
    # where each run's rows go in a boundary, which holds the span's tokens one after another
    brows = [chain.span_row[span] + int(offsets[e0] - offsets[span]) for e0, _, _, _ in runs]
    batch.update(runs=runs, brows=brows, k_ends=[k for _, k, _, _ in runs[1:]] + [len(examples)],
                 sel=mask_t.bool() if padded else None, rows=torch.arange(len(examples), device=dev),
                 last=torch.from_numpy(last).to(dev))
    if chain.input is None:
        inputs = {"input_ids": torch.from_numpy(ids).to(dev, non_blocking=True)}
    else:
        flat = torch.cat([chain.input.rows(b, b + f1 - f0) for (_, _, f0, f1), b in zip(runs, brows)])
        h = torch.zeros((len(examples), ids.shape[1], flat.shape[-1]), dtype=flat.dtype)
        h[torch.from_numpy(mask).bool()] = flat
        batch["h_in"] = h.to(dev, dtype=tdtype)
        # Only the shape, dtype and device of the embeddings matter below the block.
        inputs = {"inputs_embeds": torch.zeros((len(examples), ids.shape[1], embed_dim), dtype=tdtype, device=dev)}
    try:
        model(**inputs, attention_mask=mask_t, position_ids=pos_t, use_cache=False)
    except S.StopForward:
        pass
