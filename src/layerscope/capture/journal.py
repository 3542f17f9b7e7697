"""Progress of a capture job, kept where a re-run of the job can find it.

Snakemake deletes a job's declared outputs (its markers and its boundary) before running it
again, so the progress of a killed or preempted job lives beside the store instead: finished
shards stay in the store (each was renamed into place whole), a journal (one JSON line per
event) says which ones they are, and the outgoing boundary is written in place in the
progress directory, with the journal saying how many batches of it are written. A re-run with
the same key keeps all of that and restarts at the first batch that some unfinished shard or
the boundary still needs, so the finished store is the one an uninterrupted run writes.

The journal survives the process (kill -9, preemption, out of memory), not the machine: like
Snakemake's own bookkeeping it does not fsync.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("layerscope.capture.journal")


def progress_dir(store_root: str | os.PathLike) -> Path:
    """Where the jobs writing ``store_root`` keep their progress (``results/RUN/activations.progress``)."""
    root = Path(store_root)
    return root.with_name(root.name.removesuffix(".zarr") + ".progress")


class Journal:
    """Append-only record of one job's finished shards and written boundary batches."""

    def __init__(self, directory: str | os.PathLike, name: str, key: dict[str, Any]) -> None:
        self.dir = Path(directory)
        self.path = self.dir / f"{name}.jsonl"
        self.name = name
        self.key = json.loads(json.dumps(key))  # as it reads back from the file
        self.shards: dict[str, dict[int, dict[str, int]]] = {}  # array -> shard -> value counts
        self.batches = 0
        self.loaded = False  # whether load() found a previous attempt's progress to go on from
        self._lock = threading.Lock()
        self._fd = -1

    def load(self) -> bool:
        """Read what a previous attempt with the same key finished; False (and a fresh start) otherwise."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return False
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a killed writer may be cut short
                break
        if not events or events[0].get("key") != self.key:
            log.info("progress in %s is from another configuration: starting over", self.path)
            return False
        self.loaded = True
        for e in events[1:]:
            if "shard" in e:
                self.shards.setdefault(e["array"], {})[e["shard"]] = e["counts"]
            elif "batches" in e:  # the latest word counts: a restarted boundary starts again from 0
                self.batches = e["batches"]
        return True

    def start(self, resumed: bool, batches: int = 0) -> None:
        """Open the journal for appending: a fresh one, or the loaded one going on from ``batches``
        boundary batches (fewer than it said where the boundary file could not be kept)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not resumed:
            self.shards = {}
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"key": self.key, "pid": os.getpid()}) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.batches = batches if resumed else 0
        if resumed:
            self.batches_done(self.batches)

    def _append(self, event: dict[str, Any]) -> None:
        line = (json.dumps(event) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)

    def shard_done(self, array: str, shard: int, counts: dict[str, int]) -> None:
        """Called once a shard file is in place (from a writer thread)."""
        self._append({"array": array, "shard": shard, "counts": counts})

    def batches_done(self, n: int) -> None:
        """The boundary holds the rows of the first ``n`` batches."""
        self._append({"batches": n})

    def partial(self, variant: str) -> Path:
        """Where a variant's outgoing boundary is written until complete."""
        return self.dir / f"{self.name}.{variant}.boundary"

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """The job finished: its outputs say everything the journal did."""
        self.close()
        self.path.unlink(missing_ok=True)
        for f in self.dir.glob(f"{self.name}.*.boundary"):
            f.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:  # other jobs' progress is still there
            pass
