"""The default workflow on a real scheduler: a one-node SLURM cluster on this machine
(profiles/slurm/local-cluster.sh: slurmctld + slurmd + munge, no slurmdbd, fake GPUs), driven
through profiles/slurm, must give what a local run gives, and a second submission must submit
nothing. Skipped only where SLURM or munge is not installed or the cluster does not start."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, copy_inputs, run_snakemake

SCRIPT = REPO / "profiles/slurm/local-cluster.sh"
PROFILE = REPO / "profiles/slurm/config.yaml"
RUN = "results/demo"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """Start the cluster; yield the environment its clients need (SLURM_CONF, PATH)."""
    missing = [b for b in ("slurmctld", "slurmd", "srun", "sbatch", "squeue", "munged", "mungekey")
               if shutil.which(b) is None]
    if missing:
        pytest.skip(f"SLURM or munge not installed (no {', '.join(missing)}): apt-get install slurm-wlm munge")
    # A short path: munge's socket lives inside it.
    d = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", str(SCRIPT), "start", str(d)], capture_output=True, text=True, timeout=120)
    if start.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(d)], capture_output=True, timeout=60)
        pytest.skip(f"the local SLURM cluster did not start:\n{start.stdout[-2000:]}{start.stderr[-6000:]}")
    env = {}
    for line in subprocess.run(["bash", str(SCRIPT), "env", str(d)], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = os.path.expandvars(shlex.split(value)[0])
    try:
        yield env
    finally:
        stop = subprocess.run(["bash", str(SCRIPT), "stop", str(d)], capture_output=True, text=True, timeout=120)
        status = subprocess.run(["bash", str(SCRIPT), "status", str(d)], capture_output=True, text=True)
        assert stop.returncode == 0 and status.returncode == 3, stop.stderr + status.stdout


def node_profile(dst: Path) -> Path:
    """profiles/slurm as it is, except what a two-core test node cannot give: capture jobs take
    2 GB each, and the first status check comes after 1 s instead of 20 (the tiny jobs take
    seconds, not hours). Capture jobs keep the local run's two threads: torch's CPU kernels may
    round the last bit of a float32 value differently with another thread count, and the
    boundaries hold float32."""
    profile = yaml.safe_load(PROFILE.read_text())
    profile["set-threads"]["capture"] = 2
    profile["set-resources"]["capture"]["mem_mb"] = 2000
    profile["slurm-init-seconds-before-status-checks"] = 1
    dst.mkdir()
    (dst / "config.yaml").write_text(yaml.safe_dump(profile))
    return dst


def squeue(env: dict) -> list[dict]:
    """Every job the cluster knows: it keeps finished ones for an hour (MinJobAge)."""
    fields = ["JobID", "State", "Comment", "tres-per-job"]
    out = subprocess.run(["squeue", "--states=all", "-h", "-O", ",".join(f"{f}:|" for f in fields)],
                         capture_output=True, text=True, check=True, env={**os.environ, **env}).stdout
    return [dict(zip(fields, (v.strip() for v in line.split("|")))) for line in out.splitlines()]


def _drop(obj, keys):
    if isinstance(obj, dict):
        return {k: _drop(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [_drop(v, keys) for v in obj]
    return obj


def outputs(wd: Path) -> dict[str, bytes]:
    """Every file of the run, byte for byte, except benchmark timings, and with only what says
    when, where or by which job it was made taken out: job ids, seconds and peak memory in the
    completion markers, the store's list of jobs and the summary's layer cache keys, creation
    times, the working directory and file mtimes in the manifest."""
    run = wd / RUN
    out = {}
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run).as_posix()
        if not p.is_file() or rel.startswith("benchmarks/"):
            continue
        data = p.read_bytes()
        if "/parts/" in rel:
            data = json.dumps(_drop(json.loads(data), {"job", "seconds", "peak_rss_mib"})).encode()
        elif rel.startswith("summaries/layers/"):  # a layer's results, keyed by the job ids that wrote it
            data = json.dumps(_drop(json.loads(data), {"key"})).encode()
        elif rel == "activations.zarr/zarr.json":
            meta = json.loads(data)
            del meta["attributes"]["layerscope"]["jobs"]
            data = json.dumps(meta).encode()
        elif rel in ("metadata.json", "summaries/summary.json", "dashboard/index.html"):
            data = re.sub(rb'"created": ?"[^"]*"', b'"created": null', data)
        elif rel in ("model/manifest.json", "run_config.json"):
            text = data.decode().replace(str(wd), "WORKDIR")
            data = json.dumps(_drop(json.loads(text), {"mtime_ns"})).encode()
        out[rel] = data
    return out


class Submission:
    """`snakemake --workflow-profile PROFILE` in a scratch copy of the default inputs, running in
    the background until `result()` is asked for."""

    def __init__(self, wd: Path, profile: Path, env: dict):
        self.wd, self.profile, self.log_path = wd, profile, wd.parent / f"{wd.name}.log"
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(wd),
               "--nocolor", "--workflow-profile", str(profile)]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=wd,
                                         env={**os.environ, **env})

    def result(self, timeout: float = 900) -> str:
        rc = self.proc.wait(timeout)
        log = self.log_path.read_text()
        assert rc == 0, log[-6000:]
        return log


@pytest.fixture(scope="session")
def slurm_run(cluster, tmp_path_factory):
    """The default workflow submitted to the cluster. Session-scoped and started before `demo`
    (the local run it is compared with) is built, so that the local run uses the cores while
    the SLURM jobs wait for their status checks."""
    wd = copy_inputs(tmp_path_factory.mktemp("slurm-run"))
    run = Submission(wd, node_profile(tmp_path_factory.mktemp("profile") / "slurm"), cluster)
    try:
        yield run
    finally:
        if run.proc.poll() is None:
            run.proc.terminate()
            run.proc.wait(60)


def test_slurm_run_equals_local_run(slurm_run, demo, cluster):
    log = slurm_run.result()
    jobs = squeue(cluster)
    # Every step but the local capture_settings went through sbatch: the capture jobs one per
    # block and part, each with a GPU of its own, the short steps in one job before and after.
    assert len(re.findall(r"has been submitted with SLURM jobid", log)) == len(jobs) == 6, (jobs, log[-3000:])
    assert all(j["State"] == "COMPLETED" for j in jobs), jobs
    captures = sorted(j["Comment"] for j in jobs if "capture" in j["Comment"])
    assert captures == [f"rule_capture_L{b}_wildcards_{p}" for b in ("00-01", "02-03") for p in (0, 1)], jobs
    assert all(j["tres-per-job"] == "gres:gpu:1" for j in jobs if "capture" in j["Comment"]), jobs
    assert "localrule capture_settings" in log

    got, want = outputs(slurm_run.wd), outputs(demo)
    assert got.keys() == want.keys()
    assert sum(bool(re.fullmatch(r"activations.zarr/layer_\d\d/\w+/c/[\d/]+", k)) for k in got) == 32  # 16 arrays x 2 parts
    assert [k for k in got if got[k] != want[k]] == []


def test_second_submission_runs_nothing(slurm_run, cluster):
    slurm_run.result()
    before = squeue(cluster)
    res = run_snakemake(slurm_run.wd, "--workflow-profile", str(slurm_run.profile), env=cluster, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert "Nothing to be done" in log and "submitted with SLURM jobid" not in log
    assert squeue(cluster) == before
