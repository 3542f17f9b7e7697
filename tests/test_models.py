"""Model resolution: built-in, local directory, and the hub path through an offline hub cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from layerscope.config import build_plan
from layerscope.errors import ConfigError, ModelError
from layerscope.models import fetch, parse_ref, peek_config
from layerscope.steps import fetch_model

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


def test_layer_out_of_range_after_download_fails_first_job(model_factory, tmp_path):
    """A hub model not in the cache at planning time is planned from the listed layers; the
    fetch job then fails with the same message planning gives for a known model."""
    cfg = {"run": "x", "model": {"id": "acme/not-yet"}, "dataset": {"path": str(REPO / "config/datasets/demo.jsonl")},
           "hub_cache": str(tmp_path / "empty"), "capture": {"layers": [0, 9]}}
    plan = build_plan(cfg, REPO / "workflow/schemas/config.schema.yaml", REPO, allow_download=False)
    assert plan.layers == [0, 9] and plan.dims is None
    with pytest.raises(ConfigError, match="needs the number of layers"):
        build_plan({**cfg, "capture": {"layers": "all"}}, REPO / "workflow/schemas/config.schema.yaml", REPO,
                   allow_download=False)
    # now "download" it: the cache gets the model, and the fetch job checks the planned layers
    src = Path(model_factory("llama-tiny")["path"])
    cache = make_hub_cache(tmp_path / "empty", "acme/not-yet", src)
    with pytest.raises(ConfigError) as job_err:
        fetch_model(model={"id": "acme/not-yet"}, adapter=None, hub_cache=str(cache), layers=plan.layers,
                    weights_dir=str(tmp_path / "w"), adapter_dir=str(tmp_path / "a"),
                    manifest_out=str(tmp_path / "manifest.json"))
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(ConfigError) as plan_err:
        build_plan(cfg, REPO / "workflow/schemas/config.schema.yaml", REPO, allow_download=False)
    want = "capture.layers: layer 9 is out of range for model acme/not-yet with 4 layers"
    assert want in str(job_err.value) and want in str(plan_err.value)
