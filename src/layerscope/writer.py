"""A background writer: the forward pass keeps running while finished shards go to disk."""

from __future__ import annotations

import queue
import threading
from typing import Callable


class ShardWriter:
    """Runs submitted write calls in order on one thread, with at most ``depth`` waiting.

    An error in a write is raised in the submitting thread at the next ``submit`` or at
    ``close``, so a failing disk stops the job promptly instead of hanging it.

    With ``threaded=False`` the calls run at once in the caller: on a CPU whose cores all run
    the model's matrix products, a writer thread only steals cycles from them (measured in
    benchmarks/capture.py), so there is nothing to overlap with.
    """

    def __init__(self, depth: int = 4, threaded: bool = True) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="layerscope-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            fn = self._q.get()
            try:
                if fn is None:
                    return
                if self._error is None:
                    fn()
            except BaseException as e:  # handed to the submitting thread
                self._error = e
            finally:
                self._q.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"writing a shard failed: {type(err).__name__}: {err}") from err

    def submit(self, fn: Callable[[], None]) -> None:
        self._raise()
        if self._thread is None:
            try:
                fn()
            except BaseException as e:
                self._error = e
                self._raise()
            return
        while True:
            try:
                self._q.put(fn, timeout=0.5)
                return
            except queue.Full:
                self._raise()

    def close(self) -> None:
        """Wait for every submitted write; raise the first error, if any."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
        self._raise()
