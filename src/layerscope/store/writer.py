"""Background writers: the forward pass keeps running while finished chunks go to disk."""

from __future__ import annotations

import queue
import threading
from typing import Callable


class ShardWriter:
    """Runs submitted write calls on ``threads`` writer threads ("lanes"), in order within a
    lane, with at most ``depth`` calls waiting per lane. Calls for one file must share a lane.

    An error in a write is raised in the submitting thread at the next ``submit`` or at
    ``close``, so a failing disk stops the job promptly instead of hanging it.

    With ``threads=0`` the calls run at once in the caller: on a CPU whose cores all run the
    model's matrix products, buffered writes on a thread only steal cycles from them (measured
    in benchmarks/capture.py), so there is nothing to overlap with.
    """

    def __init__(self, depth: int = 4, threads: int = 1) -> None:
        self._error: BaseException | None = None
        self._queues = [queue.Queue(maxsize=depth) for _ in range(threads)]
        self._threads = [threading.Thread(target=self._run, args=(q,), name=f"layerscope-writer-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        for t in self._threads:
            t.start()

    def _run(self, q: queue.Queue) -> None:
        while True:
            fn = q.get()
            try:
                if fn is None:
                    return
                if self._error is None:
                    fn()
            except BaseException as e:  # handed to the submitting thread
                self._error = e
            finally:
                q.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"writing a shard failed: {type(err).__name__}: {err}") from err

    def submit(self, fn: Callable[[], None], lane: int = 0) -> None:
        self._raise()
        if not self._queues:
            try:
                fn()
            except BaseException as e:
                self._error = e
                self._raise()
            return
        q = self._queues[lane % len(self._queues)]
        while True:
            try:
                q.put(fn, timeout=0.5)
                return
            except queue.Full:
                self._raise()

    def close(self) -> None:
        """Wait for every submitted write; raise the first error, if any."""
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
        self._raise()
