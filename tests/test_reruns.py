"""What a config change re-runs: every key, changed alone on the finished demo run, dry-run through
the Snakemake API, gives exactly the jobs config/README.md's table promises."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, planned_dependencies, planned_jobs, run_snakemake

DEFAULT = yaml.safe_load((REPO / "config/config.yaml").read_text())
DOWN = ["store", "metadata", "summarize", "dashboard", "all"]
REPORT = ["metadata", "summarize", "dashboard", "all"]  # what re-runs when the store does not change
PAGE = ["summarize", "dashboard", "all"]
CAPTURES = ["capture_L00-01:0", "capture_L00-01:1", "capture_L02-03:0", "capture_L02-03:1"]
UPPER = ["capture_L02-03:0", "capture_L02-03:1"]
SET = ["capture_settings"]  # the shared capture settings: every block reads them
EVERYTHING = ["fetch_model", "fetch_adapter", "prepare_dataset"] + CAPTURES + DOWN

# (key, new value, jobs that must run); the demo: 4 layers, 4 sites, all positions, 2 layers per job, 2 parts.
TABLE = [
    ("run", "other", EVERYTHING + ["capture_settings"]),  # a new results directory
    ("model.id", "builtin:qwen2-tiny", ["fetch_model", "fetch_adapter", "prepare_dataset", "capture_L00-01:0",
                                        "capture_L00-01:1", "capture_L02-02:0", "capture_L02-02:1"] + DOWN),
    ("model.revision", "v2", []),  # only hub models have revisions
    ("dataset.path", "config/datasets/copy.jsonl", ["prepare_dataset"] + CAPTURES + DOWN),
    ("model.seed", 1, EVERYTHING),
    ("model.dtype", "bfloat16", SET + CAPTURES + DOWN),
    ("model.trust_remote_code", True, ["prepare_dataset"] + SET + CAPTURES + DOWN),
    ("adapter", {"id": "builtin:lora"}, ["fetch_adapter"] + CAPTURES + DOWN),
    ("hub_cache", "/nonexistent/hub", []),
    ("adapters", {"ckpt": {"id": "builtin:lora"}}, []),  # no variant names it: not even fetched  # a built-in model does not use the hub cache
    ("dataset.name", "renamed", REPORT),
    ("dataset.format", "jsonl", []),  # what `auto` already read
    ("dataset.default_split", "other", ["prepare_dataset"] + CAPTURES + DOWN),
    ("dataset.max_length", 32, ["prepare_dataset"] + CAPTURES + DOWN),
    ("dataset.add_special_tokens", False, ["prepare_dataset"] + CAPTURES + DOWN),
    ("dataset.add_generation_prompt", True, ["prepare_dataset"] + CAPTURES + DOWN),
    ("capture.layers", [0, 1, 2], DOWN),  # removing a layer: the store drops its arrays
    ("capture.layers", [0, 1, 2, 3], []),  # the same as `all`
    ("capture.sites", ["resid_post", "mlp_act"], DOWN),  # removing sites
    ("capture.positions", "last", CAPTURES + DOWN),
    ("capture.overrides", {"3": {"positions": "last"}}, UPPER + DOWN),
    ("capture.positions", "response", CAPTURES + DOWN),  # a span: only its tokens' rows
    ("capture.overrides", {"3": {"positions": "role:user"}}, UPPER + DOWN),
    ("capture.overrides", {"2": {"sites": ["resid_post"]}}, DOWN),
    ("capture.dtype", "bfloat16", SET + CAPTURES + DOWN),
    ("capture.layers_per_job", 4, ["capture_L00-03:0", "capture_L00-03:1"] + DOWN),
    ("capture.parts", 3, SET + [f"capture_L0{a}-0{a + 1}:{p}" for a in (0, 2) for p in range(3)] + DOWN),
    ("capture.batch_size", 2, SET + CAPTURES + DOWN),
    ("capture.length_window", 1, SET + CAPTURES + DOWN),
    ("capture.padding_side", "left", SET + CAPTURES + DOWN),
    ("capture.variants", ["base"], []),  # what `null` means without an adapter
    ("capture.lora_modules", ["down_proj"], []),  # no LoRA site to expand
    ("steering.vectors", {"c": {"contrast": {"layer": 1, "split_a": "EM", "split_b": "Neutral"}}}, []),  # unused
    ("steering.runs", [], []),
    ("steering.regions", 8, []),  # no steered run to summarise
    ("steering.generate", {"examples": 2}, []),
    ("capture.device", "cpu", []),
    ("capture.threads", 1, []),
    ("capture.boundaries", "temp", []),
    ("store.chunk_mib", 1, SET + CAPTURES + DOWN),
    ("store.shard_mib", 32, SET + CAPTURES + DOWN),
    ("store.compression", "zstd", SET + CAPTURES + DOWN),
    ("store.compression_level", 5, SET + CAPTURES + DOWN),
    ("dashboard.site", "mlp_out", PAGE),
    ("dashboard.top_k", 3, PAGE),
    ("dashboard.context", 2, PAGE),
    ("dashboard.neurons_per_layer", 8, PAGE),
    ("dashboard.heatmap_examples", 4, PAGE),
    ("dashboard.example_columns", 4, PAGE),
    ("dashboard.output_tokens", 3, PAGE),
    ("dashboard.budget_mib", 5, PAGE),
]


def with_change(key: str, value, base: dict = DEFAULT) -> dict:
    """``base`` (default: the demo config) with ``key`` (dotted) set to ``value``."""
    cfg = copy.deepcopy(base)
    *head, last = key.split(".")
    node = cfg
    for k in head:
        node = node.setdefault(k, {})
    node[last] = value
    return cfg


def jobs(demo: Path, cfg: dict, tmp_path: Path) -> list[str]:
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return sorted(f"{rule}:{dict(w)['part']}" if w else rule for rule, w in planned_jobs(demo, configfile=path))


@pytest.mark.parametrize("key,value,expected", TABLE, ids=[f"{k}={v}" for k, v, _ in TABLE])
def test_what_a_change_reruns(demo, tmp_path, key, value, expected):
    if key == "dataset.path":  # the same records in another file
        shutil.copy(demo / DEFAULT["dataset"]["path"], demo / value)
    try:
        assert jobs(demo, with_change(key, value), tmp_path) == sorted(expected)
    finally:
        if key == "dataset.path":
            (demo / value).unlink()


def test_every_key_is_in_the_table():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    keys = set()
    for top, spec in schema["properties"].items():
        sub = spec.get("properties")
        keys |= {f"{top}.{k}" for k in sub} if sub and top != "adapter" else {top}
    from tests.test_passes import PASS_TABLE  # task and passes: re-runs of a run with passes

    tested = {k for k, _, _ in TABLE} | {k for k, _, _ in PASS_TABLE}
    assert keys - tested == set()


def test_a_user_config_gets_the_schema_defaults(demo, tmp_path):
    """--configfile replaces the embedded demo config; what it leaves out takes the documented default."""
    import json

    user = {"run": "mine", "model": {"id": "builtin:llama-tiny"}, "dataset": {"path": "config/datasets/demo.jsonl"},
            "capture": {"layers": [1]}}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(user))
    res = run_snakemake(demo, "--cores", "2", configfile=path)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = json.loads((demo / "results/mine/run_config.json").read_text())["config"]
    assert cfg["capture"]["sites"] == ["resid_post"] and cfg["capture"]["positions"] == "last"  # not the demo's
    assert cfg["dataset"]["max_length"] == 512 and cfg["dataset"]["name"] == "demo"
    assert cfg["capture"]["parts"] == 1 and cfg["capture"]["layers_per_job"] == 8
    shutil.rmtree(demo / "results/mine")
    shutil.rmtree(demo / "logs/mine")


@pytest.fixture
def scratch(demo, tmp_path) -> Path:
    """A copy of the finished demo working directory (results and Snakemake's records), to change."""
    wd = tmp_path / "wd"
    shutil.copytree(demo, wd, copy_function=shutil.copy2, symlinks=True)
    assert planned_jobs(wd) == []
    return wd


def test_a_stale_group_reads_its_boundary(scratch):
    cfg = with_change("capture.overrides", {"3": {"positions": "last"}})
    (scratch / "config/config.yaml").write_text(yaml.safe_dump(cfg))
    res = run_snakemake(scratch, "--cores", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    log = (scratch / "logs/demo/capture/L02-03_part0.log").read_text()
    assert "boundary in results/demo/boundaries/L02_part0.safetensors" in log
    assert "Rule: capture_L00-01" not in res.stderr and "Rule: capture_L02-03" in res.stderr
    assert planned_jobs(scratch) == []
    # the summary computes again only the layers captured again, and equals one computed from scratch
    log = (scratch / "logs/demo/summarize.log").read_text()
    assert "neurons mlp_act: 2 of 4 layers from the earlier summary" in log
    assert "norms resid_post: 2 of 4 layers from the earlier summary" in log
    from layerscope.analysis.summaries import summarize
    from layerscope.packed import pack

    fresh = json.loads(json.dumps(pack(summarize(str(scratch / "results/demo"), **cfg["dashboard"]))))
    assert json.loads((scratch / "results/demo/summaries/summary.json").read_text()) == fresh


def test_metadata_does_not_wait_for_the_store(demo, tmp_path):
    """metadata.json comes from the capture jobs' markers, so it is written beside the store's
    finalization; what reads the run (summarize) waits for both."""
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(with_change("capture.overrides", {"3": {"positions": "last"}})))
    deps = planned_dependencies(demo, configfile=path)
    assert deps["metadata"] == deps["store"] == set(UPPER)
    assert deps["summarize"] == {"store", "metadata"} and deps["dashboard"] == {"summarize"}


def test_deleting_a_boundary_recreates_it(scratch):
    """The part's chain is re-run from the block below the missing boundary (Snakemake re-runs a
    job whose input is missing when it plans, even an ancient one); the other part is untouched."""
    (scratch / "results/demo/boundaries/L02_part1.safetensors").unlink()
    assert sorted(r + (f":{dict(w)['part']}" if w else "") for r, w in planned_jobs(scratch)) == sorted(
        ["capture_L00-01:1", "capture_L02-03:1"] + DOWN)


def test_adding_a_layer_runs_only_new_blocks(workdir, tmp_path):
    cfg = with_change("capture.layers", [0])
    cfg["capture"]["layers_per_job"] = 1
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_snakemake(workdir, "--cores", "2", "store", configfile=path)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg["capture"]["layers"] = [0, 2]
    path.write_text(yaml.safe_dump(cfg))
    got = sorted(f"{r}:{dict(w)['part']}" if w else r for r, w in planned_jobs(workdir, configfile=path))
    assert got == sorted(["capture_L01-01:0", "capture_L01-01:1", "capture_L02-02:0", "capture_L02-02:1"] + DOWN)


def test_weights_changed_in_a_local_directory_rerun_what_depends_on_them(workdir, tmp_path, model_factory):
    """An adapter retrained into the same folder (here: the model's weights rewritten in place)
    must not leave stale activations: the directory's files are inputs of the fetch."""
    local = tmp_path / "my-model"
    shutil.copytree(model_factory("llama-tiny")["path"], local)
    cfg = {"run": "local", "model": {"id": str(local)}, "dataset": {"path": "config/datasets/demo.jsonl"},
           "capture": {"layers": [0]}}
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_snakemake(workdir, "--cores", "2", "store", configfile=path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert planned_jobs(workdir, configfile=path) == [("all", ()), ("dashboard", ()), ("metadata", ()),
                                                       ("summarize", ())]
    from safetensors.torch import load_file, save_file

    w = load_file(local / "model.safetensors")
    w["model.layers.0.mlp.down_proj.weight"] *= 2
    save_file(w, local / "model.safetensors", metadata={"format": "pt"})
    got = {rule for rule, _ in planned_jobs(workdir, configfile=path)}
    assert {"fetch_model", "fetch_adapter", "prepare_dataset", "capture_L00-03", "store"} <= got
