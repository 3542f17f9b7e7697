"""Shared fixtures: small random-weight models of real architectures, built offline and saved
with save_pretrained, and helpers to run the workflow in a scratch directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _warm_workers():
    """The warm workers the suite's snakemake runs start are its own (a private directory of the
    session's) and are stopped at its end, as `worker stop` stops them. Meanwhile they exit after
    two idle minutes: they are keyed by environment, so most runs share one, and a few tests that
    change the environment should not leave 0.4 GiB servers waiting for ten minutes each."""
    from layerscope import worker

    saved = {k: os.environ.get(k) for k in ("XDG_RUNTIME_DIR", worker.IDLE)}
    d = tempfile.mkdtemp(prefix="lst")  # short: unix socket paths are limited
    os.environ["XDG_RUNTIME_DIR"] = d
    os.environ.setdefault(worker.IDLE, "120")
    yield
    if os.path.isdir(os.path.join(d, "layerscope")):
        worker.stop_servers(Path(d) / "layerscope")
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Build (once per session) a built-in model and return its manifest entry."""
    from layerscope.models.loading import fetch, parse_ref

    cache: dict[tuple[str, int], dict] = {}

    def make(name: str = "llama-tiny", seed: int = 0) -> dict:
        if (name, seed) not in cache:
            d = tmp_path_factory.mktemp(f"{name}-{seed}")
            cache[(name, seed)] = fetch(parse_ref({"id": f"builtin:{name}", "seed": seed}), d / "weights")
        return cache[(name, seed)]

    return make


@pytest.fixture(scope="session")
def lora_adapter(model_factory, tmp_path_factory):
    from layerscope.models.loading import fetch, parse_ref

    base = model_factory("llama-tiny")
    d = tmp_path_factory.mktemp("lora")
    return fetch(parse_ref({"id": "builtin:lora", "seed": 3}), d / "adapter", what="adapter", base_dir=base["path"])


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def copy_inputs(dst: Path) -> Path:
    """Give a scratch working directory the repository's default config and demo data set."""
    shutil.copytree(REPO / "config", dst / "config")
    return dst


@pytest.fixture
def workdir(tmp_path):
    return copy_inputs(tmp_path)


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """A working directory after `snakemake --cores 2` on the default config, as the README says."""
    wd = copy_inputs(tmp_path_factory.mktemp("demo"))
    res = run_snakemake(wd, "--cores", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return wd


def run_snakemake(workdir: Path, *args: str, configfile: Path | None = None, timeout: int = 900,
                  env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--nocolor"]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=workdir)


def _dry_run(workdir: Path, configfile: Path | None, read: Callable[[Any], Any]) -> Any:
    """``read`` of the DAG a dry run plans, through the Snakemake API."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings, ResourceSettings,
                                          StorageSettings)

    cwd = os.getcwd()
    try:
        with SnakemakeApi(OutputSettings()) as api:
            wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                              config_settings=ConfigSettings(configfiles=[configfile] if configfile else []),
                              storage_settings=StorageSettings(), snakefile=REPO / "Snakefile", workdir=workdir)
            dag = wf.dag(DAGSettings())
            dag.execute_workflow(executor="dryrun")
            return read(wf._workflow.dag)
    finally:
        os.chdir(cwd)


def planned_jobs(workdir: Path, configfile: Path | None = None) -> list[tuple[str, tuple]]:
    """The jobs a dry run plans, as (rule, wildcards) pairs."""
    return _dry_run(workdir, configfile, lambda dag: sorted((j.rule.name, tuple(sorted(j.wildcards_dict.items())))
                                                            for j in dag.needrun_jobs(exclude_finished=False)))


def planned_dependencies(workdir: Path, configfile: Path | None = None) -> dict[str, set[str]]:
    """Each job a dry run plans (``rule`` or ``rule:part``) -> the planned jobs it waits for."""
    def name(job) -> str:
        part = job.wildcards_dict.get("part")
        return job.rule.name if part is None else f"{job.rule.name}:{part}"

    def read(dag) -> dict[str, set[str]]:
        jobs = set(dag.needrun_jobs(exclude_finished=False))
        return {name(j): {name(d) for d in dag.dependencies[j] if d in jobs} for j in jobs}

    return _dry_run(workdir, configfile, read)


@pytest.fixture(autouse=True)
def _package_logging():
    """Tests that run a workflow step in-process route the package's logger to a job log only
    (logs.setup_logging); undo that so later tests' caplog sees the package's warnings."""
    import logging

    yield
    logger = logging.getLogger("layerscope")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.propagate = True


@pytest.fixture(scope="module")
def demo_run(demo) -> Path:
    """The demo's run directory (results/demo)."""
    return demo / "results/demo"


@pytest.fixture(scope="module")
def other_run(tmp_path_factory) -> Path:
    """A second finished run on the demo's tokens (tests/second_run.py)."""
    from tests.second_run import second_run

    return second_run(tmp_path_factory)
