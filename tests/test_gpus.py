"""One GPU per capture job: jobs on one machine claim different GPUs, wait when all are taken, and a
killed job frees its GPU. Tested without a GPU: the device list is CUDA_VISIBLE_DEVICES, faked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from layerscope.capture import gpus
JOB = r"""
import os, sys, time
from layerscope.capture.gpus import assign
device = assign(sys.argv[1])
print(device, os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
time.sleep(60)
"""


def start(tmp_path, device="cuda", **env):
    e = {**os.environ, "LAYERSCOPE_GPU_LOCKS": str(tmp_path), "CUDA_VISIBLE_DEVICES": "0,1,2", **env}
    if "SLURM_JOB_ID" not in env:  # as on a machine outside SLURM, whatever runs the tests
        e.pop("SLURM_JOB_ID", None)
    return subprocess.Popen([sys.executable, "-c", JOB, device], stdout=subprocess.PIPE, text=True, env=e)


def test_jobs_claim_different_gpus_and_a_killed_job_frees_its_gpu(tmp_path):
    jobs = [start(tmp_path) for _ in range(3)]
    try:
        got = [j.stdout.readline().split() for j in jobs]
        assert sorted(g for _, g in got) == ["0", "1", "2"] and {d for d, _ in got} == {"cuda"}
        waiting = start(tmp_path)  # a fourth job waits: every GPU is taken
        time.sleep(2.5)
        assert waiting.poll() is None
        freed = got[1][1]
        jobs[1].send_signal(signal.SIGKILL)  # no clean exit: the kernel still drops its lock
        jobs[1].wait()
        line = waiting.stdout.readline().split()
        jobs.append(waiting)
        assert line == ["cuda", freed]
    finally:
        for j in jobs:
            j.kill()
            j.wait()


@pytest.mark.parametrize("device,env", [
    ("cuda:1", {}),                             # an explicit device is used as given
    ("cpu", {}),
    ("cuda", {"SLURM_JOB_ID": "42"}),           # SLURM already allocated this job's GPUs
    ("cuda", {"CUDA_VISIBLE_DEVICES": "3"}),    # one GPU: nothing to share out
])
def test_devices_left_as_given(tmp_path, device, env):
    job = start(tmp_path, device, **env)
    try:
        d, visible = job.stdout.readline().split()
        assert d == device and visible == env.get("CUDA_VISIBLE_DEVICES", "0,1,2")
        assert not list(tmp_path.glob("gpu-*.lock"))
    finally:
        job.kill()
        job.wait()


def test_claim_times_out_with_one_message(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSCOPE_GPU_LOCKS", str(tmp_path))
    holder = start(tmp_path, CUDA_VISIBLE_DEVICES="0,1")
    other = start(tmp_path, CUDA_VISIBLE_DEVICES="0,1")
    try:
        taken = {holder.stdout.readline().split()[1], other.stdout.readline().split()[1]}
        assert taken == {"0", "1"}
        with pytest.raises(TimeoutError, match=r"no free GPU among 0, 1 after 1 s"):
            gpus.claim(["0", "1"], wait_s=1.0, poll_s=0.2)
    finally:
        for j in (holder, other):
            j.kill()
            j.wait()
