import os
from pathlib import Path
import re
import sys

from snakemake.exceptions import WorkflowError
from snakemake.resources import Resources

try:
    from layerscope.capture.chain import boundary_path
    from layerscope.config import build_plan, with_location
    from layerscope.errors import LayerScopeError
    from layerscope.store.layout import marker_path
except ImportError as e:
    raise WorkflowError(
        f"the layerscope package is not importable ({e}); install it first: pip install -e ."
    )

try:
    PLAN = build_plan(
        config,
        schema_path=os.path.join(workflow.basedir, "workflow/schemas/config.schema.yaml"),
        base_dir=os.getcwd(),
    )
except LayerScopeError as e:
    # One message naming the key, where it is set and the problem, before any job runs.
    CONFIG_FILES = [str(f) for f in workflow.overwrite_configfiles] or [
        os.path.join(workflow.basedir, "config/config.yaml")
    ]
    raise WorkflowError(with_location(str(e), CONFIG_FILES))

config = PLAN.config
RUN = config["run"]
RESULTS = f"results/{RUN}"
STORE = f"{RESULTS}/activations.zarr"
MANIFEST = f"{RESULTS}/model/manifest.json"
ADAPTER = f"{RESULTS}/model/adapter.json"
DATASET = f"{RESULTS}/dataset"
SETTINGS = f"{RESULTS}/capture_settings.json"


wildcard_constraints:
    part=r"\d+",


def store_of(variant):
    """The store of a variant: the main one, or activations.{variant}.zarr beside it."""
    return STORE if variant == PLAN.main_variant else f"{RESULTS}/activations.{variant}.zarr"


def variant_suffix(variant):
    return "" if variant == PLAN.main_variant else variant


def boundary_key(variant):
    """The name of a variant's boundary among a capture job's inputs and outputs."""
    return f"boundary_{variant}" if variant_suffix(variant) else "boundary"


def capture_outputs(block):
    """Outputs of one block's job: a completion marker per array it captures, in each variant's
    store (inside the array, named by part and position mode), and the residual stream of each
    variant it hands on."""
    markers = [
        str(marker_path(store_of(v), L, s, "{part}", pos))
        for v in PLAN.variants
        for L, s, pos in PLAN.captures(block, v)
    ]
    out = {f"m{i}": m for i, m in enumerate(markers)}
    if block.writes_boundary:
        for v in PLAN.variants:
            out[boundary_key(v)] = boundary_output(RESULTS, block, variant_suffix(v))
    return out


def boundary_output(results, block, variant=""):
    """The boundary a block hands on, temporary where capture.boundaries says so."""
    b = str(boundary_path(results, block.end + 1, "{part}", variant))
    return temp(b) if config["capture"]["boundaries"] == "temp" else b


def capture_inputs(block):
    inputs = {
        "manifest": MANIFEST,
        "adapter": ADAPTER,
        "settings": SETTINGS,
        "ids": f"{DATASET}/token_ids.npy",
        "offsets": f"{DATASET}/offsets.npy",
        # the spans each example records: the rows of span arrays, and where parts begin
        "examples": f"{DATASET}/examples.jsonl",
    }
    if block.reads_boundary:
        # ancient: a re-run of the job below rewrites this file with the same content (it is a
        # function of the model, tokens and settings, all of which are this job's inputs and
        # params too), so only its absence, not its age, should matter here.
        for v in PLAN.variants:
            inputs[boundary_key(v)] = ancient(str(boundary_path(RESULTS, block.start, "{part}", variant_suffix(v))))
    return inputs


def markers_of(variant):
    if variant.startswith("steer-"):
        return steer_markers(variant.removeprefix("steer-"))
    return [
        str(marker_path(store_of(variant), L, s, p, pos))
        for b in PLAN.blocks
        for L, s, pos in PLAN.captures(b, variant)
        for p in range(PLAN.parts)
    ]


def all_markers(wildcards):
    return markers_of(wildcards.get("variant", PLAN.main_variant))


def missing_markers(wildcards):
    """Markers not on disk. Snakemake does not re-create a missing intermediate file when what
    depends on it is up to date; asking for exactly these makes a deleted array re-run its job
    (and keeps the listing of `all` short when nothing is missing)."""
    every = [m for v in PLAN.variants for m in markers_of(v)] + [m for n in PLAN.passes for m in pass_markers(n)]
    return [m for m in every if not os.path.exists(m)]


def variant_pattern():
    """The names of the stores beside the main one: its variants, and steered runs."""
    return "|".join([re.escape(v) for v in PLAN.extra_variants] + [r"steer-[A-Za-z0-9][A-Za-z0-9_.-]*"])


def variant_stores(wildcards=None):
    """The finished stores of the variants beside the main one."""
    return [f"{store_of(v)}/zarr.json" for v in PLAN.extra_variants]


def finished_run(wildcards=None):
    """What a reader of the run (layerscope.Run) needs: metadata.json and every store it describes.
    metadata.json is written beside the stores' finalization, so it alone is not enough."""
    return {"metadata": f"{RESULTS}/metadata.json", "stores": [f"{STORE}/zarr.json", *variant_stores()]}


def missing_boundaries(wildcards):
    """Kept boundaries not on disk, for the same reason: a deleted one is made again."""
    if config["capture"]["boundaries"] != "keep":
        return []
    paths = (
        boundary_path(RESULTS, b.end + 1, p, variant_suffix(v))
        for b in PLAN.blocks
        if b.writes_boundary
        for p in range(PLAN.parts)
        for v in PLAN.variants
    )
    return [str(b) for b in paths if not b.exists()]


def local_files(ref):
    """A local model or adapter directory's files: changed weights re-run what depends on them."""
    if ref is None or ref.kind != "local":
        return []
    return sorted(
        str(p)
        for p in Path(ref.name).rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ref.name).parts)
    )


def source_params(key, name=None):
    """What decides a fetch's result, and nothing else: the reference (the seed only for built-in
    models, the revision and hub cache only for hub ones). ``name``: one of the more adapters."""
    spec = config[key] if name is None else config[key][name]
    if spec is None:
        return None
    ref = PLAN.model if key == "model" else (PLAN.adapter if name is None else PLAN.adapters[name])
    return {
        "id": spec["id"],
        "seed": spec["seed"] if ref.kind == "builtin" else None,
        "revision": spec["revision"] if ref.kind == "hub" else None,
        "hub_cache": config["hub_cache"] if ref.kind == "hub" else None,
    }


def host_cores():
    """Every core Snakemake may use (--cores; inside a cluster job, the cores it was given). A
    cluster executor has no --cores: there the profile sets a rule's threads (set-threads), else
    a job asks for one core."""
    cores = workflow.resource_settings.cores
    return cores if cores and cores != sys.maxsize else 1


def capture_threads():
    """Threads of a capture job: capture.threads, else every core (host_cores)."""
    return config["capture"]["threads"] or host_cores()


def apply_capture_overrides(names):
    """A profile's set-resources and set-threads name rules, but capture rules are named by
    their blocks (capture_L00-07, ...), which change with the model and layers_per_job: what
    is set for `capture` applies to every capture rule, before what is set for its own name."""
    settings = workflow.resource_settings
    group = Resources.from_mapping(settings.overwrite_resources.get("capture", {}))
    threads = settings.overwrite_threads.get("capture")
    for name in names:
        r = workflow.get_rule(name)
        r.resources.update(group)
        r.resources.update(Resources.from_mapping(settings.overwrite_resources.get(name, {})))
        if threads is not None and name not in settings.overwrite_threads:
            r.resources["_cores"] = threads


def steer_store(target):
    return f"{RESULTS}/activations.steer-{target}.zarr"


def steer_outputs(block):
    """A steered block's outputs: its markers in the steered run's store, and its boundary."""
    out = {
        f"m{i}": str(marker_path(steer_store("{target}"), L, s, "{part}", pos))
        for i, (L, s, pos) in enumerate(PLAN.captures(block))
    }
    if block.writes_boundary:
        out["boundary"] = boundary_output(RESULTS, block, "steer-{target}")
    return out


def steer_inputs(block):
    """A steered block reads the normal run's boundary where its chain starts (the block holding the
    steered layer), else the steered boundary below it."""

    def inputs(wildcards):
        t = PLAN.target(wildcards.target)
        ins = capture_inputs(block) | {"vector": f"{RESULTS}/steering/vectors/{t.concept}.npy"}
        ins.pop("boundary", None)
        for v in PLAN.extra_variants:
            ins.pop(f"boundary_{v}", None)
        if block.reads_boundary:
            first = block.start <= t.layer
            ins["boundary"] = ancient(str(boundary_path(RESULTS, block.start, wildcards.part,
                                                        "" if first else f"steer-{t.name}")))
        return ins

    return inputs


def steer_markers(target):
    return [
        str(marker_path(steer_store(target), L, s, p, pos))
        for b in PLAN.steered_blocks(target)
        for L, s, pos in PLAN.captures(b)
        for p in range(PLAN.parts)
    ]


def vector_inputs(wildcards):
    spec = config["steering"]["vectors"][wildcards.concept]
    if "file" in spec:
        return {"file": spec["file"]}
    return finished_run()


def steering_summaries(wildcards=None):
    """Every steered run's summary, and its generations where steering.generate asks for them."""
    out = [f"{RESULTS}/steering/{t.name}/{f}" for t in PLAN.steering for f in ("summary.json", "index.html")]
    if config["steering"]["generate"]["examples"]:
        out += [f"{RESULTS}/steering/{t.name}/generations.jsonl" for t in PLAN.steering]
    return out


def pass_dir(name):
    """A prompted pass's directory: a run of its own inside the run (results/{run}/{pass})."""
    return f"{RESULTS}/{name}"


def pass_store(name):
    return f"{pass_dir(name)}/activations.zarr"


def pass_capture_outputs(name, block):
    """A pass's capture job: its markers in the pass's store, and the boundary it hands on."""
    out = {
        f"m{i}": str(marker_path(pass_store(name), L, s, "{part}", pos))
        for i, (L, s, pos) in enumerate(PLAN.pass_captures(block, name))
    }
    if block.writes_boundary:
        out["boundary"] = boundary_output(pass_dir(name), block)
    return out


def pass_capture_inputs(name, block):
    d = f"{pass_dir(name)}/dataset"
    inputs = {
        "manifest": MANIFEST,
        "adapter": ADAPTER,
        "settings": SETTINGS,
        "ids": f"{d}/token_ids.npy",
        "offsets": f"{d}/offsets.npy",
        "answer_index": f"{d}/answer_index.npy",
        "examples": f"{d}/examples.jsonl",
    }
    if block.reads_boundary:  # ancient: see capture_inputs
        inputs["boundary"] = ancient(str(boundary_path(pass_dir(name), block.start, "{part}")))
    return inputs


def pass_markers(name):
    return [
        str(marker_path(pass_store(name), L, s, p, pos))
        for b in PLAN.blocks
        for L, s, pos in PLAN.pass_captures(b, name)
        for p in range(PLAN.parts)
    ]


def pass_targets(wildcards=None):
    """Every pass's per-question metadata.json (written once its store is finished)."""
    return [f"{pass_dir(n)}/metadata.json" for n in PLAN.passes]


def pass_pattern():
    return "|".join(re.escape(n) for n in PLAN.passes) or "(?!)"


def freeze_definitions():
    """Exempt every object made so far (Snakemake's modules, the rules, the plan: all live until the
    process ends) from garbage collection. The interpreter's last collection walks them all, 0.35 s
    at the end of every snakemake run, dry runs included (a one-layer re-run takes 4 s); frozen,
    they are freed with the process instead, and the collections while the DAG is built skip them."""
    import gc

    gc.freeze()


def end_run():
    """What the end of a run (onsuccess/onerror) leaves to do, done at once.

    Snakemake's job-rate limiter arms a one-second, non-daemon timer after every scheduling round,
    and the process cannot exit before the last one fires: up to a second added to every run (its
    "100ms" timespan parses as 100 minutes, so a shorter one cannot be configured). Nothing is
    scheduled after these handlers, so the timers have nothing left to wake. And what the run made
    is frozen, as the workflow's definitions are (see freeze_definitions)."""
    import gc
    import threading

    for t in threading.enumerate():
        if isinstance(t, threading.Timer):
            t.cancel()
    gc.freeze()
