"""A job stops when the Snakemake that started it dies.

Killing ``snakemake`` itself (not a job) would otherwise leave its capture jobs running, holding
cores, GPUs and half-written files. Snakemake starts a ``script:`` job from its own process,
sometimes through a shell; a thread here watches that parent (and the shell's parent) and, once
it is gone, turns the loss into SIGTERM, which the job handles like Ctrl-C: it unwinds, so
temporary shard and boundary files are removed on the way out. Linux only (``/proc``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

log = logging.getLogger("layerscope.watchdog")

SHELLS = {"sh", "bash", "dash", "zsh"}
POLL_S = 1.0


def _parent_of(pid: int) -> int | None:
    try:
        # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def exit_with_parent() -> bool:
    """Start watching the process that started this job; returns False where that cannot be done."""
    if not Path("/proc/self/stat").is_file() or threading.current_thread() is not threading.main_thread():
        return False
    parent = os.getppid()
    # Through a shell, the shell outlives a killed Snakemake: watch the shell's parent too.
    grandparent = _parent_of(parent) if _comm(parent) in SHELLS else None
    signal.signal(signal.SIGTERM, _terminate)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(POLL_S):
            if os.getppid() != parent or (grandparent is not None and _parent_of(parent) != grandparent):
                log.error("the snakemake process that started this job is gone: stopping")
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="layerscope-watchdog", daemon=True).start()
    return True
