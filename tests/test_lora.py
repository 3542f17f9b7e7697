"""LoRA sites: the A projection's outputs and the module's added output, against a hand computation
from the adapter's own weights; planning them from the adapter's files; refusing what cannot be."""

from __future__ import annotations

import json
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


def module_inputs(manifest: dict, ds: Path, layer: int, mods: list[str]) -> dict[str, list[np.ndarray]]:
    """Each module's input at ``layer``, per example, run alone through the model with ``manifest``'s
    adapter (a plain hook on the module)."""
    from layerscope.capture.sites import decoder_layers
    from layerscope.models.loading import load_model

    model, _ = load_model(manifest, "cpu", "float32")
    layers = decoder_layers(model, manifest["model"]["num_layers"])
    ids, offsets = np.load(ds / "token_ids.npy"), np.load(ds / "offsets.npy")
    got: dict[str, list[np.ndarray]] = {mod: [] for mod in mods}
    hooks = [layers[layer].get_submodule(mod).register_forward_pre_hook(
        lambda mo, a, mod=mod: got[mod].append(a[0][0].detach().numpy())) for mod in mods]
    with torch.no_grad():
        for e in range(len(offsets) - 1):
            model(input_ids=torch.from_numpy(ids[offsets[e]:offsets[e + 1]].astype(np.int64))[None])
    for h in hooks:
        h.remove()
    return got


def check_by_hand(store: Path, manifest: dict, scaling: float, ds: Path, layer: int, positions: str,
                  sites: list[str]) -> None:
    """Every ``sites`` array of ``layer`` in ``store`` against x A^T (lora_a) and scaling x A^T B^T
    (lora_delta), with A and B read from ``manifest``'s adapter file."""
    import zarr

    g = zarr.open_group(str(store), mode="r")
    w = adapter_weights(manifest["adapter"])
    mods = sorted({site.split(".", 1)[1] for site in sites})
    got_in = module_inputs(manifest, ds, layer, mods)
    for site in sites:
        kind, mod = site.split(".", 1)
        a, b = w[(layer, mod)]
        x = np.concatenate([x if positions == "all" else x[-1:] for x in got_in[mod]])
        want = x @ a.T if kind == "lora_a" else scaling * (x @ a.T) @ b.T
        stored = g[f"layer_{layer:02d}/{site}"][:]
        assert stored.shape == want.shape
        np.testing.assert_allclose(stored, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["builtin", "rank1-all-linear", "rank64-modules-to-save"])
def test_lora_sites_equal_a_hand_computation(tmp_path, model_factory, lora_adapter, kind):
    """lora_a = x A^T and lora_delta = scaling x A^T B^T, where x is the module's input, taken here by
    a plain hook on the module; every row of every example, through the chained capture. Ranks 1
    to 64, every linear module adapted, and an adapter that also trains whole modules."""
    m = model_factory("llama-tiny")
    adapter, scaling = lora_adapter, 8 / 4  # builtin:lora: lora_alpha = 2 r
    if kind == "rank1-all-linear":
        adapter, scaling = peft_adapter(m, tmp_path, 1, ALL_LINEAR, 3), 3 / 1
    elif kind == "rank64-modules-to-save":
        adapter, scaling = peft_adapter(m, tmp_path, 64, ["q_proj", "v_proj"], 16,
                                        modules_to_save=["embed_tokens"]), 16 / 64
    manifest = {"model": m, "adapter": adapter}
    ds = prepare_texts(tmp_path, m)
    mods = sorted({mod for _, mod in adapter_weights(adapter)})
    sites = [f"lora_a.{mod}" for mod in mods] + [f"lora_delta.{mod}" for mod in mods]
    params = make_params({1: {"sites": sites, "positions": "all"}, 3: {"sites": sites[:2], "positions": "last"}},
                         parts=2)
    capture_store(tmp_path, manifest, params, ds, layers_per_job=2)
    check_by_hand(tmp_path / "store.zarr", manifest, scaling, ds, 1, "all", sites)
    check_by_hand(tmp_path / "store.zarr", manifest, scaling, ds, 3, "last", sites[:2])


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


def test_workflow_captures_base_and_adapter_variants(tmp_path, ckpt_adapter):
    import json
    import subprocess
    import sys

    import layerscope
    from tests.conftest import copy_inputs, run_snakemake

    wd = copy_inputs(tmp_path)
    cfg = yaml.safe_load((wd / "config" / "config.yaml").read_text())
    cfg["adapter"] = {"id": "builtin:lora"}
    # another checkpoint of the fine-tune: rank 8 (the main adapter's is 4), and up_proj, which the main one lacks
    cfg["adapters"] = {"ckpt": {"id": ckpt_adapter["path"]}}
    cfg["capture"] |= {"sites": ["resid_post", "lora_a"], "lora_modules": ["down_proj", "up_proj"],
                       "variants": ["base", "adapter", "ckpt"]}
    (wd / "config" / "v.yaml").write_text(yaml.safe_dump(cfg))
    res = run_snakemake(wd, "--cores", "2", configfile=wd / "config" / "v.yaml")
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = wd / "results" / "demo"
    adapter, base = layerscope.open(run_dir), layerscope.open(run_dir, "base")
    assert adapter.metadata["variants"] == {"adapter": "activations.zarr", "base": "activations.base.zarr",
                                            "ckpt": "activations.ckpt.zarr"}
    ckpt = layerscope.open(run_dir, "ckpt")
    assert adapter.variants == ckpt.variants and ckpt.variant == "ckpt"
    c = ckpt.activations(3, "resid_post").numpy()
    assert (1, "lora_a.mlp.down_proj") in adapter.arrays and (1, "lora_a.mlp.down_proj") not in base.arrays
    assert [a for a in adapter.arrays if not a[1].startswith("lora")] == base.arrays
    # each adapter's store holds the LoRA sites of its own modules, at its own rank
    assert [a for a in ckpt.arrays if not a[1].startswith("lora")] == base.arrays
    assert {s for _, s in ckpt.arrays if s.startswith("lora")} == {"lora_a.mlp.down_proj", "lora_a.mlp.up_proj"}
    assert {s for _, s in adapter.arrays if s.startswith("lora")} == {"lora_a.mlp.down_proj"}
    assert ckpt.activations(1, "lora_a.mlp.down_proj").width == 8 == ckpt.activations(1, "lora_a.mlp.up_proj").width
    assert adapter.activations(1, "lora_a.mlp.down_proj").width == 4
    a, b = adapter.activations(3, "resid_post").numpy(), base.activations(3, "resid_post").numpy()
    assert a.shape == b.shape == c.shape and not np.allclose(a, b) and not np.allclose(a, c)
    out = subprocess.run([sys.executable, "-m", "layerscope", "compare", f"{run_dir}:base", str(run_dir), "--json",
                          "--sites", "resid_post"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["rows"]
    assert rows and all(r["rel_l2"] > 0 for r in rows)
    # adapter vs ckpt: the LoRA neurons of two ranks do not pair up; they are listed, not compared
    out = subprocess.run([sys.executable, "-m", "layerscope", "compare", str(run_dir), f"{run_dir}:ckpt", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert {r["site"] for r in got["rows"]} == {"resid_post"}
    assert got["other_rank"] == [f"layer_{L:02d}/lora_a.mlp.down_proj" for L in range(4)]
    assert got["only_b"] == [f"layer_{L:02d}/lora_a.mlp.up_proj" for L in range(4)]
    # the dashboard's LoRA view shows the main adapter's LoRA neurons
    summary = json.loads((run_dir / "summaries" / "summary.json").read_text())
    assert summary["lora"]["layers"]["1"]["modules"] == ["mlp.down_proj"]
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


@pytest.fixture(scope="module")
def ckpt_adapter(model_factory, tmp_path_factory):
    """Another checkpoint of a fine-tune, as seed 004 has them: rank 8 (the main one's is 4), on
    q_proj (as the main one), up_proj (which the main one lacks) and down_proj, without v_proj."""
    return peft_adapter(model_factory("llama-tiny"), tmp_path_factory.mktemp("ckpt"), 8,
                        ["q_proj", "up_proj", "down_proj"], 4)


def _variant_config(tmp_path, main: dict, ckpt: dict | str, sites: list[str], **capture) -> dict:
    cfg = _config(tmp_path, main["path"], sites, variants=["adapter", "base", "ckpt"], **capture)
    cfg["adapters"] = {"ckpt": {"id": ckpt if isinstance(ckpt, str) else ckpt["path"]}}
    return cfg


def test_plan_gives_each_adapter_variant_its_own_lora_sites(tmp_path, lora_adapter, ckpt_adapter):
    plan = build_plan(_variant_config(tmp_path, lora_adapter, ckpt_adapter,
                                      ["resid_post", "lora_a", "lora_delta.self_attn.v_proj"]), SCHEMA, tmp_path)
    main = ["resid_post", "lora_a.mlp.down_proj", "lora_a.self_attn.q_proj", "lora_a.self_attn.v_proj",
            "lora_delta.self_attn.v_proj"]
    ckpt = ["resid_post", "lora_a.mlp.down_proj", "lora_a.mlp.up_proj", "lora_a.self_attn.q_proj"]  # no v_proj there
    assert plan.settings[0]["sites"] == main and plan.variant_sites["ckpt"][2] == ckpt
    block = plan.blocks[0]
    assert [s for L, s, _ in plan.captures(block) if L == 0] == main
    assert [s for L, s, _ in plan.captures(block, "ckpt") if L == 2] == ckpt
    assert [s for L, s, _ in plan.captures(block, "base") if L == 0] == ["resid_post"]
    assert plan.widths.site(0, "lora_a.mlp.down_proj") == 4
    assert plan.variant_widths("ckpt").site(0, "lora_a.mlp.down_proj") == 8
    assert plan.variant_widths("ckpt").site(0, "lora_delta.mlp.up_proj") == plan.dims.intermediate_size
    assert plan.variant_lora["ckpt"] == lora_modules(ckpt_adapter["path"])
    # capture.lora_modules applies to every adapter; a module only one of them adapts is its alone
    plan = build_plan(_variant_config(tmp_path, lora_adapter, ckpt_adapter, ["resid_post", "lora_a"],
                                      lora_modules=["up_proj"]), SCHEMA, tmp_path)
    assert plan.settings[0]["sites"] == ["resid_post"]
    assert plan.variant_sites["ckpt"][0] == ["resid_post", "lora_a.mlp.up_proj"]
    # without LoRA sites the more adapters' stores hold what the base one holds
    plan = build_plan(_variant_config(tmp_path, lora_adapter, ckpt_adapter, ["resid_post"]), SCHEMA, tmp_path)
    assert plan.captures(plan.blocks[0], "ckpt") == plan.captures(plan.blocks[0], "base") == \
        plan.captures(plan.blocks[0])


def _not_lora(d: Path, ckpt: dict) -> str:
    import shutil

    shutil.copytree(ckpt["path"], d)
    (d / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    return str(d)


def _no_weights(d: Path, ckpt: dict) -> str:
    d.mkdir()
    (d / "adapter_config.json").write_bytes((Path(ckpt["path"]) / "adapter_config.json").read_bytes())
    return str(d)


@pytest.mark.parametrize("ckpt,sites,capture,message", [
    (None, ["lora_a"], {"lora_modules": ["gate_proj"]},
     "config error: capture.lora_modules: 'gate_proj' matches no module any adapter adapts (adapter: mlp.down_proj, "
     "self_attn.q_proj, self_attn.v_proj; ckpt: mlp.down_proj, mlp.up_proj, self_attn.q_proj)"),
    (None, ["lora_a.self_attn.k_proj"], {},
     "config error: capture.sites: lora_a.self_attn.k_proj: layer 0 has no LoRA module 'self_attn.k_proj' in any "
     "adapter (adapted there: adapter: mlp.down_proj, self_attn.q_proj, self_attn.v_proj; ckpt: mlp.down_proj, "
     "mlp.up_proj, self_attn.q_proj)"),
    (_not_lora, ["lora_a"], {}, "config error: adapters.ckpt.id: "),
    (_no_weights, ["lora_a"], {}, "config error: adapters.ckpt.id: "),
    ("builtin:other", ["resid_post"], {},
     "config error: adapters.ckpt.id: unknown built-in adapter 'builtin:other' (choose builtin:lora)"),
    ("./missing", ["lora_a"], {}, "config error: adapters.ckpt.id: local directory"),
])
def test_bad_variant_lora_config_is_one_message(tmp_path, lora_adapter, ckpt_adapter, ckpt, sites, capture, message):
    ref = ckpt(tmp_path / "ckpt", ckpt_adapter) if callable(ckpt) else ckpt or ckpt_adapter
    with pytest.raises(ConfigError) as e:
        build_plan(_variant_config(tmp_path, lora_adapter, ref, sites, **capture), SCHEMA, tmp_path)
    msg = str(e.value)
    assert msg.startswith(message) and "\n" not in msg, msg
    if ckpt is _not_lora:
        assert "is a IA3 adapter; LoRA sites need a LoRA adapter" in msg
    if ckpt is _no_weights:
        assert "has no adapter_model.safetensors" in msg


def test_adapter_variant_captures_its_own_lora_sites(tmp_path, model_factory, lora_adapter, ckpt_adapter):
    """Two PEFT adapters of different ranks and modules from one load, two parts, two chained blocks:
    the ckpt variant's lora_a / lora_delta are x A^T and scaling x A^T B^T of the ckpt adapter's own A
    and B (x: the module's input with that adapter alone), the main store keeps the main adapter's, and
    the variant's store is byte for byte a run of the ckpt adapter alone as the main adapter."""
    from layerscope.capture.chain import boundary_path
    from layerscope.capture.run import run_capture
    from layerscope.data.dataset import load_tokens
    from layerscope.store.layout import finalize
    from tests.test_resume import files

    m = model_factory("llama-tiny")
    ds = prepare_texts(tmp_path, m)
    main_lora = [f"{k}.{mod}" for k in ("lora_a", "lora_delta") for mod in ("mlp.down_proj", "self_attn.v_proj")]
    ckpt_lora = [f"{k}.{mod}" for k in ("lora_a", "lora_delta") for mod in ("mlp.down_proj", "mlp.up_proj")]
    main_layers = {1: {"sites": ["resid_post"] + main_lora, "positions": "all"},
                   3: {"sites": main_lora[:2], "positions": "last"}}
    ckpt_layers = {1: {"sites": ["resid_post"] + ckpt_lora, "positions": "all"},
                   3: {"sites": ckpt_lora[:2], "positions": "last"}}
    params = make_params(main_layers, parts=2)
    manifest = {"model": m, "adapter": lora_adapter, "adapters": {"ckpt": ckpt_adapter}}
    chain = tmp_path / "paired-chain"
    for p in range(2):
        for start, end in ((0, 1), (2, 3)):
            caps = lambda layers: [(L, s, v["positions"]) for L, v in layers.items() if start <= L <= end  # noqa: E731
                                   for s in v["sites"]]
            job = {k: v for k, v in params.items() if k != "layers"} | {"block": [start, end]}
            run_capture(manifest, ds, tmp_path / "paired.zarr", job, p, caps(main_layers), device="cpu",
                        group=f"L{start}", boundary_in=boundary_path(chain, start, p) if start else None,
                        boundary_out=boundary_path(chain, end + 1, p) if end < 3 else None,
                        variants={"ckpt": {"store_root": tmp_path / "paired.ckpt.zarr", "captures": caps(ckpt_layers),
                                           "boundary_in": boundary_path(chain, start, p, "ckpt") if start else None,
                                           "boundary_out": boundary_path(chain, end + 1, p, "ckpt") if end < 3
                                           else None}})
    ids, offsets = load_tokens(ds)
    for name, layers in (("paired", main_layers), ("paired.ckpt", ckpt_layers)):
        finalize(tmp_path / f"{name}.zarr", [(L, s, v["positions"]) for L, v in layers.items() for s in v["sites"]],
                 2, ids, offsets, {"run": "test"})
    scaling_main, scaling_ckpt = 8 / 4, 4 / 8  # lora_alpha / r
    only_ckpt = {"model": m, "adapter": ckpt_adapter}
    check_by_hand(tmp_path / "paired.ckpt.zarr", only_ckpt, scaling_ckpt, ds, 1, "all", ckpt_lora)
    check_by_hand(tmp_path / "paired.ckpt.zarr", only_ckpt, scaling_ckpt, ds, 3, "last", ckpt_lora[:2])
    check_by_hand(tmp_path / "paired.zarr", {"model": m, "adapter": lora_adapter}, scaling_main, ds, 1, "all",
                  main_lora)
    import zarr

    g = zarr.open_group(str(tmp_path / "paired.ckpt.zarr"), mode="r")
    assert g["layer_01/lora_a.mlp.down_proj"].shape[1] == 8
    assert zarr.open_group(str(tmp_path / "paired.zarr"), mode="r")["layer_01/lora_a.mlp.down_proj"].shape[1] == 4
    alone = capture_store(tmp_path, only_ckpt, make_params(ckpt_layers, parts=2), ds, name="alone", layers_per_job=2)

    def data(root: Path) -> dict[str, bytes]:
        """Shard files and array metadata, but the variant an array's attributes name."""
        out = {}
        for k, v in files(root).items():
            if k.endswith("zarr.json") and k != "zarr.json":
                meta = json.loads(v)
                meta.get("attributes", {}).pop("variant", None)
                v = json.dumps(meta).encode()
            out[k] = v
        return {k: v for k, v in out.items() if k != "zarr.json"}  # root attrs name the variant

    assert data(tmp_path / "paired.ckpt.zarr") == data(alone) and len(data(alone)) > 10
