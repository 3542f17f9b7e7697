"""A capture job: run the model over one part of the examples and write one group of layers.

The forward pass stops after the highest layer the job needs. Rows go into per-array shard
buffers; each full shard is handed to a background writer and written whole, once.
"""

from __future__ import annotations

import logging
import math
import os
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
from layerscope.store import (STORAGE_DTYPES, Layout, array_metadata, make_layout, prepare_array, write_marker)
from layerscope.writer import ShardWriter

log = logging.getLogger("layerscope.capture")

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def site_width(site: str, hidden: int, intermediate: int) -> int:
    return intermediate if site == "mlp_act" else hidden


@dataclass
class ArrayJob:
    """One array's share of this job: its layout, row range and the shard being filled."""

    layer: int
    site: str
    positions: str
    layout: Layout
    r0: int
    r1: int
    zarr_array: Any = None
    buf: np.ndarray | None = None
    shard: int = -1
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


class Router:
    """Copies captured rows into shard buffers and submits whole shards to the writer."""

    def __init__(self, job: ArrayJob, dtype: np.dtype, writer: ShardWriter) -> None:
        self.j, self.dtype, self.writer = job, dtype, writer

    def _flush(self) -> None:
        j = self.j
        s0 = j.shard * j.layout.shard_rows
        s1 = min(s0 + j.layout.shard_rows, j.layout.rows)
        buf, arr = j.buf, j.zarr_array
        self.writer.submit(lambda: arr.__setitem__(slice(s0, s1), buf[: s1 - s0]))
        j.written.append(j.shard)
        j.buf = None

    def add(self, g0: int, rows: np.ndarray) -> None:
        """Rows ``rows`` hold global rows [g0, g0 + len(rows)); keep the ones in this job's range."""
        j = self.j
        lo, hi = max(g0, j.r0), min(g0 + len(rows), j.r1)
        sr = j.layout.shard_rows
        while lo < hi:
            shard = lo // sr
            if shard != j.shard:
                j.shard = shard
                j.buf = np.empty((sr, j.layout.width), dtype=self.dtype)
            s0 = shard * sr
            end = min(hi, s0 + sr)
            j.buf[lo - s0:end - s0] = rows[lo - g0:end - g0]
            lo = end
            if end == min(s0 + sr, j.r1):
                self._flush()

    def done(self) -> None:
        if self.j.buf is not None:
            raise RuntimeError(f"{self.j.layer}/{self.j.site}: shard {self.j.shard} incomplete at end of job")


def _to_numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    x = x.to(TORCH_DTYPES[dtype])
    if dtype == "bfloat16":
        x = x.view(torch.int16)
    a = x.cpu().numpy()
    return a.view(np.uint16) if dtype == "bfloat16" else a


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
                params: dict[str, Any], part: int, device: str = "auto", group: str = "") -> dict[str, Any]:
    """Capture this job's layers for this part of the examples into the store; write completion markers."""
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

    stats = {"examples": [e0, e1], "tokens": int(offsets[e1] - offsets[e0]) if e1 > e0 else 0}
    if e1 > e0:
        _capture_examples(manifest, params, device, jobs, token_ids, offsets, e0, e1, root, part, group)
    elapsed = time.perf_counter() - t_start
    for j in jobs:
        write_marker(root, j.layer, j.site, part, {"rows": [j.r0, j.r1], "shards": j.written, **stats,
                                                    "seconds": round(elapsed, 3)})
    log.info("job %s part %d done in %.1f s (%d tokens, %.0f tokens/s)", group, part, elapsed, stats["tokens"],
             stats["tokens"] / max(elapsed, 1e-9))
    return stats


def _capture_examples(manifest, params, device, jobs, token_ids, offsets, e0, e1, root, part, group) -> None:
    import zarr

    dev = resolve_device(device)
    model, tokenizer = load_model(manifest, dev, params["model_dtype"], params["trust_remote_code"])
    layer_mods = S.decoder_layers(model, manifest["model"]["num_layers"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    np_dtype = STORAGE_DTYPES[params["dtype"]]
    writer = ShardWriter(depth=4)
    routers: list[Router] = []
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for i, j in enumerate(jobs):
        j.zarr_array = zarr.open_array(str(root / f"layer_{j.layer:02d}" / j.site), mode="r+", zarr_format=3)
        routers.append(Router(j, np_dtype, writer))
        handles.append(S.attach(layer_mods[j.layer], j.layer, j.site, lambda x, i=i: captured.__setitem__(i, x)))
    top = max(j.layer for j in jobs)
    handles.append(S.attach_stop(layer_mods[top]))
    bs = params["batch_size"]
    left = params["padding_side"] == "left"
    n_batches = math.ceil((e1 - e0) / bs)
    ok = False
    try:
        with torch.inference_mode():
            for b0 in tqdm(range(e0, e1, bs), total=n_batches, desc=f"capture {group} part {part}", unit="batch",
                           mininterval=1.0):
                b1 = min(b0 + bs, e1)
                lens = (offsets[b0 + 1:b1 + 1] - offsets[b0:b1]).astype(np.int64)
                T = int(lens.max())
                ids = np.full((b1 - b0, T), pad_id, dtype=np.int64)
                mask = np.zeros((b1 - b0, T), dtype=np.int64)
                for k in range(b1 - b0):
                    row = token_ids[offsets[b0 + k]:offsets[b0 + k + 1]]
                    sl = slice(T - len(row), T) if left else slice(0, len(row))
                    ids[k, sl] = row
                    mask[k, sl] = 1
                ids_t = torch.from_numpy(ids).to(dev)
                mask_t = torch.from_numpy(mask).to(dev)
                pos_t = (mask_t.cumsum(-1) - 1).clamp(min=0)
                captured.clear()
                try:
                    model(input_ids=ids_t, attention_mask=mask_t, position_ids=pos_t, use_cache=False)
                except S.StopForward:
                    pass
                sel = mask_t.bool()
                last_idx = torch.from_numpy(np.where(left, T - 1, lens - 1)).to(dev)
                ar = torch.arange(b1 - b0, device=dev)
                for i, j in enumerate(jobs):
                    x = captured[i]
                    if j.positions == "last":
                        routers[i].add(b0, _to_numpy(x[ar, last_idx], params["dtype"]))
                    else:
                        routers[i].add(int(offsets[b0]), _to_numpy(x[sel], params["dtype"]))
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
