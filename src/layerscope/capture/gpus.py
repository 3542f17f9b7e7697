"""One GPU per capture job on a machine with several.

Snakemake's ``resources: gpu=1`` only counts GPUs; it never says which one a local job should use.
A job therefore claims a free GPU itself, with an exclusive ``flock`` on a lock file per GPU, and
narrows ``CUDA_VISIBLE_DEVICES`` to it before CUDA starts. The kernel drops the lock when the
process exits, however it exits, so a killed job never leaves a GPU claimed. Under SLURM the
scheduler's allocation is used as it is.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger("layerscope.capture.gpus")

_held: list[int] = []  # lock file descriptors this process keeps open (and so keeps claimed)


def lock_dir() -> Path:
    """Where the per-GPU lock files live: ``LAYERSCOPE_GPU_LOCKS``, else a folder in the temp dir."""
    d = Path(os.environ.get("LAYERSCOPE_GPU_LOCKS") or Path(tempfile.gettempdir()) / "layerscope-gpus")
    d.mkdir(parents=True, exist_ok=True)
    return d


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else what nvidia-smi lists
    (asked without starting CUDA in this process)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def claim(gpus: list[str], wait_s: float = 3600.0, poll_s: float = 1.0) -> str:
    """Claim one of ``gpus`` for the life of this process; waits while all are claimed by other jobs."""
    d = lock_dir()
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        for g in gpus:
            fd = os.open(d / f"gpu-{g.replace('/', '_')}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _held.append(fd)
            return g
        if time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU among {', '.join(gpus)} after {wait_s:.0f} s (locks in {d})")
        if not said:
            log.info("all GPUs (%s) are claimed by other jobs; waiting", ", ".join(gpus))
            said = True
        time.sleep(poll_s)


def assign(device: str) -> str:
    """Give this job a GPU of its own where that is needed; returns the device to run on.

    ``cuda`` or ``auto`` with several visible GPUs outside SLURM: claim one, make it the only
    visible device and run on ``cuda``. ``cuda:N``, ``cpu``, ``mps``, one GPU, or a SLURM job
    (whose allocation already names its GPUs): the device as given.
    """
    if device not in ("cuda", "auto") or os.environ.get("SLURM_JOB_ID"):
        return device
    gpus = visible_gpus()
    if len(gpus) < 2:
        return device
    g = claim(gpus)
    os.environ["CUDA_VISIBLE_DEVICES"] = g
    log.info("claimed GPU %s of %s (CUDA_VISIBLE_DEVICES=%s)", g, ", ".join(gpus), g)
    return "cuda"
