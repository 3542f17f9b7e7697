"""Store layout, shard-aligned parts, whole-shard writes, and crash safety."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import zarr

import layerscope
import torch

from layerscope.capture.router import ArrayJob, BufferPool, Router
from layerscope.store.shards import ShardFile, ShardMap, chunk_encoder
from layerscope.errors import IncompleteRunError
from layerscope.store.layout import array_metadata, check_complete, make_layout
from layerscope.store.writer import ShardWriter
from tests.helpers import capture_store, make_params, prepare_texts, store_records


@pytest.mark.parametrize("rows,width,parts,chunk_mib,shard_mib", [
    (1, 64, 1, 2, 64), (10, 64, 4, 2, 64), (1000, 64, 3, 0.01, 0.05), (12345, 4096, 7, 2, 64),
    (100_000, 512, 2, 1, 8), (7, 11008, 5, 1, 4), (999, 3, 10, 0.0001, 0.0005),
])
def test_layout_parts_are_whole_shards(rows, width, parts, chunk_mib, shard_mib):
    lay = make_layout(rows, width, 2, parts, chunk_mib, shard_mib)
    assert lay.shard_rows % lay.chunk_rows == 0 and lay.part_rows % lay.shard_rows == 0
    covered = []
    shards = []
    for p in range(parts):
        r0, r1 = lay.part_range(p)
        covered.extend(range(r0, r1))
        if r0 < r1:
            assert r0 % lay.shard_rows == 0  # every part starts on a shard boundary
        shards.extend(lay.shard_range(p))
    assert covered == list(range(rows))  # parts tile the rows exactly
    assert sorted(shards) == list(range(lay.num_shards)) == sorted(set(shards))  # each shard in one part
    # chunks stay near the requested size unless the data is smaller than that
    if rows >= parts * 4:
        assert lay.chunk_rows * width * 2 <= max(chunk_mib * 2**20, width * 2)


@pytest.mark.parametrize("batch", [1, 17, 100])
@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("direct", [False, True])
def test_router_writes_each_shard_whole_and_once(tmp_path, monkeypatch, batch, compression, direct):
    store_cfg = {"compression": compression, "compression_level": 3}
    lay = make_layout(250, 4, 4, 2, 10 * 16 / 2**20, 30 * 16 / 2**20)  # chunks of 10 rows, shards of 30
    assert (lay.chunk_rows, lay.shard_rows) == (10, 30)
    array_dir = tmp_path / "a"
    array_dir.mkdir()
    (array_dir / "zarr.json").write_bytes(array_metadata(lay, "float32", store_cfg, {}, ("token", "hidden")))
    src = np.random.default_rng(0).normal(size=(250, 4)).astype(np.float32)
    closed = []
    orig_close = ShardFile.close
    monkeypatch.setattr(ShardFile, "close", lambda self: (closed.append(self.path), orig_close(self)))
    for part in range(2):
        r0, r1 = lay.part_range(part)
        w = ShardWriter()
        job = ArrayJob(0, "resid_post", "all", lay, r0, r1, array_dir=array_dir)
        pool = BufferPool(torch.float32, pin=False)
        router = Router(job, pool, w, chunk_encoder(store_cfg, 4), direct=direct)
        for g0 in range(0, 250, batch):  # rows outside the part are offered too and must be ignored
            router.add(g0, torch.from_numpy(src[g0:g0 + batch]))
        router.done()
        w.close()
        assert job.written == list(lay.shard_range(part))
        # chunk buffers are recycled: never more than the writer's queue (4), the one being
        # written and the one being filled, however many chunks the part has
        assert sum(len(v) for v in pool._free.values()) <= 4 + 2
    z = zarr.open_array(str(array_dir), mode="r")
    np.testing.assert_array_equal(z[:], src)
    if compression == "none":  # the reader's direct path agrees with zarr
        m = ShardMap(array_dir, 250, 4, lay.chunk_rows, lay.shard_rows, np.float32, np.nan)
        np.testing.assert_array_equal(m.read(0, 250), src)
        idx = np.random.default_rng(1).permutation(250)[:77]
        np.testing.assert_array_equal(m.take(idx), src[idx])
    assert sorted(closed) == sorted(set(closed)) and len(closed) == lay.num_shards  # each shard once
    assert not [p for p in array_dir.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_writer_runs_in_order_per_lane(threads):
    out: dict[int, list[int]] = {0: [], 1: [], 2: [], 3: []}
    w = ShardWriter(depth=2, threads=threads)
    for i in range(200):
        w.submit(lambda i=i: out[i % 4].append(i), lane=i % 4)
    w.close()
    assert all(out[k] == list(range(k, 200, 4)) for k in out)


@pytest.mark.parametrize("threaded", [True, False])
def test_writer_error_fails_promptly(threaded):
    w = ShardWriter(depth=1, threads=2 if threaded else 0)

    def boom():
        raise OSError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        w.submit(boom)
        for _ in range(100):  # must not hang: a writer thread's error surfaces on a later submit
            w.submit(lambda: None)
    if threaded:
        w2 = ShardWriter()
        w2.submit(boom)
        with pytest.raises(RuntimeError, match="disk full"):
            w2.close()


@pytest.mark.parametrize("mode", ["inline", "direct", "threads"])
def test_writer_error_fails_capture_without_marker(tmp_path, model_factory, monkeypatch, mode):
    from layerscope.capture import run as cap
    monkeypatch.setattr(cap.os, "cpu_count", lambda: 64 if mode == "threads" else 1)
    monkeypatch.setattr(cap, "direct_io_supported", lambda root: mode == "direct")

    m = model_factory("llama-tiny")
    ds = prepare_texts(tmp_path, m)
    params = make_params({0: {"sites": ["resid_post"], "positions": "all"}}, parts=1,
                         chunk_mib=64 * 2 * 8 / 2**20, shard_mib=64 * 2 * 8 / 2**20)  # 8-row shards: many writes
    from layerscope.store.shards import ShardFile

    orig = ShardFile.append
    count = itertools.count()

    def flaky(self, chunk):
        if next(count) == 3:
            raise OSError("No space left on device")  # the 4th chunk write fails inside the writer thread
        orig(self, chunk)

    monkeypatch.setattr(ShardFile, "append", flaky)
    with pytest.raises(RuntimeError, match="writing a shard failed: OSError: No space left"):
        capture_store(tmp_path, {"model": m, "adapter": None}, params, ds)
    assert not [p for p in (tmp_path / "store.zarr").rglob("*") if ".tmp-" in p.name]
    assert not list((tmp_path / "store.zarr" / "layer_00" / "resid_post").glob("parts/*.json"))
    assert not (tmp_path / "store.zarr" / "zarr.json").exists()  # nothing looks finished


def test_rerun_removes_stale_shards_and_reader_detects_rewrite(tmp_path, model_factory):
    m = model_factory("llama-tiny")
    ds = prepare_texts(tmp_path, m)
    small = dict(chunk_mib=64 * 4 * 4 / 2**20, shard_mib=64 * 4 * 4 / 2**20)  # 4-row shards (float32)
    params = make_params({0: {"sites": ["resid_post"], "positions": "all"}}, parts=2, **small)
    root = capture_store(tmp_path, {"model": m, "adapter": None}, params, ds)
    cdir = root / "layer_00" / "resid_post" / "c"
    n_all = len(list(cdir.iterdir()))
    # The same array captured at the last position only: far fewer rows, so fewer shards.
    params2 = make_params({0: {"sites": ["resid_post"], "positions": "last"}}, parts=2, **small)
    attrs_before = dict(zarr.open_group(str(root), mode="r").attrs)
    root2 = capture_store(tmp_path, {"model": m, "adapter": None}, params2, ds)
    assert root2 == root
    a = zarr.open_array(str(root / "layer_00" / "resid_post"), mode="r")
    n_last = len(list(cdir.iterdir()))
    lay = a.attrs["layout"]
    assert n_last == -(-lay["rows"] // lay["shard_rows"])  # exactly the new shards, none left over
    assert n_last < n_all and not np.isnan(a[:]).any()
    # The old finalized attributes name jobs whose markers were replaced: a reader must refuse them.
    with pytest.raises(IncompleteRunError, match="rewritten"):
        check_complete(root, attrs_before)
    check_complete(root, dict(zarr.open_group(str(root), mode="r").attrs))


def test_open_refuses_unfinished_run(tmp_path):
    with pytest.raises(IncompleteRunError, match="metadata.json"):
        layerscope.open(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps({}))
    with pytest.raises(IncompleteRunError, match="store"):
        layerscope.open(tmp_path)


@pytest.mark.parametrize("compression", ["none", "zstd", "blosc"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reader_paths_agree(tmp_path, model_factory, compression, dtype):
    """Uncompressed arrays are read from the shard files directly, compressed ones through zarr:
    both give exactly what zarr-python reads."""
    from layerscope.store.reader import Activations, bf16_to_float32
    from layerscope.store.rows import array_rows

    m = model_factory("llama-tiny")
    ds = prepare_texts(tmp_path, m)
    small = dict(chunk_mib=172 * 2 * 8 / 2**20, shard_mib=172 * 2 * 24 / 2**20, compression=compression)
    params = make_params({0: {"sites": ["mlp_act"], "positions": "all"}, 1: {"sites": ["resid_post"], "positions": "last"}},
                         dtype=dtype, parts=2, **small)
    root = capture_store(tmp_path, {"model": m, "adapter": None}, params, ds)
    offsets = np.load(tmp_path / "dataset" / "offsets.npy")
    for key in ("layer_00/mlp_act", "layer_01/resid_post"):
        z = zarr.open_array(str(root / key), mode="r")
        want = z[:]
        if dtype == "bfloat16":
            want = bf16_to_float32(want)
        acts = Activations(z, array_rows(z.attrs["positions"], offsets), 0, len(offsets) - 1, array_dir=root / key)
        assert (acts._direct is not None) == (compression == "none")
        np.testing.assert_array_equal(acts.numpy(), want)
        idx = np.array([len(acts) - 1, 0, 2, 2])
        rows = [acts.row_range[0] + i for i in idx] if acts.positions == "last" else [int(offsets[i]) for i in idx]
        np.testing.assert_array_equal(acts.take(rows), want[rows])
        np.testing.assert_array_equal(acts[3], want[offsets[3]:offsets[4]] if acts.positions == "all" else want[3])


def test_overlapped_writes_equal_synchronous_writes(tmp_path, model_factory, monkeypatch):
    """Writer thread or not, O_DIRECT or not: the same store, byte for byte."""
    from layerscope.capture import run as cap
    m = model_factory("llama-tiny")
    ds = prepare_texts(tmp_path, m)
    params = make_params({L: {"sites": ["resid_post", "mlp_act"], "positions": "all"} for L in range(3)},
                         dtype="float16", parts=2, chunk_mib=172 * 2 * 8 / 2**20, shard_mib=172 * 2 * 24 / 2**20)
    stores = {}
    # buffered inline and O_DIRECT on threads (a CPU-bound capture), buffered on threads (spare cores)
    for mode in ("inline", "direct", "threads"):
        monkeypatch.setattr(cap.os, "cpu_count", lambda: 64 if mode == "threads" else 1)
        monkeypatch.setattr(cap, "direct_io_supported", lambda root: mode == "direct")
        root = capture_store(tmp_path, {"model": m, "adapter": None}, params, ds, name=mode)
        stores[mode] = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("c/*/*"))}
    base = stores["inline"]
    assert len(base) >= 6
    for key, files in stores.items():
        assert files == base, key


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_out_of_range_values_are_counted(tmp_path, model_factory, dtype, caplog):
    """float16 turns values beyond 65504 into inf: counted per array in the markers and the store,
    with a warning that suggests bfloat16, which keeps float32's range."""
    import shutil as sh

    from safetensors.torch import load_file, save_file

    from layerscope.store.layout import marker_path

    src = model_factory("llama-tiny")
    d = tmp_path / "loud"
    sh.copytree(src["path"], d)
    weights = load_file(d / "model.safetensors")
    weights["model.embed_tokens.weight"] *= 1e6  # a residual stream far beyond float16's range
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    m = {**src, "path": str(d)}
    ds = prepare_texts(tmp_path, m)
    params = make_params({0: {"sites": ["resid_post"], "positions": "all"}}, dtype=dtype, parts=1)
    with caplog.at_level("WARNING", logger="layerscope"):
        root = capture_store(tmp_path, {"model": m, "adapter": None}, params, ds)
    marker = json.loads(marker_path(root, 0, "resid_post", 0, "all").read_text())
    counts = dict(zarr.open_group(str(root), mode="r").attrs)["layerscope"]["nonfinite"]["layer_00/resid_post"]
    stored = zarr.open_array(str(root / "layer_00/resid_post"), mode="r")[:]
    assert {k: store_records(root)["layer_00/resid_post"][k] for k in counts} == counts  # metadata.json's
    if dtype == "float16":
        n_inf = int(np.isinf(stored).sum())
        assert n_inf > 0 and marker["nonfinite"] == marker["clipped"] == n_inf == counts["nonfinite"]
        assert "bfloat16" in caplog.text and "out of float16 range" in caplog.text
    else:
        assert marker["nonfinite"] == marker["clipped"] == 0 == counts["clipped"]
        assert "NaN or inf" not in caplog.text


def test_array_records_are_what_the_finished_store_says(tmp_path, model_factory):
    """metadata.json's records come from the markers and the arrays' zarr.json, before the store is
    finalized: equal to what the finalized store's consolidated metadata says of each array."""
    manifest = {"model": model_factory("llama-tiny"), "adapter": None}
    ds = prepare_texts(tmp_path, manifest["model"])
    params = make_params({0: {"sites": ["resid_post", "mlp_out"], "positions": "all"},
                          2: {"sites": ["mlp_act"], "positions": "last"}}, dtype="bfloat16", parts=2, chunk_mib=0.01)
    root = capture_store(tmp_path, manifest, params, ds, layers_per_job=1)
    got = store_records(root)
    g = zarr.open_group(str(root), mode="r", zarr_format=3, use_consolidated=True)
    info = dict(g.attrs)["layerscope"]
    assert list(got) == info["arrays"] == ["layer_00/mlp_out", "layer_00/resid_post", "layer_02/mlp_act"]
    for path in info["arrays"]:
        arr = g[path]
        at = dict(arr.attrs)
        assert got[path] == {"layer": at["layer"], "site": at["site"], "positions": at["positions"],
                             "shape": list(arr.shape), "dimension_names": list(arr.metadata.dimension_names),
                             "dtype": "bfloat16", "storage_dtype": "uint16", "layout": at["layout"],
                             **info["nonfinite"][path]}
    assert got["layer_02/mlp_act"]["positions"] == "last" and got["layer_00/mlp_out"]["layout"]["parts"] == 2


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_router_takes_rows_out_of_order_within_a_window(tmp_path, compression):
    """Batches sorted by length hand rows over out of order; the shards are the ones in-order rows give."""
    store_cfg = {"compression": compression, "compression_level": 3}
    lay = make_layout(250, 4, 4, 1, 10 * 16 / 2**20, 30 * 16 / 2**20)
    src = np.random.default_rng(0).normal(size=(250, 4)).astype(np.float32)
    rng = np.random.default_rng(1)
    out = {}
    for name, shuffled in (("ordered", False), ("shuffled", True)):
        array_dir = tmp_path / name
        array_dir.mkdir()
        (array_dir / "zarr.json").write_bytes(array_metadata(lay, "float32", store_cfg, {}, ("token", "hidden")))
        w = ShardWriter()
        pool = BufferPool(torch.float32, pin=False)
        router = Router(ArrayJob(0, "resid_post", "all", lay, 0, 250, array_dir=array_dir), pool, w,
                        chunk_encoder(store_cfg, 4))
        for w0 in range(0, 250, 40):  # windows of 40 rows, handed over in segments of 1-7 rows
            cuts = np.unique(np.r_[w0, np.sort(rng.integers(w0, min(w0 + 40, 250), 8)), min(w0 + 40, 250)])
            segments = list(zip(cuts[:-1], cuts[1:]))
            if shuffled:
                rng.shuffle(segments)
            for a, b in segments:
                router.add(int(a), torch.from_numpy(src[a:b]))
        router.done()
        w.close()
        # buffers for one window's chunks (40 rows: at most 5 of 10 rows) plus the writer's queue
        assert sum(len(v) for v in pool._free.values()) <= 5 + 4 + 1
        out[name] = {p.relative_to(array_dir): p.read_bytes() for p in sorted(array_dir.rglob("*")) if p.is_file()}
    assert out["shuffled"] == out["ordered"]
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "shuffled"), mode="r")[:], src)
