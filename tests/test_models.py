"""Model resolution: built-in, local directory, and the hub path through an offline hub cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from layerscope.config import build_plan
from layerscope.errors import ConfigError, ModelError
from layerscope.models.loading import fetch, parse_ref, peek_config
from layerscope.store.reader import model_changes

SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = Path(__file__).resolve().parents[1]


def make_hub_cache(root: Path, repo_id: str, src: Path, sha: str = SHA, drop=()) -> Path:
    """Lay out ``src`` the way huggingface_hub caches a snapshot of ``repo_id`` at ``sha`` (ref main)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for f in src.iterdir():
        if f.name not in drop:
            shutil.copy(f, snap / f.name)
    return root


def test_builtin_is_deterministic(model_factory, tmp_path):
    a = model_factory("llama-tiny", 0)
    b = fetch(parse_ref({"id": "builtin:llama-tiny", "seed": 0}), tmp_path / "again")
    c = fetch(parse_ref({"id": "builtin:llama-tiny", "seed": 1}), tmp_path / "other")
    sha = lambda m: {f["path"]: f["sha256"] for f in m["files"]}  # noqa: E731
    assert sha(a) == sha(b)
    assert sha(a)["model.safetensors"] != sha(c)["model.safetensors"]
    assert sha(a)["tokenizer.json"] == sha(c)["tokenizer.json"]
    assert a["architecture"] == "LlamaForCausalLM" and a["num_layers"] == 4 and a["hidden_size"] == 64


def test_hub_snapshot_from_offline_cache(model_factory, tmp_path):
    src = Path(model_factory("llama-tiny")["path"])
    cache = make_hub_cache(tmp_path / "hub", "acme/tiny-llama", src)
    ref = parse_ref({"id": "acme/tiny-llama", "revision": None})
    assert ref.kind == "hub"
    m = fetch(ref, tmp_path / "unused", hub_cache=str(cache))
    assert m["source"] == "hub" and m["revision"] == SHA
    assert Path(m["path"]) == cache / "models--acme--tiny-llama" / "snapshots" / SHA
    assert {f["path"] for f in m["files"]} >= {"config.json", "model.safetensors", "tokenizer.json"}
    pinned = fetch(parse_ref({"id": "acme/tiny-llama", "revision": SHA}), tmp_path / "u", hub_cache=str(cache))
    assert pinned["revision"] == SHA
    # planning reads the depth of a cached hub model without touching the network
    assert peek_config(ref, str(cache), allow_download=False)["num_hidden_layers"] == 4
    with pytest.raises(ModelError, match="acme/tiny-llama.*revision v9"):
        fetch(parse_ref({"id": "acme/tiny-llama", "revision": "v9"}), tmp_path / "u", hub_cache=str(cache))
    with pytest.raises(ModelError, match="cannot fetch 'acme/absent'"):
        fetch(parse_ref({"id": "acme/absent"}), tmp_path / "u", hub_cache=str(cache))


def test_pickle_weights_are_refused(model_factory, tmp_path):
    src = Path(model_factory("llama-tiny")["path"])
    d = tmp_path / "pickled"
    shutil.copytree(src, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"no \.safetensors weights .*pytorch_model\.bin.*refused"):
        fetch(parse_ref({"id": str(d)}), tmp_path / "x")


def test_local_directory_and_adapter(model_factory, lora_adapter, tmp_path):
    m = fetch(parse_ref({"id": model_factory("llama-tiny")["path"]}), tmp_path / "x")
    assert m["source"] == "local" and m["num_layers"] == 4
    a = fetch(parse_ref({"id": lora_adapter["path"]}), tmp_path / "y", what="adapter")
    assert a["peft_type"] == "LORA" and a["r"] == 4
    with pytest.raises(ModelError, match="not a PEFT adapter"):
        fetch(parse_ref({"id": m["path"]}), tmp_path / "z", what="adapter")


def test_planning_needs_the_models_config(model_factory, tmp_path):
    """A hub model whose config.json is neither cached nor downloadable cannot be planned (the
    chain of layer blocks needs its depth): one message saying so. Once the cache holds it,
    layers are checked against the real depth before any job runs."""
    schema = REPO / "workflow/schemas/config.schema.yaml"
    cfg = {"run": "x", "model": {"id": "acme/not-yet"}, "dataset": {"path": str(REPO / "config/datasets/demo.jsonl")},
           "hub_cache": str(tmp_path / "empty"), "capture": {"layers": [0, 9]}}
    with pytest.raises(ConfigError, match=r"model\.id: the config\.json of acme/not-yet is not in the hub cache"):
        build_plan(cfg, schema, REPO, allow_download=False)
    make_hub_cache(tmp_path / "empty", "acme/not-yet", Path(model_factory("llama-tiny")["path"]))
    with pytest.raises(ConfigError, match="capture.layers: layer 9 is out of range for model acme/not-yet with 4"):
        build_plan(cfg, schema, REPO, allow_download=False)
    assert build_plan({**cfg, "capture": {"layers": [0, -1]}}, schema, REPO, allow_download=False).layers == [0, 3]


def test_manifest_records_size_mtime_and_hash(model_factory, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_factory("llama-tiny")["path"], d)
    m = fetch(parse_ref({"id": str(d)}), tmp_path / "x")
    for e in m["files"]:
        st = (d / e["path"]).stat()
        assert set(e) == {"path", "bytes", "mtime_ns", "sha256"}
        assert (e["bytes"], e["mtime_ns"]) == (st.st_size, st.st_mtime_ns) and len(e["sha256"]) == 64


def _run_with(tmp_path: Path, model: dict, adapter: dict | None, split: bool = False, name: str = "run") -> Path:
    """A run directory holding only model/manifest.json (and model/adapter.json if ``split``)."""
    run = tmp_path / name
    (run / "model").mkdir(parents=True, exist_ok=True)
    (run / "model/manifest.json").write_text(json.dumps({"model": model, "adapter": None if split else adapter}))
    if split:
        (run / "model/adapter.json").write_text(json.dumps({"adapter": adapter}))
    return run


@pytest.mark.parametrize("split", [False, True])
def test_model_changes_notices_an_adapter_retrained_in_place(model_factory, lora_adapter, tmp_path, split):
    model = model_factory("llama-tiny")
    ad = tmp_path / "adapter"
    shutil.copytree(lora_adapter["path"], ad)
    entry = fetch(parse_ref({"id": str(ad)}), tmp_path / "x", what="adapter")
    run = _run_with(tmp_path, model, entry, split)
    assert model_changes(run) == []
    (ad / ".hidden").write_text("editor state")  # hidden files are not part of the manifest
    assert model_changes(run) == []
    weights = ad / "adapter_model.safetensors"
    st = weights.stat()
    weights.write_bytes(weights.read_bytes())  # retrained: same size, new contents and mtime
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    msg, = model_changes(run)
    assert msg == (f"{run}: adapter {ad} changed on disk since this run was captured: adapter_model.safetensors "
                   f"was modified; the activations may not match the files now in {ad}")
    (ad / "adapter_config.json").unlink()
    (ad / "notes.txt").write_text("new")
    msg, = model_changes(run)
    assert "adapter_config.json is missing (and 2 more)" in msg
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    (ad / "notes.txt").unlink()
    assert "adapter_config.json is missing;" in model_changes(run)[0]
    shutil.rmtree(ad)
    assert f"directory {ad} is missing" in model_changes(run)[0]


def test_model_changes_model_entry_and_old_manifests(model_factory, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_factory("llama-tiny")["path"], d)
    entry = fetch(parse_ref({"id": str(d)}), tmp_path / "x")
    old = {**entry, "files": [{k: v for k, v in e.items() if k != "mtime_ns"} for e in entry["files"]]}
    run = _run_with(tmp_path, old, None)
    os.utime(d / "config.json", ns=(1, 1))
    assert model_changes(run) == []  # manifests written before mtime_ns: sizes only
    (d / "new.json").write_text("{}")
    assert model_changes(run) == [f"{run}: model {d} changed on disk since this run was captured: new.json is new; "
                                  f"the activations may not match the files now in {d}"]
    assert "config.json was modified" in model_changes(_run_with(tmp_path, entry, None, name="new"))[0]
    (run / "model/adapter.json").write_text(json.dumps({"adapter": None}))  # split manifest without an adapter
    assert len(model_changes(run)) == 1
    assert model_changes(tmp_path / "no-run") == []


@pytest.mark.parametrize("name", ["llama-tiny", "llama-512", "qwen2-tiny", "gpt2-tiny", "opt-tiny", "mixtral-tiny"])
def test_builtin_config_facts_match_the_real_config(name, model_factory):
    """Planning reads a built-in model's shape without transformers; it must be what the built model has."""
    from layerscope.models import builtin
    from layerscope.models.loading import dims_from_config

    facts = builtin.config_facts(name)
    real = json.loads((Path(model_factory(name)["path"]) / "config.json").read_text())
    assert dims_from_config(facts) == dims_from_config(real)
    for key in ("max_position_embeddings", "n_positions", "model_type", "architectures", "vocab_size"):
        assert facts.get(key) == real.get(key), key
