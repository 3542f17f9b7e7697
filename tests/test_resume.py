"""Resume inside a capture job: a killed job's re-run keeps every finished shard and gives the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerscope.capture.chain import boundary_path
from layerscope.capture.journal import progress_dir
from layerscope.capture.run import run_capture
from layerscope.data.dataset import load_tokens
from layerscope.store.layout import finalize
from tests.conftest import REPO
from tests.helpers import make_params, prepare_texts

# Enough examples of mixed length, and shards small enough, that a job writes many shards.
TEXTS = [" ".join(f"word{(i * 7 + k) % 13}" for k in range(3 + (i * 5) % 17)) for i in range(90)]
LAYERS = {0: {"sites": ["resid_post", "mlp_act"], "positions": "all"}, 1: {"sites": ["resid_post"], "positions": "last"},
          3: {"sites": ["resid_post"], "positions": "all"}}
BLOCKS = [(0, 1), (2, 3)]  # block 0 hands block 1 the stream entering layer 2


def job_args(tmp: Path, manifest: dict, params: dict, dataset: Path, name: str, block: tuple[int, int]) -> dict:
    start, end = block
    chain = tmp / f"{name}-chain"
    return {"manifest": manifest, "dataset_dir": str(dataset), "store_root": str(tmp / f"{name}.zarr"),
            "params": {k: v for k, v in params.items() if k != "layers"} | {"block": [start, end]}, "part": 0,
            "captures": [(L, s, v["positions"]) for L, v in LAYERS.items() if start <= L <= end for s in v["sites"]],
            "device": "cpu", "group": f"L{start}",
            "boundary_in": str(boundary_path(chain, start, 0)) if start else None,
            "boundary_out": str(boundary_path(chain, end + 1, 0)) if end < 3 else None}


def finish(tmp: Path, name: str, dataset: Path) -> Path:
    ids, offsets = load_tokens(dataset)
    root = tmp / f"{name}.zarr"
    finalize(root, [(L, s, v["positions"]) for L, v in LAYERS.items() for s in v["sites"]], 1, ids, offsets,
             {"run": "test"})
    return root


def files(root: Path) -> dict[str, bytes]:
    """Every file of a store, but not the job ids (new for every job) of the markers and the root metadata."""
    out = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
           if p.is_file() and "parts" not in p.parts}
    meta = json.loads(out.pop("zarr.json"))
    del meta["attributes"]["layerscope"]["jobs"]
    return out | {"zarr.json": json.dumps(meta).encode()}


def kill_after(args: dict, shards: int, timeout: float = 120) -> int:
    """Start the job in a child process, SIGKILL it once its journal lists ``shards`` finished shards
    (0: as soon as it has a journal); returns how many it had listed when it died."""
    spec = Path(args["store_root"]).with_name("job.json")
    spec.write_text(json.dumps(args))
    code = ("import json, sys; from layerscope.capture.run import run_capture; "
            "run_capture(**json.load(open(sys.argv[1])))")
    journal = progress_dir(args["store_root"]) / f"{args['group']}_part0.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", code, str(spec)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])})
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if journal.is_file() and journal.read_text().count('"shard"') >= shards:
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"the job ended (exit {proc.returncode}) before it wrote {shards} shards")
            time.sleep(0.002)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return journal.read_text().count('"shard"')


@pytest.fixture(scope="module")
def setup(model_factory, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    model = model_factory("llama-tiny")
    dataset = prepare_texts(tmp, model, TEXTS)
    params = make_params(LAYERS, batch_size=2, parts=1, chunk_mib=0.004, shard_mib=0.008)
    manifest = {"model": model}
    for block in BLOCKS:
        run_capture(**job_args(tmp, manifest, params, dataset, "whole", block))
    ref = finish(tmp, "whole", dataset)
    return tmp, manifest, params, dataset, files(ref), boundary_path(tmp / "whole-chain", 2, 0).read_bytes()


@pytest.mark.parametrize("when", ["start", "one", "many"])
def test_killed_job_resumes_byte_for_byte(setup, when):
    tmp, manifest, params, dataset, ref_files, ref_boundary = setup
    total = sum(1 for k in ref_files if "/c/" in k and k.startswith(("layer_00", "layer_01")))
    name = f"killed-{when}"
    args = job_args(tmp, manifest, params, dataset, name, BLOCKS[0])
    listed = kill_after(args, {"start": 0, "one": 1, "many": total // 2}[when])
    out = Path(args["boundary_out"])
    assert not out.exists(), "a killed job left a boundary that looks finished"
    stats = run_capture(**args)
    if when == "start":
        assert stats["resumed"] is None or stats["resumed"]["kept_shards"] >= 0
    else:
        # every shard the journal listed is kept, and only the batches some unfinished row needs re-run
        assert stats["resumed"]["kept_shards"] >= listed >= 1
        assert stats["resumed"]["batches"] == len(range(0, len(TEXTS), 2))
        if when == "many":
            assert stats["resumed"]["skipped_batches"] > 0
    assert out.read_bytes() == ref_boundary
    assert not progress_dir(args["store_root"]).exists()  # the journal goes once the job is done
    run_capture(**job_args(tmp, manifest, params, dataset, name, BLOCKS[1]))
    assert files(finish(tmp, name, dataset)) == ref_files


def test_job_reading_a_boundary_resumes(setup):
    tmp, manifest, params, dataset, ref_files, _ = setup
    name = "killed-top"
    run_capture(**job_args(tmp, manifest, params, dataset, name, BLOCKS[0]))
    args = job_args(tmp, manifest, params, dataset, name, BLOCKS[1])
    listed = kill_after(args, 3)
    stats = run_capture(**args)
    assert stats["resumed"]["kept_shards"] >= listed >= 3
    assert files(finish(tmp, name, dataset)) == ref_files


def test_progress_of_another_configuration_is_not_kept(setup):
    tmp, manifest, params, dataset, ref_files, ref_boundary = setup
    name = "other"
    other = json.loads(json.dumps(params)) | {"batch_size": 3}  # other batches: other padding, other bytes
    kill_after(job_args(tmp, manifest, other, dataset, name, BLOCKS[0]), 4)
    args = job_args(tmp, manifest, params, dataset, name, BLOCKS[0])
    assert run_capture(**args)["resumed"] is None
    assert Path(args["boundary_out"]).read_bytes() == ref_boundary
    run_capture(**job_args(tmp, manifest, params, dataset, name, BLOCKS[1]))
    assert files(finish(tmp, name, dataset)) == ref_files


def test_missing_kept_shard_is_recomputed(setup):
    tmp, manifest, params, dataset, ref_files, _ = setup
    name = "lost"
    args = job_args(tmp, manifest, params, dataset, name, BLOCKS[0])
    kill_after(args, 6)
    journal = progress_dir(args["store_root"]) / "L0_part0.jsonl"
    array = next(e["array"] for e in map(json.loads, journal.read_text().splitlines()[1:]) if "shard" in e)
    layer, site, _ = array.split("/")
    lost = Path(args["store_root"]) / layer / site / "c" / "0" / "0"
    assert lost.is_file()
    lost.unlink()  # e.g. removed by hand: the journal alone does not make a shard finished
    stats = run_capture(**args)
    assert stats["resumed"] is None or stats["resumed"]["skipped_batches"] == 0
    run_capture(**job_args(tmp, manifest, params, dataset, name, BLOCKS[1]))
    assert files(finish(tmp, name, dataset)) == ref_files


def test_workflow_reruns_a_killed_capture_job_from_its_progress(tmp_path):
    """Through Snakemake: kill the capture job (not snakemake), run again; the job resumes and the
    store equals an uninterrupted run's."""
    import yaml

    from tests.conftest import copy_inputs, run_snakemake, write_jsonl

    def workdir(name: str) -> Path:
        wd = copy_inputs(tmp_path / name)
        write_jsonl(wd / "config" / "many.jsonl", [{"text": t} for t in TEXTS])
        cfg = yaml.safe_load((wd / "config" / "config.yaml").read_text())
        cfg["dataset"]["path"] = "config/many.jsonl"
        cfg["capture"] |= {"sites": ["resid_post"], "dtype": "float32", "layers_per_job": 4, "parts": 1,
                           "batch_size": 2}
        cfg["store"] = {"chunk_mib": 0.004, "shard_mib": 0.008}
        (wd / "config" / "run.yaml").write_text(yaml.safe_dump(cfg))
        return wd

    ref = workdir("whole")
    res = run_snakemake(ref, "--cores", "1", str(Path("results/demo/activations.zarr/zarr.json")),
                        configfile=ref / "config" / "run.yaml")
    assert res.returncode == 0, res.stderr[-3000:]

    wd = workdir("killed")
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(wd),
           "--configfile", str(wd / "config" / "run.yaml"), "--cores", "1", "results/demo/activations.zarr/zarr.json"]
    journal = wd / "results" / "demo" / "activations.progress" / "L00-03_part0.jsonl"
    snake = subprocess.Popen(cmd, cwd=wd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and snake.poll() is None:
        if journal.is_file() and journal.read_text().count('"shard"') >= 10:
            os.kill(json.loads(journal.read_text().splitlines()[0])["pid"], signal.SIGKILL)
            break
        time.sleep(0.002)
    assert snake.wait(timeout=120) != 0, "the capture job finished before it could be killed"
    assert journal.is_file()  # Snakemake removed the job's outputs, not its progress
    res = subprocess.run(cmd, cwd=wd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming:" in (wd / "logs" / "demo" / "capture" / "L00-03_part0.log").read_text()
    assert not journal.exists()
    assert files(wd / "results" / "demo" / "activations.zarr") == files(ref / "results" / "demo" / "activations.zarr")


def test_batching_by_length_is_the_hand_count(setup):
    from layerscope.capture.batches import padding, plan_windows

    tmp, manifest, params, dataset, *_ = setup
    _, offsets = load_tokens(dataset)
    lens = [int(n) for n in (offsets[1:] - offsets[:-1])]
    windows = plan_windows([(0, 50), (60, 90)], offsets, 2, 4)
    # windows of 8 examples (the spans' ends cut them short), each batched longest first
    assert [(w.e0, w.e1) for w in windows] == [(a, min(a + 8, b)) for a, b in ((0, 50), (60, 90)) for a in range(a, b, 8)]
    for w in windows:
        order = sorted(range(w.e0, w.e1), key=lambda e: -lens[e])  # stable: ties keep data set order
        assert [b.tolist() for b in w.batches] == [sorted(order[i:i + 2]) for i in range(0, len(order), 2)]
    real = sum(lens[0:50]) + sum(lens[60:90])
    ran = sum(max(lens[e] for e in b) * len(b) for w in windows for b in w.batches)
    in_order = sum(max(lens[e:min(e + 2, w.e1)]) * len(lens[e:min(e + 2, w.e1)]) for w in windows
                   for e in range(w.e0, w.e1, 2))
    assert padding(windows, offsets, 2) == pytest.approx((1 - real / ran, 1 - real / in_order))
    assert padding(windows, offsets, 2)[0] < padding(windows, offsets, 2)[1]
    # one batch per window is data set order
    assert [b.tolist() for w in plan_windows([(0, 9)], offsets, 2, 1) for b in w.batches] == \
        [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
