"""``export``: the older layouts, read back by the seeds' own loader snippets (copied from
seeds/001 and seeds/004, changed only to point at the export) and compared with the store's
arrays read by hand (zarr and the dataset files, not the reader)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import layerscope
from layerscope.errors import IncompleteRunError, LayerScopeError
from layerscope.interop import seed001, seed004
from layerscope.interop.common import check_split_names, narrow
from layerscope.interop.export import export
from tests.conftest import REPO
from tests.second_run import SEED004_FIELDS, second_run

SEED001_KEYS = ["model_name", "dataset_name", "split", "load_in_4bit", "total_examples", "shard_size", "batch_size",
                "hidden_dim", "num_layers"]


def stored(run_dir: Path, layer: int, site: str) -> np.ndarray:
    """The whole array as its logical values, by hand: bfloat16 bit patterns shifted into float32."""
    arr = zarr.open_array(str(run_dir / f"activations.zarr/layer_{layer:02d}/{site}"), mode="r")
    raw = arr[:]
    if arr.attrs["dtype"] == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw


def by_hand(run_dir: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(examples, offsets, token ids) from the dataset files the workflow wrote."""
    examples = [json.loads(x) for x in (run_dir / "dataset/examples.jsonl").read_text(encoding="utf-8").splitlines()]
    return examples, np.load(run_dir / "dataset/offsets.npy"), np.load(run_dir / "dataset/token_ids.npy")


def split_range(examples: list[dict], split: str) -> tuple[int, int]:
    idx = [e["index"] for e in examples if e["split"] == split]
    assert idx == list(range(idx[0], idx[-1] + 1))
    return idx[0], idx[-1] + 1


def last_token_rows(run_dir: Path, layer: int, site: str, e0: int, e1: int) -> np.ndarray:
    full = stored(run_dir, layer, site)
    _, offsets, _ = by_hand(run_dir)
    if full.shape[0] == offsets[-1]:  # an "all" array: the row of each example's last token
        return full[offsets[e0 + 1:e1 + 1] - 1]
    return full[e0:e1]


# --- seed 001 -----------------------------------------------------------------------------------

def seed001_loader_snippet(base_path: str, layer_idx: int):
    """seeds/001 "How to Load the Data", verbatim but for weights_only=True and returning its results."""
    import torch
    import json
    from pathlib import Path

    def load_activations(base_path, layer_idx):
        """
        Generator that yields batches of activations for a specific layer.
        """
        path = Path(base_path)
        layer_dir = path / f"layer_{layer_idx:02d}"

        # Sort shards to ensure correct order
        shard_files = sorted(layer_dir.glob("shard_*.pt"))

        for shard_file in shard_files:
            yield torch.load(shard_file, weights_only=True)

    # 1. Load Metadata
    with open(f"{base_path}/metadata.json", "r") as f:
        meta = json.load(f)

    print(f"Loading {meta['total_examples']} examples with dimension {meta['hidden_dim']}")

    # 2. Iterate over a specific layer (e.g., Layer 15)
    all_activations = []

    for shard in load_activations(base_path, layer_idx):
        all_activations.append(shard)

    # 3. Combine (Optional - beware of RAM usage!)
    full_tensor = torch.cat(all_activations, dim=0)
    print(f"Full Layer {layer_idx} Shape: {full_tensor.shape}")
    return meta, all_activations, full_tensor


@pytest.mark.parametrize("which", ["demo", "other"])
def test_seed001_loader_reads_the_last_token_rows(which, demo_run, other_run, tmp_path):
    run_dir = demo_run if which == "demo" else other_run
    out = export(run_dir, "seed001", tmp_path / "acts", shard_size=4)
    examples, _, _ = by_hand(run_dir)
    md = json.loads((run_dir / "metadata.json").read_text())
    layers = sorted({a["layer"] for a in md["arrays"].values() if a["site"] == "resid_post"})
    splits = sorted({e["split"] for e in examples})
    assert sorted(p.name for p in out.iterdir()) == splits
    for split in splits:
        e0, e1 = split_range(examples, split)
        assert sorted(p.name for p in (out / split).iterdir()) == [f"layer_{L:02d}" for L in layers] + ["metadata.json"]
        for L in layers:
            meta, shards, full = seed001_loader_snippet(str(out / split), L)
            assert [s.shape[0] for s in shards] == [min(4, e1 - e0 - k) for k in range(0, e1 - e0, 4)]
            expected = last_token_rows(run_dir, L, "resid_post", e0, e1)
            # float16 stays float16; bfloat16, which seed 001 does not list, is widened to float32 exactly
            assert full.dtype == (torch.float16 if md["dtype"] == "float16" else torch.float32)
            assert tuple(full.shape) == (meta["total_examples"], meta["hidden_dim"])
            np.testing.assert_array_equal(full.numpy(), expected.astype(full.numpy().dtype))
        assert list(meta)[:len(SEED001_KEYS)] == SEED001_KEYS
        assert meta["split"] == split and isinstance(meta["split"], str)
        assert meta["total_examples"] == e1 - e0 and meta["shard_size"] == 4
        assert (meta["model_name"], meta["dataset_name"], meta["batch_size"], meta["hidden_dim"],
                meta["num_layers"], meta["load_in_4bit"]) == (md["model_name"], md["dataset_name"], md["batch_size"],
                                                              64, 4, False)
        assert meta["layerscope"]["example_ids"] == [e["id"] for e in examples[e0:e1]]


def test_seed001_shards_hold_only_their_rows(demo_run, tmp_path):
    out = export(demo_run, "seed001", tmp_path / "acts", layers=[-1])
    shard = out / "EM/layer_03/shard_000.pt"
    # torch.save writes a tensor's whole storage: a view into a bigger buffer would bloat every shard
    assert shard.stat().st_size < 9 * 64 * 2 + 2048
    assert sorted(p.name for p in (out / "EM").iterdir()) == ["layer_03", "metadata.json"]


# --- seed 004 -----------------------------------------------------------------------------------

def seed004_snippets(output_dir: str, pass_name: str, layer: int, q: int):
    """seeds/004 "Data Format Details" and "Verify Collection Worked", verbatim but for the paths
    (output_dir/mcq -> output_dir/{pass_name}, layer 15 -> {layer}, question 42 -> {q})."""
    import numpy as np
    import json

    # Load layer 15 activations for MCQ pass
    acts = np.load(f"{output_dir}/{pass_name}/activations_layer_{layer:02d}.npy")
    # Shape: [num_questions, seq_length, 4096]
    # dtype: float16

    # Access question 42's activations at layer 15
    question_42_acts = acts[q]  # [seq_length, 4096]

    # Access final token activation for question 42
    final_token_act = acts[q, -1]  # [4096]

    with open(f"{output_dir}/{pass_name}/metadata.json") as f:
        metadata = json.load(f)

    # Access question 42's metadata
    q42 = metadata[q]
    print(q42["question_text"])
    print(q42["parsed_answer"])
    print(q42["is_correct"])
    print(q42["entropy"])

    shape = np.load(f'{output_dir}/{pass_name}/activations_layer_00.npy').shape if layer == 0 else None
    return acts, question_42_acts, final_token_act, metadata, shape


@pytest.mark.parametrize("padding", ["left", "right"])
def test_seed004_loader_reads_every_token(padding, demo_run, tmp_path):
    out = export(demo_run, "seed004", tmp_path / "output_dir", padding=padding)
    examples, offsets, ids = by_hand(demo_run)
    for split in ("EM", "Neutral"):
        e0, e1 = split_range(examples, split)
        lengths = np.diff(offsets[e0:e1 + 1])
        seq_len = int(lengths.max())
        for L in range(4):
            full = stored(demo_run, L, "resid_post")
            for q in range(e1 - e0):
                acts, q_acts, final, metadata, shape = seed004_snippets(str(out), split, L, q)
                assert acts.dtype == np.float16 and acts.shape == (e1 - e0, seq_len, 64)
                if L == 0:
                    assert shape == acts.shape
                e, n = e0 + q, int(lengths[q])
                rows = full[offsets[e]:offsets[e + 1]]
                s = seq_len - n if padding == "left" else 0
                np.testing.assert_array_equal(q_acts[s:s + n], rows)
                assert not q_acts[:s].any() and not q_acts[s + n:].any()  # padding is zeros
                if padding == "left":  # the guide's "final token activation"
                    np.testing.assert_array_equal(final, rows[-1])
                rec = metadata[q]
                assert (rec["token_start"], rec["n_tokens"]) == (s, n)
        assert len(metadata) == e1 - e0
        for q, rec in enumerate(metadata):
            ex = examples[e0 + q]
            text = ex["rendered"] if "messages" in ex else ex["text"]  # a chat record: the template's output
            assert list(rec)[:len(seed004.FIELDS)] == list(seed004.FIELDS)
            assert (rec["question_id"], rec["question_text"], rec["prompt_text"], rec["prompt_type"]) == \
                   (ex["id"], text, text, split)
            assert (rec["model_name"], rec["token_length"], rec["char_length"]) == \
                   ("builtin:llama-tiny", ex["n_tokens"], len(text))
            tok = ids[offsets[e0 + q]:offsets[e0 + q + 1]]
            assert rec["token_rarity_mean"] == pytest.approx(tok.mean()) and rec["token_rarity_max"] == tok.max()
            assert rec["parsed_answer"] is None and rec["is_correct"] is None and rec["entropy"] is None
            assert (rec["topic"], rec["label"]) == (ex["topic"], ex["label"])  # the data set's own fields
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["export"]["padding_side"] == padding and cfg["config"]["run"] == "demo"


def test_seed004_takes_seed_fields_from_the_records(other_run, tmp_path):
    out = export(other_run, "seed004", tmp_path / "output_dir", layers=[1])
    examples, offsets, _ = by_hand(other_run)
    e0, e1 = split_range(examples, "Neutral")
    acts, _, final, metadata, _ = seed004_snippets(str(out), "Neutral", 1, 4)
    full = stored(other_run, 1, "resid_post")
    # bfloat16 values narrowed to the guide's float16
    np.testing.assert_array_equal(final, full[offsets[e0 + 5] - 1].astype(np.float16))
    assert sorted(p.name for p in (out / "Neutral").iterdir()) == ["activations_layer_01.npy", "metadata.json"]
    for q, rec in enumerate(metadata):
        ex = examples[e0 + q]
        for k in SEED004_FIELDS:
            assert rec[k] == ex[k], k
        assert rec["prompt_text"] == (ex["rendered"] if "messages" in ex else ex["text"]) != rec["question_text"]


@pytest.fixture(scope="module")
def pass_base(tmp_path_factory) -> Path:
    from tests.pass_runs import pass_run

    return pass_run(tmp_path_factory, "base")


@pytest.mark.parametrize("padding", ["left", "right"])
def test_seed004_passes_read_by_the_guides_loader(padding, pass_base, tmp_path):
    """A run with prompted passes: one guide directory per pass, the built-in ones under the guide's names."""
    out = export(pass_base, "seed004", tmp_path / "output_dir", padding=padding)
    dirs = {"mcq": "mcq", "self_confidence": "self_conf", "other_confidence": "other_conf", "self_gen": "self_gen"}
    assert sorted(p.name for p in out.iterdir()) == sorted([*dirs.values(), "run_config.json"])
    for name, d in dirs.items():
        src = pass_base / name
        records = json.loads((src / "metadata.json").read_text(encoding="utf-8"))
        _, offsets, _ = by_hand(src)
        lengths = np.diff(offsets)
        seq_len = int(lengths.max())
        assert sorted(p.name for p in (out / d).iterdir()) == \
               ["activations_layer_00.npy", "activations_layer_02.npy", "metadata.json"]
        for L in (0, 2):
            full = stored(src, L, "resid_post")
            for q in range(8):
                acts, q_acts, final, metadata, shape = seed004_snippets(str(out), d, L, q)
                assert acts.dtype == np.float16 and acts.shape == (8, seq_len, 64)
                if L == 0:
                    assert shape == acts.shape
                n, rows = int(lengths[q]), full[offsets[q]:offsets[q + 1]]
                s = seq_len - n if padding == "left" else 0
                np.testing.assert_array_equal(q_acts[s:s + n], rows)
                assert not q_acts[:s].any() and not q_acts[s + n:].any()
                if padding == "left":
                    np.testing.assert_array_equal(final, rows[-1])
                rec, own = metadata[q], records[q]
                assert (rec["token_start"], rec["n_tokens"]) == (s, n)
                # the answer position, as a position in the exported rows
                assert rec["answer_token_index"] == s + own["answer_token_index"]
                np.testing.assert_array_equal(acts[q, rec["answer_token_index"]], rows[own["answer_token_index"]])
        assert list(metadata[0])[:len(seed004.FIELDS)] == list(seed004.FIELDS)
        for rec, own in zip(metadata, records):
            for k, v in own.items():
                if k not in seed004.POSITION_FIELDS:
                    assert rec[k] == v, (name, k)
            assert rec["prompt_type"] == name and rec["question_id"] == own["question_id"]
            if name != "mcq":
                assert rec["confidence_token_index"] == rec["answer_token_index"] and rec["is_correct"] is None
            if name in ("self_confidence", "other_confidence"):
                assert rec[name] == own["expected_confidence"]
            else:
                assert rec["self_confidence"] is None and rec["other_confidence"] is None
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["config"]["run"] == "passes" and cfg["export"]["padding_side"] == padding
    assert {d: v["pass"] for d, v in cfg["export"]["passes"].items()} == {v: k for k, v in dirs.items()}
    assert cfg["export"]["passes"]["other_conf"]["settings"]["generate"]["max_new_tokens"] == 4


def test_seed004_one_pass_and_refusals(pass_base, tmp_path):
    out = export(pass_base / "self_confidence", "seed004", tmp_path / "one", layers=[-2])
    assert sorted(p.name for p in out.iterdir()) == ["run_config.json", "self_conf"]
    assert sorted(p.name for p in (out / "self_conf").iterdir()) == ["activations_layer_02.npy", "metadata.json"]
    run = layerscope.open(pass_base / "mcq")
    with pytest.raises(LayerScopeError, match=r"passes 'self_confidence' and 'self_conf' would both be exported to "
                                              r"self_conf/"):
        seed004.check_passes([("self_confidence", run), ("self_conf", run)], None, None, "left")
    with pytest.raises(LayerScopeError, match="nothing to export at layer 1"):
        export(pass_base, "seed004", tmp_path / "bad", layers=[1])
    assert not (tmp_path / "bad").exists()


# --- npy ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["demo", "other"])
def test_npy_files_equal_the_store(which, demo_run, other_run, tmp_path):
    run_dir = demo_run if which == "demo" else other_run
    out = export(run_dir, "npy", tmp_path / "npy")
    examples, offsets, ids = by_hand(run_dir)
    index = json.loads((out / "index.json").read_text())
    md = json.loads((run_dir / "metadata.json").read_text())
    assert sorted((a["layer"], a["site"]) for a in index["arrays"]) == \
           sorted((a["layer"], a["site"]) for a in md["arrays"].values())
    for a in index["arrays"]:
        x = np.load(out / a["file"])
        expected = stored(run_dir, a["layer"], a["site"])
        assert x.dtype == np.dtype(a["dtype"]) == expected.dtype and list(x.shape) == a["shape"]
        np.testing.assert_array_equal(x, expected)
        assert a["positions"] == md["arrays"][f"layer_{a['layer']:02d}/{a['site']}"]["positions"]
    np.testing.assert_array_equal(np.load(out / "offsets.npy"), offsets)
    np.testing.assert_array_equal(np.load(out / "token_ids.npy"), ids)
    assert [json.loads(x) for x in (out / "examples.jsonl").read_text(encoding="utf-8").splitlines()] == examples
    for split, r in index["splits"].items():
        assert r["examples"] == list(split_range(examples, split))
        assert r["tokens"] == [int(offsets[r["examples"][0]]), int(offsets[r["examples"][1]])]


# --- refusals and atomicity -----------------------------------------------------------------------

def test_refusals(demo_run, other_run, tmp_path):
    cases = [
        (dict(run=other_run, fmt="seed004"), "layer_00/resid_post, layer_03/resid_post hold the last position only"),
        (dict(run=demo_run, fmt="seed001", sites=["mlp_out"]), "seed001 has a place only for resid_post"),
        (dict(run=demo_run, fmt="seed004", sites=["attn_out"]), "seed004 has a place only for resid_post"),
        (dict(run=other_run, fmt="npy", sites=["attn_out"]), "no attn_out arrays"),
        (dict(run=other_run, fmt="npy", layers=[2]), "nothing to export at layer 2"),
        (dict(run=demo_run, fmt="seed001", shard_size=0), "--shard-size must be 1 or more"),
        (dict(run=demo_run, fmt="parquet"), "unknown export format 'parquet'"),
        (dict(run=f"{demo_run}:adapter", fmt="npy"), "no variant 'adapter'; it has no variants"),
        (dict(run=demo_run, fmt="npy", out=demo_run), "holds the run itself"),
        (dict(run=demo_run, fmt="npy", out=demo_run.parent), "holds the run itself"),
    ]
    for kw, msg in cases:
        out = kw.pop("out", tmp_path / "x")
        with pytest.raises(LayerScopeError, match=msg):
            export(kw.pop("run"), kw.pop("fmt"), out, **kw)
        assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_refuses_an_unfinished_run(demo_run, tmp_path):
    run_dir = tmp_path / "demo"
    shutil.copytree(demo_run, run_dir, symlinks=True)
    (run_dir / "activations.zarr/zarr.json").unlink()
    with pytest.raises(IncompleteRunError, match="store is missing or unfinished"):
        export(run_dir, "npy", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_too_many_shards_and_bad_split_names(demo_run, tmp_path, monkeypatch):
    monkeypatch.setattr(seed001, "MAX_SHARDS", 2)
    with pytest.raises(LayerScopeError, match="split 'EM': 9 examples make more than 2 shards of 4"):
        export(demo_run, "seed001", tmp_path / "x", shard_size=4)
    run = layerscope.open(demo_run)
    run.__dict__["splits"] = {"a/b": (0, 19)}
    with pytest.raises(LayerScopeError, match="split 'a/b' cannot be a directory name"):
        check_split_names(run, "seed001")


def test_narrowing_to_float16_refuses_overflow():
    x = np.array([1.0, 70000.0, np.inf], dtype=np.float32)
    with pytest.raises(LayerScopeError, match="1 values beyond float16's range"):
        narrow(x, np.float16, "layer_00/resid_post", "seed004")
    assert narrow(x[[0, 2]], np.float16, "w", "seed004").tolist() == [1.0, np.inf]  # inf stays inf, not refused


def test_existing_out_needs_force_and_a_failed_export_keeps_it(demo_run, tmp_path, monkeypatch):
    out = tmp_path / "acts"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(LayerScopeError, match="exists and is not empty; pass --force"):
        export(demo_run, "seed001", out)
    calls, real_save = [], torch.save

    def failing_save(obj, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_save(obj, path)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export(demo_run, "seed001", out, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["acts"] and (out / "old.txt").read_text() == "keep me"
    monkeypatch.undo()
    export(demo_run, "seed001", out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["EM", "Neutral"]
    assert [p.name for p in tmp_path.iterdir()] == ["acts"]
    (empty := tmp_path / "empty").mkdir()
    export(demo_run, "npy", empty, layers=[0], sites=["resid_post"])  # an empty --out needs no --force
    assert (empty / "index.json").is_file()


def test_a_killed_export_never_looks_finished(demo_run, tmp_path):
    code = textwrap.dedent(f"""
        import os, signal, torch
        from layerscope.interop.export import export
        real, n = torch.save, [0]
        def save(obj, path):
            real(obj, path)
            n[0] += 1
            if n[0] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save
        export({str(demo_run)!r}, "seed001", {str(tmp_path / "acts")!r})
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == -9, res.stderr
    assert not (tmp_path / "acts").exists()
    (left,) = tmp_path.iterdir()  # only the hidden staging directory, named for what it is
    assert left.name.startswith(".acts.export-") and len(list(left.rglob("*.pt"))) == 3


def test_export_cli(demo_run, tmp_path):
    res = subprocess.run([sys.executable, "-m", "layerscope", "export", str(demo_run), "--format", "seed004",
                          "--out", str(tmp_path / "o"), "--layers", "0,-1", "--padding", "right"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert f"as seed004 to {tmp_path / 'o'}" in res.stdout
    assert sorted(p.name for p in (tmp_path / "o/EM").iterdir()) == \
           ["activations_layer_00.npy", "activations_layer_03.npy", "metadata.json"]
    bad = subprocess.run([sys.executable, "-m", "layerscope", "export", str(demo_run), "--format", "seed001",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "pass --force" in bad.stderr


@pytest.mark.parametrize("fmt", ["seed004", "npy"])
def test_small_blocks_write_the_same_files(fmt, demo_run, tmp_path, monkeypatch):
    """Streaming in blocks of a few rows and tokens gives the files one block gives."""
    from layerscope.interop import common

    whole = export(demo_run, fmt, tmp_path / "whole")
    monkeypatch.setattr(common, "BLOCK_BYTES", 1024)
    monkeypatch.setattr(common, "TOKEN_BLOCK", 7)
    small = export(demo_run, fmt, tmp_path / "small")
    files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(small) for p in small.rglob("*") if p.is_file())
    for f in files:
        assert (whole / f).read_bytes() == (small / f).read_bytes(), f
