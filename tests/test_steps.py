"""Workflow steps: one clear line for known errors, the whole traceback in the log for the rest, and
nothing half-written left behind."""

from __future__ import annotations

import pytest

import layerscope.capture.run as cap
from layerscope.errors import DataError
from layerscope.steps import run_step
from tests.helpers import capture_store, make_params, prepare_texts


def test_known_errors_are_one_line_and_others_keep_their_traceback(tmp_path):
    def bad_data():
        raise DataError("data.jsonl:3: 'text' is empty")

    def bug():
        return [][1]

    for fn, want in ((bad_data, "data.jsonl:3: 'text' is empty"), (bug, "IndexError: list index out of range")):
        log = tmp_path / f"{fn.__name__}.log"
        with pytest.raises(SystemExit) as e:
            run_step(str(log), fn)
        assert e.value.code == 1
        text = log.read_text()
        assert want in text
        assert ("Traceback" in text) == (fn is bug)


def test_a_failing_job_leaves_no_temporary_boundary_or_shard(tmp_path, model_factory, monkeypatch):
    m = model_factory("llama-tiny")
    ds = prepare_texts(tmp_path, m)
    params = make_params({0: {"sites": ["resid_post"], "positions": "all"},
                          3: {"sites": ["resid_post"], "positions": "all"}}, parts=1)
    real = cap.BoundaryWriter.write
    calls = []

    def full(self, t0, rows):
        calls.append(t0)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(self, t0, rows)

    monkeypatch.setattr(cap.BoundaryWriter, "write", full)
    with pytest.raises(OSError, match="No space left"):
        capture_store(tmp_path, {"model": m, "adapter": None}, params, ds, layers_per_job=2)
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert not list((tmp_path / "store-chain").rglob("*.safetensors"))
    assert not list((tmp_path / "store.zarr").rglob("parts/*.json"))


CHILD = r"""
import sys, time
from pathlib import Path
from layerscope.steps import run_step

def work(tmp):
    part = Path(tmp)
    part.write_text("half-written")
    try:
        while True:
            time.sleep(0.1)
    finally:
        part.unlink()

run_step(sys.argv[1], work, tmp=sys.argv[2])
"""

PARENT = r"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("via_shell", [False, True])
def test_a_job_stops_and_cleans_up_when_snakemake_dies(tmp_path, via_shell):
    import os
    import signal
    import subprocess
    import sys
    import time

    log, tmp = tmp_path / "job.log", tmp_path / "part.tmp"
    parent = PARENT
    if via_shell:  # Snakemake may start a job through a shell that outlives it
        parent = parent.replace('[sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]]',
                                '["/bin/sh", "-c", "\\"$0\\" -c \\"$1\\" \\"$2\\" \\"$3\\"; true", sys.executable, '
                                'sys.argv[1], sys.argv[2], sys.argv[3]]')
    p = subprocess.Popen([sys.executable, "-c", parent, CHILD, str(log), str(tmp)], stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    for _ in range(100):
        if tmp.exists():
            break
        time.sleep(0.1)
    assert tmp.exists()
    os.kill(p.pid, signal.SIGKILL)  # snakemake killed: no chance to stop its jobs itself
    p.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if not tmp.exists() and "stopping" in log.read_text():
            break
        time.sleep(0.1)
    assert not tmp.exists()  # the job unwound: its finally blocks ran
    assert "the snakemake process that started this job is gone: stopping" in log.read_text()
