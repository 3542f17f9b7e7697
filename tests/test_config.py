"""An invalid config stops before any job with one message naming the key and the problem."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from layerscope.config import build_plan
from layerscope.errors import ConfigError
from tests.conftest import REPO, run_snakemake

SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
DEFAULT = yaml.safe_load((REPO / "config/config.yaml").read_text())


def with_change(path: str, value) -> dict:
    cfg = copy.deepcopy(DEFAULT)
    *head, last = path.split(".")
    node = cfg
    for k in head:
        node = node[k]
    node[last] = value
    return cfg


def test_default_config_plans_groups_and_parts():
    plan = build_plan(DEFAULT, SCHEMA, REPO)
    assert plan.layers == [0, 1, 2, 3]
    assert [(b.name, b.layers, b.reads_boundary, b.writes_boundary) for b in plan.blocks] == [
        ("L00-01", (0, 1), False, True), ("L02-03", (2, 3), True, False)]
    assert plan.parts == 2
    assert len(plan.arrays()) == 16
    assert plan.config["store"]["compression"] == "none"  # schema defaults are filled in


@pytest.mark.parametrize("path,value,message", [
    ("capture.colour", "red", r"capture\.colour: unknown key \(allowed here: .*layers.*\)"),
    ("bogus", 1, r"bogus: unknown key"),
    ("capture.batch_size", "eight", r"capture\.batch_size: 'eight' is not of type 'integer'"),
    ("capture.parts", 0, r"capture\.parts: 0 is less than the minimum of 1"),
    ("capture.sites", ["resid_post", "resid_pre"], r"capture\.sites\[1\]: 'resid_pre' is not a site; choose from resid_post, attn_out"),
    ("capture.layers", "some", r"capture\.layers: 'some' is not 'all' or a list of layer numbers"),
    ("capture.layers", [0, 4], r"capture\.layers: layer 4 is out of range for model builtin:llama-tiny with 4 layers"),
    ("capture.layers", [-5], r"capture\.layers: layer -5 is out of range"),
    ("capture.overrides", {"9": {"positions": "last"}}, r"capture\.overrides\.9: layer 9 is out of range"),
    ("capture.overrides", {"1": {"colour": "red"}}, r"capture\.overrides\.1\.colour: unknown key"),
    ("dataset.path", "config/datasets/missing.jsonl", r"dataset\.path: file .*missing\.jsonl does not exist"),
    ("model.id", "builtin:nope", r"model\.id: unknown built-in model 'builtin:nope'"),
    ("model.id", "./no/such/dir", r"model\.id: local directory .*no/such/dir does not exist"),
    ("run", "../escape", r"run: '\.\./escape' does not match"),
])
def test_invalid_config_message(path, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_plan(with_change(path, value), SCHEMA, REPO)
    assert str(err.value).startswith("config error: ") and "\n" not in str(err.value)


def test_negative_layers_and_overrides_resolve():
    cfg = with_change("capture.layers", [-1, 0])
    cfg["capture"]["overrides"] = {"-1": {"sites": ["resid_post"], "positions": "last"}}
    plan = build_plan(cfg, SCHEMA, REPO)
    assert plan.layers == [0, 3]
    assert plan.settings[3] == {"sites": ["resid_post"], "positions": "last"}
    assert plan.settings[0]["positions"] == "all"


def test_snakemake_stops_before_any_job(workdir: Path):
    cfg = with_change("capture.sites", ["resid_post", "mlp_gate"])
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = run_snakemake(workdir, "--cores", "1")
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "config error: capture.sites[1]: 'mlp_gate' is not a site; choose from" in out
    assert out.count("config error") == 1
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()


def test_key_order_does_not_change_params():
    reordered = {k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v)
                 for k, v in reversed(list(DEFAULT.items()))}
    a, b = build_plan(DEFAULT, SCHEMA, REPO), build_plan(reordered, SCHEMA, REPO)
    assert repr(a.config["model"]) == repr(b.config["model"])
    assert all(repr(a.job_params(x)) == repr(b.job_params(y)) for x, y in zip(a.blocks, b.blocks))


@pytest.mark.parametrize("layers,per_job,blocks", [
    ([0, 1, 2, 3], 1, [("L00-00", (0,)), ("L01-01", (1,)), ("L02-02", (2,)), ("L03-03", (3,))]),
    ([2], 1, [("L00-00", ()), ("L01-01", ()), ("L02-02", (2,))]),   # relays below the first captured layer
    ([1], 3, [("L00-02", (1,))]),                                      # fixed blocks: runs to layer 2
    ([3], 3, [("L00-02", ()), ("L03-03", (3,))]),                      # the model's last block is short
])
def test_blocks_are_fixed_ranges(layers, per_job, blocks):
    cfg = with_change("capture.layers", layers)
    cfg["capture"]["layers_per_job"] = per_job
    plan = build_plan(cfg, SCHEMA, REPO)
    assert [(b.name, b.layers) for b in plan.blocks] == blocks
    # every block hands the stream on, except the model's last; adding a layer never regroups
    assert [b.writes_boundary for b in plan.blocks] == [b.end < 3 for b in plan.blocks]
    more = build_plan({**cfg, "capture": {**cfg["capture"], "layers": sorted(set(layers) | {0})}}, SCHEMA, REPO)
    assert [b.name for b in more.blocks] == [name for name, _ in blocks]
    assert [b.layers for b in more.blocks[1:]] == [ls for _, ls in blocks[1:]]


def test_max_length_beyond_the_models_positions():
    cfg = with_change("model.id", "builtin:gpt2-tiny")
    cfg["dataset"]["max_length"] = 1025
    with pytest.raises(ConfigError, match=r"dataset\.max_length: 1025 is more than the 1024 positions builtin:gpt2-tiny"):
        build_plan(cfg, SCHEMA, REPO)
    cfg["dataset"]["max_length"] = 1024
    build_plan(cfg, SCHEMA, REPO)


MOE_MLP_ACT = ("capture.sites: mlp_act is not defined for mixtral (a sparse mixture-of-experts MLP: each expert "
               "has its own neurons); use mlp_out or resid_post")


@pytest.mark.parametrize("model_type,arch,sites,problem", [
    ("mixtral", "MixtralForCausalLM", ["resid_post", "mlp_act"], MOE_MLP_ACT),
    ("mixtral", "MixtralForCausalLM", ["resid_post", "attn_out", "mlp_out"], None),
    ("qwen2_moe", "Qwen2MoeForCausalLM", ["mlp_act"], "capture.sites: mlp_act is not defined for qwen2_moe"),
    ("custom", "MyMoEForCausalLM", ["mlp_act"], "capture.sites: mlp_act is not defined for custom"),
    ("opt", "OPTForCausalLM", ["resid_post", "attn_out", "mlp_out", "mlp_act"], None),
    ("llama", "LlamaForCausalLM", ["mlp_act"], None),
    ("gpt2", "GPT2LMHeadModel", ["mlp_act"], None),
])
def test_check_sites(model_type, arch, sites, problem):
    from layerscope.models.architectures import check_sites

    got = check_sites(model_type, arch, sites)
    if problem is None:
        assert got is None
    else:
        assert got.startswith(problem) and "\n" not in got


def test_check_capture_names_the_override():
    from layerscope.models.architectures import check_capture

    cap = {"sites": ["resid_post"], "overrides": {"-1": {"positions": "last"}, "2": {"sites": ["mlp_act"]}}}
    assert check_capture("mixtral", "MixtralForCausalLM", cap).startswith(
        "capture.overrides.2.sites: mlp_act is not defined for mixtral")
    assert check_capture("mixtral", "MixtralForCausalLM", {**cap, "overrides": {}}) is None
    assert check_capture("opt", "OPTForCausalLM", {"sites": ["mlp_act"], "overrides": {}}) is None


def test_moe_mlp_act_refused_at_config_time():
    cfg = with_change("model.id", "builtin:mixtral-tiny")  # the default sites include mlp_act
    with pytest.raises(ConfigError, match="^config error: " + re.escape(MOE_MLP_ACT) + "$"):
        build_plan(cfg, SCHEMA, REPO)


@pytest.mark.parametrize("name", ["opt-tiny", "mixtral-tiny"])
def test_new_architectures_plan(name):
    cfg = with_change("model.id", f"builtin:{name}")
    cfg["capture"]["sites"] = ["resid_post", "attn_out", "mlp_out"]
    plan = build_plan(cfg, SCHEMA, REPO)
    assert plan.layers == [0, 1, 2] and plan.dims.model_type == name.split("-")[0]
    assert (plan.dims.hidden_size, plan.dims.intermediate_size) == ((64, 256) if name == "opt-tiny" else (64, 128))
