"""Writing Zarr v3 shards directly, chunk by chunk, as a capture produces them.

A shard of a [rows, width] array whose inner chunks span the full width is a sequence of
encoded chunks followed by an index (offset, length per chunk, little-endian uint64) and the
index's CRC32C: the layout of zarr's sharding codec with its default index at the end. We
stream the chunks into a temporary file while the model keeps running, then write the index
and rename the file into place, so a reader sees each shard whole, once, or not at all, and
the capture holds one chunk per array in memory instead of a whole shard.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
from google_crc32c import value as crc32c

from layerscope.fileio import PendingFile

EMPTY = 2**64 - 1


def chunk_encoder(store_cfg: dict[str, Any], itemsize: int) -> Callable[[np.ndarray], Any]:
    """Encode one C-ordered chunk the way the array's codecs (see store.array_metadata) decode it."""
    c = store_cfg.get("compression", "none")
    level = store_cfg.get("compression_level", 3)
    if c == "zstd":
        from numcodecs import Zstd

        codec = Zstd(level=level, checksum=False)
        return lambda a: codec.encode(np.ascontiguousarray(a))
    if c == "blosc":
        from numcodecs import Blosc

        codec = Blosc(cname="zstd", clevel=min(level, 9), shuffle=Blosc.BITSHUFFLE, blocksize=0)
        codec.typesize = itemsize
        return lambda a: codec.encode(np.ascontiguousarray(a))
    return lambda a: memoryview(np.ascontiguousarray(a)).cast("B")


def shard_key(array_dir: str | os.PathLike, shard: int) -> Path:
    """The file of row-shard ``shard`` under the default chunk key encoding (``c/<row>/<col>``)."""
    return Path(array_dir) / "c" / str(shard) / "0"


ALIGN = 4096  # O_DIRECT wants buffer addresses, sizes and file offsets in whole blocks


def aligned_empty(nbytes: int) -> np.ndarray:
    """Zeroed bytes whose address is a multiple of ALIGN (so O_DIRECT can write them as they are)."""
    raw = np.zeros(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes]


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def direct_io_supported(directory: str | os.PathLike) -> bool:
    """Whether files in ``directory`` can be written with O_DIRECT (not on tmpfs, not on macOS)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = Path(directory) / f".direct-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        buf = aligned_empty(ALIGN)
        os.write(fd, buf)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        view = view[os.write(fd, view):]


class ShardFile(PendingFile):
    """One shard being streamed to disk; call ``append`` per inner chunk, then ``close``.

    With ``direct`` the chunks go to disk with O_DIRECT: the disk copies them by DMA instead
    of the CPU copying them into the page cache, so a writer thread costs the model almost no
    processor time. Every write then starts on a block boundary; the gap after a chunk whose
    size is not a whole number of blocks is unused space that the index skips.
    """

    def __init__(self, array_dir: str | os.PathLike, shard: int, chunks_per_shard: int,
                 encode: Callable[[np.ndarray], Any], direct: bool = False) -> None:
        self.direct = False
        if direct:
            try:
                super().__init__(shard_key(array_dir, shard), os.O_DIRECT)
                self.direct = True
            except OSError:
                pass
        if not self.direct:
            super().__init__(shard_key(array_dir, shard))
        self.encode = encode
        self.index: list[tuple[int, int]] = []
        self.n = chunks_per_shard
        self.offset = 0
        self._staging: np.ndarray | None = None

    def _write(self, data: Any, pad_front: bool = False) -> int:
        """Write ``data`` zero-padded to whole blocks at the current offset; returns the bytes written.

        Buffered and direct writes lay out the file identically, so a store's bytes do not
        depend on whether its file system supports O_DIRECT.
        """
        view = memoryview(data).cast("B")
        n = view.nbytes
        size = _round_up(n)
        arr = np.frombuffer(view, dtype=np.uint8)
        if not self.direct:
            pad = bytes(size - n)
            for part in ((pad, view) if pad_front else (view, pad)):
                _write_all(self.fd, part)
            return size
        if arr.ctypes.data % ALIGN == 0 and n == size:
            out = arr
        else:  # stage into aligned memory
            if self._staging is None or self._staging.nbytes < size:
                self._staging = aligned_empty(size)
            out = self._staging[:size]
            out[:] = 0
            if pad_front:
                out[size - n:] = arr
            else:
                out[:n] = arr
        _write_all(self.fd, out)
        return size

    def append(self, chunk: np.ndarray) -> None:
        data = self.encode(chunk)
        nbytes = memoryview(data).nbytes
        grown = self._write(data)
        self.index.append((self.offset, nbytes))
        self.offset += grown

    def close(self) -> None:
        """Write the index (last in the file, as the sharding codec reads it) and move the shard into place."""
        entries = self.index + [(EMPTY, EMPTY)] * (self.n - len(self.index))
        index = struct.pack(f"<{2 * self.n}Q", *(v for e in entries for v in e))
        self._write(index + struct.pack("<I", crc32c(index)), pad_front=True)
        self.commit()


def read_index(raw: np.ndarray, n_chunks: int) -> np.ndarray:
    """The [n_chunks, 2] (offset, length) index at the end of a shard file's bytes; checks its CRC32C."""
    size = 16 * n_chunks
    index = raw[-(size + 4):-4].tobytes()
    (crc,) = struct.unpack("<I", raw[-4:].tobytes())
    if crc32c(index) != crc:
        raise ValueError("shard index checksum mismatch")
    return np.frombuffer(index, dtype="<u8").reshape(n_chunks, 2)


class ShardMap:
    """Memory-mapped, uncompressed shards of one [rows, width] array: rows straight from the page
    cache, without zarr-python's per-call cost (the fast path of the reader)."""

    def __init__(self, array_dir: str | os.PathLike, rows: int, width: int, chunk_rows: int, shard_rows: int,
                 dtype: np.dtype, fill: Any) -> None:
        self.dir = Path(array_dir)
        self.rows, self.width, self.cr, self.sr = rows, width, chunk_rows, shard_rows
        self.dtype, self.fill = np.dtype(dtype).newbyteorder("<"), fill
        self._chunks: dict[int, list[np.ndarray | None]] = {}

    def chunks(self, shard: int) -> list[np.ndarray | None]:
        """The inner chunks of a shard as [chunk_rows, width] views (None where the chunk is empty)."""
        if shard not in self._chunks:
            n = self.sr // self.cr
            path = shard_key(self.dir, shard)
            if not path.is_file():
                self._chunks[shard] = [None] * n
            else:
                raw = np.memmap(path, dtype=np.uint8, mode="r")
                views: list[np.ndarray | None] = []
                nbytes = self.cr * self.width * self.dtype.itemsize
                for off, length in read_index(raw, n):
                    if off == EMPTY:
                        views.append(None)
                    elif length != nbytes:
                        raise ValueError(f"{path}: chunk of {length} bytes, expected {nbytes} (compressed?)")
                    else:
                        views.append(raw[off:off + length].view(self.dtype).reshape(self.cr, self.width))
                self._chunks[shard] = views
        return self._chunks[shard]

    def read(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) as one new array."""
        out = np.empty((max(r1 - r0, 0), self.width), dtype=self.dtype)
        r = r0
        while r < r1:
            c = r // self.cr
            end = min((c + 1) * self.cr, r1)
            view = self.chunks(c * self.cr // self.sr)[c % (self.sr // self.cr)]
            i0 = r - c * self.cr
            out[r - r0:end - r0] = self.fill if view is None else view[i0:i0 + end - r]
            r = end
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at arbitrary indices, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.width), dtype=self.dtype)
        chunk_of = rows // self.cr
        order = np.argsort(chunk_of, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk_of[order])) + 1
        for group in np.split(order, bounds):
            if not len(group):
                continue
            c = int(chunk_of[group[0]])
            view = self.chunks(c * self.cr // self.sr)[c % (self.sr // self.cr)]
            out[group] = self.fill if view is None else view[rows[group] - c * self.cr]
        return out
