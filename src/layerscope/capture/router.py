"""Routing captured rows into an array's shard files, chunk by chunk.

Forward hooks hand a router the rows of one array as the model produces them; the router
copies them into reusable chunk buffers (converting to the storage dtype on the way) and, once a
chunk and every chunk before it are complete, hands it to a writer thread that streams it into
its shard file (see store/shards.py), which is renamed into place once whole.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from layerscope.capture.journal import Journal
from layerscope.store.layout import Layout
from layerscope.store.shards import ShardFile, aligned_empty
from layerscope.store.writer import ShardWriter


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
    variant: str = ""  # "" for the main store's arrays

    def __post_init__(self) -> None:
        if self.start < 0:
            self.start = self.r0

    @property
    def name(self) -> str:
        name = f"layer_{self.layer:02d}/{self.site}/{self.positions}"
        return f"{self.variant}:{name}" if self.variant else name


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
