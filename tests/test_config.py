"""An invalid config stops before any job with one message naming the key and the problem."""

from __future__ import annotations

import copy
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
    assert plan.groups == {"L00-01": [0, 1], "L02-03": [2, 3]}
    assert plan.parts == 2
    assert len(plan.arrays()) == 16
    assert plan.config["store"]["compression"] == "none"  # schema defaults are filled in


@pytest.mark.parametrize("path,value,message", [
    ("capture.colour", "red", r"capture\.colour: unknown key \(allowed here: .*layers.*\)"),
    ("bogus", 1, r"bogus: unknown key"),
    ("capture.batch_size", "eight", r"capture\.batch_size: 'eight' is not of type 'integer'"),
    ("capture.parts", 0, r"capture\.parts: 0 is less than the minimum of 1"),
    ("capture.sites", ["resid_post", "resid_pre"], r"capture\.sites\[1\]: 'resid_pre' is not one of resid_post"),
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
    assert "config error: capture.sites[1]: 'mlp_gate' is not one of" in out
    assert out.count("config error") == 1
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()


def test_key_order_does_not_change_params():
    reordered = {k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v)
                 for k, v in reversed(list(DEFAULT.items()))}
    a, b = build_plan(DEFAULT, SCHEMA, REPO), build_plan(reordered, SCHEMA, REPO)
    assert repr(a.config["model"]) == repr(b.config["model"])
    assert all(repr(a.job_params(g)) == repr(b.job_params(g)) for g in a.groups)
