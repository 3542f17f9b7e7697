"""A second finished run on the demo's tokens, made once per test session: another model seed,
bfloat16 storage, mostly last positions, left padding, and data set records that carry some of
seed 004's fields (extra fields do not change the tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.conftest import REPO, copy_inputs, run_snakemake

SEED004_FIELDS = {"question_text", "parsed_answer", "is_correct", "entropy", "options"}
_made: dict[str, Path] = {}


def second_run(tmp_path_factory) -> Path:
    """The run directory of the second run (``results/other``), built on first use."""
    if "other" not in _made:
        wd = copy_inputs(tmp_path_factory.mktemp("other"))
        lines = (REPO / "config/datasets/demo.jsonl").read_text(encoding="utf-8").splitlines()
        records = []
        for i, line in enumerate(lines):
            r = json.loads(line)
            r |= {"question_text": f"question {i}", "parsed_answer": "ABCD"[i % 4], "is_correct": i % 3 == 0,
                  "entropy": 0.25 * i, "options": {"A": "yes", "B": "no"}}
            records.append(r)
        (wd / "config/datasets/fields.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records),
                                                         encoding="utf-8")
        cfg = {"run": "other",
               "model": {"id": "builtin:llama-tiny", "seed": 1, "dtype": "float32"},
               "dataset": {"path": "config/datasets/fields.jsonl", "name": "demo_fields", "max_length": 64},
               "capture": {"layers": [0, 1, 3], "sites": ["resid_post", "mlp_out"], "positions": "last",
                           "overrides": {"1": {"positions": "all"}}, "dtype": "bfloat16", "layers_per_job": 4,
                           "parts": 1, "batch_size": 5, "padding_side": "left"}}
        path = wd / "other.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        res = run_snakemake(wd, "--cores", "2", "store", "metadata", configfile=path)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        _made["other"] = wd / "results/other"
    return _made["other"]
