"""The plan's cost estimate against what a real run measured: bytes, boundaries, weights per job."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import zarr

from layerscope.capture.chain import Boundary
from tests.conftest import REPO


def test_estimate_matches_the_demo_run(demo):
    run = demo / "results/demo"
    res = subprocess.run([sys.executable, "-m", "layerscope", "plan", "--directory", str(demo), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    est = json.loads(res.stdout.strip().splitlines()[-1])
    offsets = np.load(run / "dataset/offsets.npy")
    assert est["examples"] == len(offsets) - 1 and est["tokens"] == int(offsets[-1]) and est["jobs"] == 4
    # arrays: exact raw bytes, and exact bytes on disk (shard indexes, 4 KiB block padding)
    g = zarr.open_group(str(run / "activations.zarr"), mode="r")
    raw = sum(int(np.prod(g[p].shape)) * g[p].dtype.itemsize for p in g.attrs["layerscope"]["arrays"])
    disk = sum(f.stat().st_size for f in (run / "activations.zarr").rglob("c/*/*"))
    assert est["array_bytes"] == raw and est["disk_bytes"] == disk
    # boundaries: exactly the data the capture jobs wrote
    written = sorted((run / "boundaries").glob("*.safetensors"))
    assert [Boundary(f)._data.nbytes for f in written] == est["boundary_bytes_per_part"]
    assert est["boundary_bytes"] == sum(est["boundary_bytes_per_part"])
    # weights: what each job recorded holding, within 2% (buffers such as rotary tables are tiny)
    for b in est["blocks"]:
        first = b["layers"][0]
        marker = json.loads(next((run / f"activations.zarr/layer_{first:02d}/resid_post/parts").glob("0-*.json"))
                            .read_text())
        assert abs(marker["weight_mib"] * 2**20 - b["weight_bytes"]) <= 0.02 * b["weight_bytes"] + 0.1 * 2**20


def test_plan_table_and_bad_config(demo, tmp_path):
    out = subprocess.run([sys.executable, "-m", "layerscope", "plan", "--directory", str(demo)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "4 capture jobs" in out.stdout and "L00-01" in out.stdout
    assert "boundaries" in out.stdout and "hands on a boundary" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "config/config.yaml").read_text().replace("layers_per_job: 2", "layers_per_job: 0"))
    res = subprocess.run([sys.executable, "-m", "layerscope", "plan", "--directory", str(demo),
                          "--configfile", str(bad)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "config error: capture.layers_per_job: 0 is less than the minimum of 1" in res.stderr
    assert "Traceback" not in res.stderr
