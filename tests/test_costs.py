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


def test_window_rows_bound_what_a_job_holds(model_factory, tmp_path, monkeypatch):
    """Batching by length holds each array's rows of a window until its chunks are complete: never
    more than the plan's window rows plus a few chunks per array."""
    from layerscope.analysis.costs import window_tokens
    from layerscope.capture.router import BufferPool
    from layerscope.data.dataset import load_tokens
    from tests.helpers import capture_store, make_params, prepare_texts

    offsets = np.r_[0, np.cumsum([3, 9, 1, 4, 4, 12, 2])]
    assert window_tokens(offsets, 3) == max(offsets[i + 3] - offsets[i] for i in range(len(offsets) - 3)) == 20
    assert window_tokens(offsets, 100) == offsets[-1]

    texts = [" ".join(["tok"] * (1 + (i * 37) % 29)) for i in range(40)]
    model = model_factory("llama-tiny")
    ds = prepare_texts(tmp_path, model, texts)
    held, peak = [0], [0]
    acquire, release = BufferPool.acquire, BufferPool.release

    def counting_acquire(self, rows, width):
        buf = acquire(self, rows, width)
        held[0] += buf.nbytes
        peak[0] = max(peak[0], held[0])
        return buf

    def counting_release(self, buf):
        held[0] -= buf.nbytes
        release(self, buf)

    monkeypatch.setattr(BufferPool, "acquire", counting_acquire)
    monkeypatch.setattr(BufferPool, "release", counting_release)
    params = make_params({1: {"sites": ["resid_post", "mlp_act"], "positions": "all"}}, batch_size=2, parts=1,
                         chunk_mib=0.002, length_window=4)
    capture_store(tmp_path, {"model": model}, params, ds)
    _, offs = load_tokens(ds)
    window = window_tokens(offs, 4 * 2)
    from layerscope.store.layout import make_layout

    chunk_rows = {w: make_layout(int(offs[-1]), w, 4, 1, 0.002, 64).chunk_rows for w in (64, 172)}
    bound = sum(window * w * 4 + 4 * chunk_rows[w] * w * 4 for w in (64, 172))
    assert 0 < peak[0] <= bound
