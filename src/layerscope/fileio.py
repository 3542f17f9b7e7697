"""Small file helpers: atomic writes and hashing."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    The rename makes this safe against a crashed or killed process; it does not fsync, so it
    promises nothing across a power loss (neither does Snakemake's own bookkeeping), unless
    ``durable``: then the file and its directory are fsynced (for what a person typed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class PendingFile:
    """A file written under a temporary name beside its target and renamed into place when complete
    (``commit``), so a reader sees it whole or not at all; ``abort`` removes the temporary file."""

    def __init__(self, path: str | os.PathLike, flags: int = 0, tmp: str | os.PathLike | None = None) -> None:
        """``tmp``: a fixed temporary path (on the same file system) whose contents are kept, so a
        later attempt can go on writing where a killed one stopped; ``abort`` then keeps it too."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keep = tmp is not None
        self.tmp = Path(tmp) if tmp is not None else self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | (0 if self.keep else os.O_TRUNC) | flags, 0o644)

    def commit(self) -> None:
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the temporary file (a no-op once the file was moved into place, or for a resumable one)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.keep:
            self.tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Atomically write ``obj`` as UTF-8 JSON."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def human_bytes(n: float) -> str:
    """A byte count for people: ``512 B``, ``1.5 KiB``, ``3.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
