"""Two small runs with prompted passes, made once per test session (config/passes.yaml, made
smaller): a base run with mcq, self_confidence, other_confidence (generating) and self_gen (the
self_confidence prompt, generating), and the same model with builtin:lora, passes mcq and
other_confidence only. Layers 0 and 2 of the 4, every position."""

from __future__ import annotations

from pathlib import Path

import yaml

from layerscope.passes.prompts import BUILTIN
from tests.conftest import copy_inputs, run_snakemake

_made: dict[str, Path] = {}


def _config(run: str, adapter: bool) -> dict:
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/passes.yaml").read_text(encoding="utf-8"))
    cfg["run"] = run
    cfg["dataset"]["max_length"] = 16
    cfg["capture"].update(layers=[0, 2], batch_size=8)
    gen = {"max_new_tokens": 4}
    if adapter:
        cfg["adapter"] = {"id": "builtin:lora"}
        cfg["passes"] = {"mcq": {}, "other_confidence": {"generate": gen}}
    else:
        cfg["passes"] = {"mcq": {}, "self_confidence": {}, "other_confidence": {"generate": gen},
                         "self_gen": {"answers": "confidence", "template": BUILTIN["self_confidence"]["template"],
                                      "generate": gen}}
    return cfg


def pass_run(tmp_path_factory, which: str) -> Path:
    """``results/passes`` (``which="base"``) or ``results/passes-lora`` (``"lora"``), built on first use.
    The base run is finished whole (its own data set too, as export needs); the other only its passes."""
    if which not in _made:
        run = "passes" if which == "base" else "passes-lora"
        wd = copy_inputs(tmp_path_factory.mktemp(run))
        cfg = _config(run, which == "lora")
        path = wd / f"{run}.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        targets = [f"results/{run}/{p}/metadata.json" for p in cfg["passes"]]
        if which == "base":
            targets += ["store", "metadata"]  # a finished run: metadata.json is written beside the store
        res = run_snakemake(wd, "--cores", "2", *targets, configfile=path)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        _made[which] = wd / "results" / run
    return _made[which]
