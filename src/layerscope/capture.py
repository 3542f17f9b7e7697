"""A capture job: run the model over one part of the examples and write one group of layers.

The forward pass stops after the highest layer the job needs. Forward hooks copy rows into
per-array chunk buffers; each full chunk goes to a writer thread that streams it into its
shard file, which is renamed into place once complete (see shards.py).
"""

from __future__ import annotations

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

from layerscope import sites as S
from layerscope.config import check_layers_against
from layerscope.dataset import load_tokens
from layerscope.fileio import read_json
from layerscope.models import load_model, resolve_device
from layerscope.shards import ShardFile, aligned_empty, chunk_encoder, direct_io_supported
from layerscope.store import (STORAGE_DTYPES, Layout, array_metadata, make_layout, prepare_array, write_marker)
from layerscope.writer import ShardWriter

log = logging.getLogger("layerscope.capture")

WRITER_THREADS = 4
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def site_width(site: str, hidden: int, intermediate: int) -> int:
    return intermediate if site == "mlp_act" else hidden


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

    def example_range(self, offsets: np.ndarray) -> tuple[int, int]:
        """The examples whose rows fall into [r0, r1)."""
        if self.r0 >= self.r1:
            return (0, 0)
        if self.positions == "last":
            return self.r0, self.r1
        e0 = int(np.searchsorted(offsets, self.r0, side="right")) - 1
        e1 = int(np.searchsorted(offsets, self.r1, side="left"))
        return e0, e1


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
                 lane: int = 0) -> None:
        self.j, self.pool, self.writer, self.encode, self.direct, self.lane = job, pool, writer, encode, direct, lane
        self.cuda = pool.pin
        self.buf: torch.Tensor | None = None
        self.chunk = -1
        self.shard_file: ShardFile | None = None
        self.opened: list[ShardFile] = []  # to remove their temporary files if the job fails

    def _flush_chunk(self, filled: int) -> None:
        j, buf, sf, pool = self.j, self.buf, self.shard_file, self.pool
        lay = j.layout
        if filled < lay.chunk_rows:  # only at the end of the array: pad the inner chunk with the fill value
            buf[filled:].fill_(float("nan"))
        event = None
        if self.cuda:  # device-to-host copies were queued non-blocking: wait for them off the main thread
            event = torch.cuda.Event()
            event.record()

        def write() -> None:
            if event is not None:
                event.synchronize()
            sf.append(as_storage_numpy(buf))
            pool.release(buf)

        self.writer.submit(write, self.lane)
        self.buf = None
        chunk_end = (self.chunk + 1) * lay.chunk_rows
        shard = self.chunk * lay.chunk_rows // lay.shard_rows
        if chunk_end % lay.shard_rows == 0 or min(chunk_end, lay.rows) >= j.r1:
            self.writer.submit(sf.close, self.lane)
            j.written.append(shard)
            self.shard_file = None

    def add(self, g0: int, rows: torch.Tensor) -> None:
        """``rows`` hold global rows [g0, g0 + len(rows)); keep the ones in this job's range."""
        j = self.j
        lay = j.layout
        lo, hi = max(g0, j.r0), min(g0 + len(rows), j.r1)
        cr = lay.chunk_rows
        while lo < hi:
            chunk = lo // cr
            if chunk != self.chunk:
                self.chunk = chunk
                self.buf = self.pool.acquire(cr, lay.width)
                if self.shard_file is None:
                    self.shard_file = ShardFile(j.array_dir, lo // lay.shard_rows, lay.shard_rows // cr, self.encode,
                                                self.direct)
                    self.opened.append(self.shard_file)
            c0 = chunk * cr
            end = min(hi, c0 + cr)
            self.buf[lo - c0:end - c0].copy_(rows[lo - g0:end - g0], non_blocking=self.cuda)
            lo = end
            if end == min(c0 + cr, j.r1):
                self._flush_chunk(end - c0)

    def done(self) -> None:
        if self.buf is not None or self.shard_file is not None:
            raise RuntimeError(f"layer {self.j.layer} {self.j.site}: chunk {self.chunk} incomplete at end of job")

    def abort(self) -> None:
        for sf in self.opened:
            sf.abort()


def plan_arrays(params: dict[str, Any], dims: dict[str, Any], n_examples: int, n_tokens: int,
                part: int) -> list[ArrayJob]:
    st = params["store"]
    itemsize = STORAGE_DTYPES[params["dtype"]].itemsize
    jobs = []
    for key, setting in params["layers"].items():
        for site in setting["sites"]:
            pos = setting["positions"]
            rows = n_examples if pos == "last" else n_tokens
            width = site_width(site, dims["hidden_size"], dims["intermediate_size"])
            lay = make_layout(rows, width, itemsize, params["parts"], st["chunk_mib"], st["shard_mib"])
            r0, r1 = lay.part_range(part)
            jobs.append(ArrayJob(int(key), site, pos, lay, r0, r1))
    return jobs


def run_capture(manifest_path: str | os.PathLike, dataset_dir: str | os.PathLike, store_root: str | os.PathLike,
                params: dict[str, Any], part: int, device: str = "auto", group: str = "",
                loaded: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Capture this job's layers for this part of the examples into the store; write completion markers.

    ``loaded`` is an already loaded (model, tokenizer) pair on ``device``, to skip loading.
    """
    t_start = time.perf_counter()
    manifest = read_json(manifest_path)
    m = manifest["model"]
    layers = sorted(int(k) for k in params["layers"])
    check_layers_against(layers, m["num_layers"], m["id"])
    token_ids, offsets = load_tokens(dataset_dir)
    n_ex, n_tok = len(offsets) - 1, int(offsets[-1])
    root = Path(store_root)
    jobs = plan_arrays(params, m, n_ex, n_tok, part)
    for j in jobs:
        dims = ("example" if j.positions == "last" else "token", "neuron" if j.site == "mlp_act" else "hidden")
        attrs = {"layer": j.layer, "site": j.site, "positions": j.positions, "parts": params["parts"]}
        prepare_array(root, j.layer, j.site, part, j.layout, array_metadata(j.layout, params["dtype"],
                                                                            params["store"], attrs, dims))
    ranges = [j.example_range(offsets) for j in jobs if j.r0 < j.r1]
    e0 = min((r[0] for r in ranges), default=0)
    e1 = max((r[1] for r in ranges), default=0)
    log.info("job %s part %d: layers %s, %d arrays, examples [%d, %d) of %d", group, part, layers, len(jobs),
             e0, e1, n_ex)

    stats: dict[str, Any] = {"examples": [e0, e1], "tokens": int(offsets[e1] - offsets[e0]) if e1 > e0 else 0}
    if e1 > e0:
        _capture_examples(manifest, params, device, jobs, token_ids, offsets, e0, e1, root, part, group, loaded)
    elapsed = time.perf_counter() - t_start
    stats["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    for j in jobs:
        write_marker(root, j.layer, j.site, part, {"rows": [j.r0, j.r1], "shards": j.written, **stats,
                                                    "seconds": round(elapsed, 3)})
    log.info("job %s part %d done in %.1f s (%d tokens, %.0f tokens/s, peak RSS %.0f MiB)", group, part, elapsed,
             stats["tokens"], stats["tokens"] / max(elapsed, 1e-9), stats["peak_rss_mib"])
    return stats


def _batch(token_ids: np.ndarray, offsets: np.ndarray, b0: int, b1: int, pad_id: int, left: bool):
    lens = (offsets[b0 + 1:b1 + 1] - offsets[b0:b1]).astype(np.int64)
    T = int(lens.max())
    ids = np.full((b1 - b0, T), pad_id, dtype=np.int64)
    mask = np.zeros((b1 - b0, T), dtype=np.int64)
    for k in range(b1 - b0):
        row = token_ids[offsets[b0 + k]:offsets[b0 + k + 1]]
        sl = slice(T - len(row), T) if left else slice(0, len(row))
        ids[k, sl] = row
        mask[k, sl] = 1
    return ids, mask, lens


def _capture_examples(manifest, params, device, jobs, token_ids, offsets, e0, e1, root, part, group,
                      loaded=None) -> None:
    dev = resolve_device(device)
    model, tokenizer = loaded or load_model(manifest, dev, params["model_dtype"], params["trust_remote_code"])
    layer_mods = S.decoder_layers(model, manifest["model"]["num_layers"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    pool = BufferPool(TORCH_DTYPES[params["dtype"]], pin=dev.startswith("cuda"))
    # Writer threads overlap the disk with the model. Where torch keeps every core busy (a CPU
    # capture), writes must cost it no processor time: O_DIRECT lets the disk copy by DMA, and
    # without it buffered writes go inline, since on a thread they stall the matrix products
    # (benchmarks/capture.py). With a GPU or spare cores, buffered writes on threads let the
    # page cache absorb bursts. Each array keeps to one thread, so its chunks reach its shard
    # file in order; each lane has room for a burst of one chunk per array plus a few.
    cpu_bound = not dev.startswith("cuda") and (os.cpu_count() or 1) <= torch.get_num_threads()
    direct = cpu_bound and direct_io_supported(root)
    threads = min(WRITER_THREADS, len(jobs)) if direct or not cpu_bound else 0
    writer = ShardWriter(depth=2 * math.ceil(len(jobs) / max(threads, 1)) + 4, threads=threads)
    log.info("writing with %s I/O on %d writer thread(s)", "direct" if direct else "buffered", threads)
    encode = chunk_encoder(params["store"], STORAGE_DTYPES[params["dtype"]].itemsize)
    routers: list[Router] = []
    batch: dict[str, Any] = {}
    handles = []

    def route(i: int, x: torch.Tensor) -> None:
        # Copy out inside the hook, so the model frees its activations as it would without us.
        j = jobs[i]
        if j.positions == "last":
            routers[i].add(batch["e0"], x[batch["rows"], batch["last"]])
        elif batch["sel"] is None:
            routers[i].add(batch["t0"], x.reshape(-1, x.shape[-1]))
        else:  # the real tokens only, flat, in example order
            routers[i].add(batch["t0"], x[batch["sel"]])

    for i, j in enumerate(jobs):
        j.array_dir = root / f"layer_{j.layer:02d}" / j.site
        routers.append(Router(j, pool, writer, encode, direct, lane=i))
        handles.append(S.attach(layer_mods[j.layer], j.layer, j.site, lambda x, i=i: route(i, x)))
    handles.append(S.attach_stop(layer_mods[max(j.layer for j in jobs)]))
    bs = params["batch_size"]
    left = params["padding_side"] == "left"
    ok = False
    try:
        with torch.inference_mode():
            for b0 in tqdm(range(e0, e1, bs), total=math.ceil((e1 - e0) / bs), desc=f"capture {group} part {part}",
                           unit="batch", mininterval=1.0):
                b1 = min(b0 + bs, e1)
                ids, mask, lens = _batch(token_ids, offsets, b0, b1, pad_id, left)
                ids_t = torch.from_numpy(ids).to(dev, non_blocking=True)
                mask_t = torch.from_numpy(mask).to(dev, non_blocking=True)
                pos_t = (mask_t.cumsum(-1) - 1).clamp(min=0)
                padded = bool((lens != ids.shape[1]).any())
                last = np.full(len(lens), ids.shape[1] - 1) if left else lens - 1
                batch.update(e0=b0, t0=int(offsets[b0]), sel=mask_t.bool() if padded else None,
                             rows=torch.arange(b1 - b0, device=dev), last=torch.from_numpy(last).to(dev))
                try:
                    model(input_ids=ids_t, attention_mask=mask_t, position_ids=pos_t, use_cache=False)
                except S.StopForward:
                    pass
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
