"""A job stops when the Snakemake that started it dies.

Killing ``snakemake`` itself (not a job) would otherwise leave its capture jobs running, holding
cores, GPUs and half-written files. Snakemake starts a ``script:`` job from its own process,
sometimes through a shell; a thread here watches that parent (and the shell's parent) and, once
it is gone, turns the loss into SIGTERM, which the job handles like Ctrl-C: it unwinds, so
temporary shard and boundary files are removed on the way out. A step run in the warm worker
(worker.py) watches the job's own process the same way, since its parent is the worker's server.
Linux only (``/proc``).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
from pathlib import Path

log = logging.getLogger("layerscope.watchdog")

SHELLS = {"sh", "bash", "dash", "zsh"}
POLL_S = 1.0


def _stat(pid: int) -> list[str] | None:
    try:
        # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _parent_of(pid: int) -> int | None:
    fields = _stat(pid)
    try:
        return int(fields[1]) if fields else None
    except (ValueError, IndexError):
        return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot), or None if it is gone or a zombie:
    with the pid, it names one process even after the pid is reused."""
    fields = _stat(pid)
    if not fields or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])
    except (ValueError, IndexError):
        return None


def job_owner() -> int | None:
    """The process that started this job: the parent, or the shell's parent when started through
    a shell (a shell outlives a killed Snakemake). None where /proc is missing."""
    if not Path("/proc/self/stat").is_file():
        return None
    parent = os.getppid()
    return _parent_of(parent) if _comm(parent) in SHELLS else parent


def _terminate(signum, frame) -> None:
    # A second SIGTERM (the watchdog and Snakemake both sending one) must not cut the clean-up short.
    signal.signal(signum, signal.SIG_IGN)
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


def exit_with_process(pid: int, what: str, pidfd: int | None = None) -> bool:
    """Stop this process (SIGTERM, handled as above) once process ``pid``, not a parent, is gone.

    ``pidfd`` (from os.pidfd_open, taken while ``pid`` was surely alive) makes the watch exact and
    immediate; without one it polls /proc, telling a reused pid apart by its start time.
    """
    if not Path("/proc/self/stat").is_file() or threading.current_thread() is not threading.main_thread():
        return False
    start = process_start(pid)
    signal.signal(signal.SIGTERM, _terminate)

    def watch() -> None:
        if pidfd is not None:
            p = select.poll()
            p.register(pidfd, select.POLLIN)  # readable once the process has exited
            while not p.poll():
                pass
        else:
            while start is not None and process_start(pid) == start:
                threading.Event().wait(POLL_S)
        log.error("%s is gone: stopping", what)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="layerscope-watchdog", daemon=True).start()
    return True
