"""LoRA sites: the A projection's outputs and the module's added output, against a hand computation
from the adapter's own weights; planning them from the adapter's files; refusing what cannot be."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from layerscope.config import build_plan
from layerscope.errors import ConfigError
from layerscope.models.adapters import lora_modules
from tests.conftest import REPO, write_jsonl
from tests.helpers import capture_store, make_params, prepare_texts

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def adapter_weights(adapter: dict) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """{(layer, module): (A [r, in], B [out, r])} read straight from the adapter file."""
    w = load_file(f"{adapter['path']}/adapter_model.safetensors")
    out = {}
    for k, v in w.items():
        if ".lora_A." in k:
            pre = k.split(".lora_A.")[0]
            layer = int(pre.split(".layers.")[1].split(".")[0])
            module = pre.split(f".layers.{layer}.")[1]
            out[(layer, module)] = (v, w[k.replace("lora_A", "lora_B")])
    return out


def test_modules_read_from_the_header(lora_adapter):
    mods = lora_modules(lora_adapter["path"])
    w = adapter_weights(lora_adapter)
    assert {(L, m) for L, ms in mods.items() for m in ms} == set(w)
    for (L, m), (a, b) in w.items():
        assert mods[L][m] == [a.shape[0], b.shape[0]]
    assert {int(L): v for L, v in lora_adapter["modules"].items()} == mods  # what fetch records


def peft_adapter(base: dict, out: Path, rank: int, targets: list[str], alpha: int, **extra) -> dict:
    """A LoRA adapter made with PEFT itself (non-zero B), saved and fetched like a user's local one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from layerscope.models.loading import fetch, parse_ref

    model = AutoModelForCausalLM.from_pretrained(base["path"], dtype=torch.float32)
    torch.manual_seed(rank)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                                                  init_lora_weights=False, **extra))
    peft_model.save_pretrained(out / "saved", safe_serialization=True)
    return fetch(parse_ref({"id": str(out / "saved")}), out / "fetched", what="adapter", base_dir=base["path"])


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("kind", ["builtin", "rank1-all-linear", "rank64-modules-to-save"])
def test_lora_sites_equal_a_hand_computation(tmp_path, model_factory, lora_adapter, kind):
    """lora_a = x A^T and lora_delta = scaling x A^T B^T, where x is the module's input, taken here by
    a plain hook on the module; every row of every example, through the chained capture. Ranks 1
    to 64, every linear module adapted, and an adapter that also trains whole modules."""
    from layerscope.capture.sites import decoder_layers
    from layerscope.models.loading import load_model

    m = model_factory("llama-tiny")
    adapter, scaling = lora_adapter, 8 / 4  # builtin:lora: lora_alpha = 2 r
    if kind == "rank1-all-linear":
        adapter, scaling = peft_adapter(m, tmp_path, 1, ALL_LINEAR, 3), 3 / 1
    elif kind == "rank64-modules-to-save":
        adapter, scaling = peft_adapter(m, tmp_path, 64, ["q_proj", "v_proj"], 16,
                                        modules_to_save=["embed_tokens"]), 16 / 64
    manifest = {"model": m, "adapter": adapter}
    ds = prepare_texts(tmp_path, m)
    w = adapter_weights(adapter)
    mods = sorted({mod for _, mod in w})
    sites = [f"lora_a.{mod}" for mod in mods] + [f"lora_delta.{mod}" for mod in mods]
    params = make_params({1: {"sites": sites, "positions": "all"}, 3: {"sites": sites[:2], "positions": "last"}},
                         parts=2)
    capture_store(tmp_path, manifest, params, ds, layers_per_job=2)
    import zarr

    g = zarr.open_group(str(tmp_path / "store.zarr"), mode="r")
    model, _ = load_model(manifest, "cpu", "float32")
    layers = decoder_layers(model, m["num_layers"])
    ids, offsets = np.load(ds / "token_ids.npy"), np.load(ds / "offsets.npy")
    for layer, positions, layer_sites in ((1, "all", sites), (3, "last", sites[:2])):
        got_in: dict[str, list[np.ndarray]] = {mod: [] for mod in mods}
        hooks = [layers[layer].get_submodule(mod).register_forward_pre_hook(
            lambda mo, a, mod=mod: got_in[mod].append(a[0][0].detach().numpy())) for mod in mods]
        with torch.no_grad():
            for e in range(len(offsets) - 1):
                model(input_ids=torch.from_numpy(ids[offsets[e]:offsets[e + 1]].astype(np.int64))[None])
        for h in hooks:
            h.remove()
        for site in layer_sites:
            kind, mod = site.split(".", 1)
            a, b = w[(layer, mod)]
            xs = [x if positions == "all" else x[-1:] for x in got_in[mod]]
            x = np.concatenate(xs)
            want = x @ a.T if kind == "lora_a" else scaling * (x @ a.T) @ b.T
            stored = g[f"layer_{layer:02d}/{site}"][:]
            assert stored.shape == want.shape
            np.testing.assert_allclose(stored, want, rtol=1e-4, atol=1e-5)


def _config(tmp_path, adapter_id, sites, **capture):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello there"}])
    cfg = {"run": "r", "model": {"id": "builtin:llama-tiny"}, "dataset": {"path": str(data)},
           "capture": {"layers": [0, 2], "sites": sites, **capture}}
    if adapter_id:
        cfg["adapter"] = {"id": adapter_id}
    return cfg


def test_plan_expands_lora_sites_per_module(tmp_path, lora_adapter):
    plan = build_plan(_config(tmp_path, lora_adapter["path"], ["resid_post", "lora_a"]), SCHEMA, tmp_path)
    assert plan.settings[0]["sites"] == ["resid_post", "lora_a.mlp.down_proj", "lora_a.self_attn.q_proj",
                                         "lora_a.self_attn.v_proj"]
    plan = build_plan(_config(tmp_path, lora_adapter["path"], ["lora_delta"], lora_modules=["v_proj"]), SCHEMA,
                      tmp_path)
    assert plan.settings[2]["sites"] == ["lora_delta.self_attn.v_proj"]
    assert plan.widths.site(2, "lora_delta.self_attn.v_proj") == 32  # v_proj's output: 2 kv heads x 16
    assert plan.widths.site(2, "lora_a.self_attn.v_proj") == 4
    # the built-in adapter is planned without being fetched
    plan = build_plan(_config(tmp_path, "builtin:lora", ["lora_a.mlp.down_proj"]), SCHEMA, tmp_path)
    assert plan.lora == lora_modules(lora_adapter["path"])


@pytest.mark.parametrize("adapter,sites,capture,message", [
    (None, ["lora_a"], {}, "lora_a and lora_delta are the sites of a LoRA adapter, and adapter: is null"),
    ("A", ["lora_a.mlp.up_proj"], {}, "lora_a.mlp.up_proj: layer 0 has no LoRA module 'mlp.up_proj' "
                                      "(adapted there: mlp.down_proj, self_attn.q_proj, self_attn.v_proj)"),
    ("A", ["lora_a"], {"lora_modules": ["gate_proj"]}, "capture.lora_modules: 'gate_proj' matches no module"),
    ("A", ["lora_b"], {}, "capture.sites[0]: 'lora_b' is not a site"),
])
def test_bad_lora_config_is_one_message(tmp_path, lora_adapter, adapter, sites, capture, message):
    with pytest.raises(ConfigError) as e:
        build_plan(_config(tmp_path, adapter and lora_adapter["path"], sites, **capture), SCHEMA, tmp_path)
    assert message in str(e.value)


def test_workflow_captures_lora_sites_of_the_builtin_adapter(tmp_path):
    from tests.conftest import copy_inputs, run_snakemake

    wd = copy_inputs(tmp_path)
    cfg = yaml.safe_load((wd / "config" / "config.yaml").read_text())
    cfg["adapter"] = {"id": "builtin:lora"}
    cfg["capture"] |= {"sites": ["resid_post", "lora_a", "lora_delta"], "lora_modules": ["down_proj"],
                       "layers": [1, 2]}
    (wd / "config" / "lora.yaml").write_text(yaml.safe_dump(cfg))
    res = run_snakemake(wd, "--cores", "2", configfile=wd / "config" / "lora.yaml")
    assert res.returncode == 0, res.stderr[-3000:]
    import layerscope

    run = layerscope.open(wd / "results" / "demo")
    assert {(L, s) for L, s in run.arrays} >= {(1, "lora_a.mlp.down_proj"), (2, "lora_delta.mlp.down_proj")}
    assert run.activations(1, "lora_a.mlp.down_proj").width == 4
    assert run.activations(2, "lora_delta.mlp.down_proj").width == 64


def test_base_variant_equals_a_run_without_the_adapter(tmp_path, model_factory, lora_adapter):
    """One load, two passes per batch: the base store is byte for byte a capture of the model alone,
    the main store byte for byte a capture with the adapter alone; both chained across blocks."""
    from layerscope.capture.chain import boundary_path
    from layerscope.capture.run import run_capture
    from layerscope.data.dataset import load_tokens
    from layerscope.store.layout import finalize
    from tests.test_resume import files

    m = model_factory("llama-tiny")
    ds = prepare_texts(tmp_path, m)
    layers = {0: {"sites": ["resid_post", "mlp_act"], "positions": "all"},
              2: {"sites": ["resid_post", "attn_out"], "positions": "last"}}
    params = make_params(layers, parts=1)
    plain = capture_store(tmp_path, {"model": m, "adapter": None}, params, ds, name="plain", layers_per_job=2)
    adapted = capture_store(tmp_path, {"model": m, "adapter": lora_adapter}, params, ds, name="adapted",
                            layers_per_job=2)
    manifest = {"model": m, "adapter": lora_adapter}
    chain = tmp_path / "paired-chain"
    for start, end in ((0, 1), (2, 3)):
        caps = [(L, s, v["positions"]) for L, v in layers.items() if start <= L <= end for s in v["sites"]]
        job = {k: v for k, v in params.items() if k != "layers"} | {"block": [start, end]}
        run_capture(manifest, ds, tmp_path / "paired.zarr", job, 0, caps, device="cpu", group=f"L{start}",
                    boundary_in=boundary_path(chain, start, 0) if start else None,
                    boundary_out=boundary_path(chain, end + 1, 0) if end < 3 else None,
                    variants={"base": {"store_root": tmp_path / "paired.base.zarr", "captures": caps,
                                       "boundary_in": boundary_path(chain, start, 0, "base") if start else None,
                                       "boundary_out": boundary_path(chain, end + 1, 0, "base") if end < 3 else None}})
    ids, offsets = load_tokens(ds)
    arrays = [(L, s, v["positions"]) for L, v in layers.items() for s in v["sites"]]
    for name in ("paired", "paired.base"):
        finalize(tmp_path / f"{name}.zarr", arrays, 1, ids, offsets, {"run": "test"})
    same = lambda a, b: {k: v for k, v in files(a).items() if k != "zarr.json"} == \
        {k: v for k, v in files(b).items() if k != "zarr.json"}  # noqa: E731 (root attrs name the variant)
    assert same(tmp_path / "paired.base.zarr", plain)
    assert same(tmp_path / "paired.zarr", adapted)
    assert not same(plain, adapted)  # the adapter changes something, so the two passes really differ


def test_workflow_captures_base_and_adapter_variants(tmp_path):
    import json
    import subprocess
    import sys

    import layerscope
    from tests.conftest import copy_inputs, run_snakemake

    wd = copy_inputs(tmp_path)
    cfg = yaml.safe_load((wd / "config" / "config.yaml").read_text())
    cfg["adapter"] = {"id": "builtin:lora"}
    cfg["adapters"] = {"ckpt": {"id": "builtin:lora", "seed": 5}}  # another checkpoint of the fine-tune
    cfg["capture"] |= {"sites": ["resid_post", "lora_a"], "lora_modules": ["down_proj"],
                       "variants": ["base", "adapter", "ckpt"]}
    (wd / "config" / "v.yaml").write_text(yaml.safe_dump(cfg))
    res = run_snakemake(wd, "--cores", "2", configfile=wd / "config" / "v.yaml")
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = wd / "results" / "demo"
    adapter, base = layerscope.open(run_dir), layerscope.open(run_dir, "base")
    assert adapter.metadata["variants"] == {"adapter": "activations.zarr", "base": "activations.base.zarr",
                                            "ckpt": "activations.ckpt.zarr"}
    ckpt = layerscope.open(run_dir, "ckpt")
    assert ckpt.arrays == base.arrays
    c = ckpt.activations(3, "resid_post").numpy()
    assert (1, "lora_a.mlp.down_proj") in adapter.arrays and (1, "lora_a.mlp.down_proj") not in base.arrays
    assert [a for a in adapter.arrays if not a[1].startswith("lora")] == base.arrays
    a, b = adapter.activations(3, "resid_post").numpy(), base.activations(3, "resid_post").numpy()
    assert a.shape == b.shape == c.shape and not np.allclose(a, b) and not np.allclose(a, c)
    out = subprocess.run([sys.executable, "-m", "layerscope", "compare", f"{run_dir}:base", str(run_dir), "--json",
                          "--sites", "resid_post"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["rows"]
    assert rows and all(r["rel_l2"] > 0 for r in rows)
    again = run_snakemake(wd, "-n", configfile=wd / "config" / "v.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_adapter_of_another_base_model_is_refused_naming_both_shapes(tmp_path, model_factory, lora_adapter):
    from layerscope.errors import ModelError
    from layerscope.models.loading import fetch, parse_ref

    other = model_factory("qwen2-tiny")  # another architecture and shape: its q_proj is not llama-tiny's
    with pytest.raises(ModelError) as e:
        fetch(parse_ref({"id": lora_adapter["path"]}), tmp_path / "a", what="adapter", base_dir=other["path"])
    msg = str(e.value)
    assert "does not fit model" in msg and "lora_A [4, 172]" in msg and "but its weight in the model is" in msg
    # the adapter's own base passes
    fetch(parse_ref({"id": lora_adapter["path"]}), tmp_path / "b", what="adapter",
          base_dir=model_factory("llama-tiny")["path"])


def test_more_adapters_are_variants_from_one_load(tmp_path, model_factory, lora_adapter):
    """A second checkpoint as a variant: its store is byte for byte a run of that adapter alone."""
    from layerscope.capture.run import run_capture
    from layerscope.data.dataset import load_tokens
    from layerscope.models.loading import fetch, parse_ref
    from layerscope.store.layout import finalize
    from tests.test_resume import files

    m = model_factory("llama-tiny")
    ckpt = fetch(parse_ref({"id": "builtin:lora", "seed": 11}), tmp_path / "ckpt", what="adapter", base_dir=m["path"])
    ds = prepare_texts(tmp_path, m)
    layers = {1: {"sites": ["resid_post", "mlp_act"], "positions": "all"}, 3: {"sites": ["resid_post"],
                                                                              "positions": "last"}}
    params = make_params(layers, parts=1)
    alone = capture_store(tmp_path, {"model": m, "adapter": ckpt}, params, ds, name="alone")
    caps = [(L, s, v["positions"]) for L, v in layers.items() for s in v["sites"]]
    job = {k: v for k, v in params.items() if k != "layers"} | {"block": [0, 3]}
    run_capture({"model": m, "adapter": lora_adapter, "adapters": {"ckpt": ckpt}}, ds, tmp_path / "main.zarr", job,
                0, caps, device="cpu", variants={"ckpt": {"store_root": tmp_path / "main.ckpt.zarr", "captures": caps}})
    ids, offsets = load_tokens(ds)
    for name in ("main", "main.ckpt"):
        finalize(tmp_path / f"{name}.zarr", caps, 1, ids, offsets, {"run": "test"})
    # the shard files (array metadata differ only in the variant they name)
    data = lambda root: {k: v for k, v in files(root).items() if "/c/" in k}  # noqa: E731
    assert data(tmp_path / "main.ckpt.zarr") == data(alone) and len(data(alone)) >= 3
    assert data(tmp_path / "main.zarr") != data(alone)
