"""The workflow's steps as plain functions; ``workflow/scripts/`` only pass the snakemake object's fields in.

``run_step`` turns a LayerScopeError into one clear message in the job's log and on stderr,
and a non-zero exit, instead of a traceback. Steps that load a model are marked ``@warm``: they
run in a process forked from the warm worker (worker.py), which has imported torch already. The
other steps (``@warm(start=False)``) run there too when a worker is up, which spares them importing
transformers, zarr and numpy (a third to a half of a short step's process), but never start one:
a step that needs no torch must not wait for its import.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from layerscope import worker
from layerscope.errors import LayerScopeError
from layerscope.fileio import read_json, write_json
from layerscope.logs import setup_logging
from layerscope.watchdog import exit_with_parent
from layerscope.worker import warm

log = logging.getLogger("layerscope.steps")

# What the warm worker imports before it forks a step: what the model steps import, and the
# modeling code of the architectures LayerScope is tested on (a model of another architecture
# imports its own in the step, as it would anyway); "module:function" is called once there too.
WARM_IMPORTS = [
    "torch", "numpy", "zarr", "zarr.storage", "safetensors.torch", "tokenizers", "transformers",
    "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto", "peft",
    *(f"transformers.models.{m}.modeling_{m}" for m in ("llama", "qwen2", "gpt2", "opt", "mixtral", "mistral")),
    "layerscope.steps", "layerscope.capture.run", "layerscope.store.layout", "layerscope.models.builtin",
    "layerscope.steering.generate", "layerscope.data.metadata", "layerscope.analysis.summaries", "layerscope.web.page",
    "layerscope.models.loading:preload",
]


def run_step(log_path: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Run one step with its log: a LayerScopeError becomes one clear message and exit 1; any other
    error is logged with its traceback (so the log says what happened) and exits 1 too. The step
    stops, cleaning up, if the snakemake that started it dies (see watchdog.py). A ``@warm`` step
    runs in the warm worker where it can (then this process exits with its status), else here."""
    exit_with_parent()
    note, level = None, logging.INFO
    if worker.wanted(fn, kwargs):
        try:
            code = worker.run(log_path, fn, kwargs, _run_here, WARM_IMPORTS)
        except worker.Unavailable as e:
            note = f"running in the job's own process, not in the warm worker: {e}"
            level = logging.WARNING if e.warn else logging.INFO
        else:
            worker.exit_like_python(code)
    starting = worker.prestart(WARM_IMPORTS) if worker.prestarts(fn) else None
    try:
        return _run_here(log_path, fn, kwargs, note, level)
    finally:
        if starting is not None:
            starting.join()


def _run_here(log_path: str, fn: Callable[..., Any], kwargs: dict, note: str | None = None,
              level: int = logging.INFO) -> Any:
    """The step in this process (the job's own, or the warm worker's child for it)."""
    setup_logging(log_path)
    if note:
        log.log(level, "%s", note)
    try:
        return fn(**kwargs)
    except LayerScopeError as e:
        log.error("%s", e)
        sys.exit(1)
    except Exception:
        log.exception("unexpected error")
        sys.exit(1)


def _builtin(*specs: dict | None) -> bool:
    """Whether any of these model/adapter specs is a built-in, which is generated with torch."""
    return any(str((s or {}).get("id", "")).startswith("builtin:") for s in specs)


# A model from a directory or the hub is fetched without torch, and a server for the model steps
# after it starts meanwhile (so does tokenizing, which follows it or a change of the data set).
@warm(when=lambda kw: _builtin(kw.get("model")), prestart=True)
def fetch_model(model: dict, hub_cache: str | None, weights_dir: str, manifest_out: str) -> dict:
    """Resolve the model (built-in, local directory or hub snapshot) and write its manifest."""
    from layerscope.models.loading import fetch, parse_ref

    ref = parse_ref(model, os.getcwd())
    log.info("fetching model %s", ref.label)
    m = fetch(ref, weights_dir, hub_cache, what="model")
    write_json(manifest_out, {"model": m})
    log.info("model %s: %s, %d layers, hidden %d, files %d", m["id"], m["architecture"], m["num_layers"],
             m["hidden_size"], len(m["files"]))
    return m


@warm(when=lambda kw: _builtin(kw.get("adapter"), *(kw.get("adapters") or {}).values()))
def fetch_adapter(adapter: dict | None, model_manifest: str, hub_cache: str | None, adapter_dir: str,
                  manifest_out: str, adapters: dict | None = None) -> dict | None:
    """Resolve the adapter, if any, and the more adapters that are variants beside it; write their
    manifest (``{"adapter": null}`` without one)."""
    from layerscope.models.loading import fetch, parse_ref

    a = None
    base_dir = read_json(model_manifest)["model"]["path"]
    if adapter:
        aref = parse_ref(adapter, os.getcwd())
        log.info("fetching adapter %s", aref.label)
        a = fetch(aref, adapter_dir, hub_cache, what="adapter", base_dir=base_dir)
    more = {}
    for name, spec in (adapters or {}).items():
        ref = parse_ref(spec, os.getcwd())
        log.info("fetching adapter %s (variant %s)", ref.label, name)
        more[name] = fetch(ref, Path(adapter_dir).with_name("adapters") / name, spec.get("hub_cache"),
                           what="adapter", base_dir=base_dir)
    write_json(manifest_out, {"adapter": a, **({"adapters": more} if more else {})})
    return a


def write_settings(settings: dict, out: str) -> None:
    """The capture settings every capture job reads (see config.Plan.capture_settings)."""
    write_json(out, settings)
    log.info("capture settings written to %s", out)


def load_manifest(model_manifest: str, adapter_manifest: str | None = None) -> dict:
    """The model and adapter manifests as one dict ``{"model": ..., "adapter": ... or None}``."""
    return {"adapter": None, **read_json(model_manifest), **(read_json(adapter_manifest) if adapter_manifest else {})}


@warm(start=False, prestart=True)
def prepare_dataset(manifest: str, dataset: dict, out_dir: str, trust_remote_code: bool = False) -> dict:
    from layerscope.data.dataset import prepare
    from layerscope.models.loading import load_tokenizer

    tok = load_tokenizer(load_manifest(manifest), trust_remote_code)
    return prepare(dataset["path"], tok, out_dir, fmt=dataset["format"], default_split=dataset["default_split"],
                   max_length=dataset["max_length"], add_special_tokens=dataset["add_special_tokens"],
                   add_generation_prompt=dataset.get("add_generation_prompt", False))


@warm(start=False)
def prepare_pass(manifest: str, task: dict, spec: dict, out_dir: str, trust_remote_code: bool = False) -> dict:
    """Render and tokenize the task's questions for one prompted pass (passes/prompts.py)."""
    from layerscope.models.loading import load_tokenizer
    from layerscope.passes.prompts import prepare_pass as _prepare

    return _prepare(task, spec, load_tokenizer(load_manifest(manifest), trust_remote_code), out_dir)


@warm
def answer_pass(manifest: str, adapter: str, prompts_dir: str, out_dir: str, answers_out: str, spec: dict,
                batch_size: int, device: str, dtype: str, trust_remote_code: bool) -> None:
    """A pass's answers (and replies) per question, and its data set for capture (passes/answers.py)."""
    from layerscope.capture.gpus import assign

    device = assign(device)
    from layerscope.passes.answers import answer_pass as _answer

    _answer(load_manifest(manifest, adapter), prompts_dir, out_dir, answers_out, spec, batch_size, device, dtype,
            trust_remote_code)


@warm(start=False)
def pass_metadata(config: dict, manifest: str, adapter: str, examples: str, store: str, markers: list[str],
                  answers: str, metadata_out: str, run_metadata_out: str, run_config_out: str) -> None:
    """A pass's per-question ``metadata.json`` (seed 004's list), once its store is finished, and
    the run-level metadata of its store beside it."""
    from layerscope.data.metadata import write_metadata
    from layerscope.store.layout import array_records

    write_metadata(config, load_manifest(manifest, adapter), examples, array_records(store, markers),
                   run_metadata_out, run_config_out)
    write_json(metadata_out, read_json(answers))


@warm
def capture(manifest: str, adapter: str, dataset_dir: str, store: str, params: dict, part: int, markers: list[str],
            device: str, group: str, threads: int, boundary_in: str | None = None,
            boundary_out: str | None = None, variant_boundaries: dict | None = None, steer: dict | None = None,
            vector: str | None = None) -> dict:
    """One capture job; what it captures, and into which variant's store, is read from its
    completion markers' paths (``activations.zarr`` is the main store, ``activations.base.zarr``
    the base variant's); ``variant_boundaries``: variant -> (boundary in, boundary out)."""
    from layerscope.capture.gpus import assign

    device = assign(device)  # before torch starts CUDA: a job on a multi-GPU machine gets a GPU of its own
    import torch

    from layerscope.capture.run import run_capture
    from layerscope.store.layout import parse_marker

    torch.set_num_threads(max(1, threads))
    main_store = Path(store).resolve()
    captures: list = []
    variants: dict[str, dict] = {name: {"store_root": None, "captures": [], "boundary_in": b_in, "boundary_out": b_out}
                                 for name, (b_in, b_out) in (variant_boundaries or {}).items()}
    for m in markers:
        root = Path(m).parents[3]
        if root.resolve() == main_store:
            captures.append(parse_marker(m))
            continue
        name = root.name.removeprefix("activations.").removesuffix(".zarr")
        v = variants.setdefault(name, {"store_root": None, "captures": [], "boundary_in": None, "boundary_out": None})
        v["store_root"] = str(root)
        v["captures"].append(parse_marker(m))
    for name, v in variants.items():
        if v["store_root"] is None:  # a variant that captures nothing in this block still relays its stream
            v["store_root"] = str(main_store.with_name(f"activations.{name}.zarr"))
    if steer is not None:  # a steered run: the concept's vector (its row for the layer, if one per layer)
        import numpy as np

        from layerscope.steering.vectors import vector_at

        steer = {**steer, "vector": vector_at(np.load(vector, allow_pickle=False), steer["layer"])}
    return run_capture(load_manifest(manifest, adapter), dataset_dir, store, params, part, captures, device=device,
                       boundary_in=boundary_in, boundary_out=boundary_out, group=group, variants=variants or None,
                       steer=steer)


@warm(start=False)
def steering_vector(spec: dict, base_dir: str, run_dir: str, num_layers: int, hidden: int, out: str,
                    info_out: str) -> None:
    """A concept's vector, from its file or the contrast of two splits, with its provenance."""
    import io

    import numpy as np

    from layerscope.steering.vectors import make_vector

    from layerscope.fileio import atomic_write_bytes

    vec, info = make_vector(spec, base_dir, run_dir, num_layers, hidden)
    buf = io.BytesIO()
    np.save(buf, vec, allow_pickle=False)
    atomic_write_bytes(out, buf.getvalue())
    write_json(info_out, info)
    log.info("steering vector %s: %s, shape %s", Path(out).stem, info["source"], info["shape"])


@warm
def steering_generate(manifest: str, adapter: str, dataset_dir: str, target: dict, vector: str, examples: int,
                      max_new_tokens: int, device: str, dtype: str, trust_remote_code: bool, out: str) -> None:
    """Greedy continuations of the first examples, normal and steered (JSON lines)."""
    import json

    import numpy as np

    from layerscope.fileio import atomic_write_text
    from layerscope.steering.generate import generate
    from layerscope.steering.vectors import vector_at

    vec = vector_at(np.load(vector, allow_pickle=False), target["layer"])
    rows = generate(load_manifest(manifest, adapter), dataset_dir, target, vec, examples, max_new_tokens, device,
                    dtype, trust_remote_code)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@warm(start=False)
def steering_page(run_dir: str, summary: str, out: str, examples: int) -> None:
    """A steered run's page (web/steering_page.py)."""
    from layerscope.analysis.steering import page_data
    from layerscope.web.steering_page import write_page

    size = write_page(page_data(run_dir, read_json(summary), examples), out)
    log.info("steering page written to %s (%d bytes)", out, size)


@warm(start=False)
def steering_summary(run_dir: str, target: dict, vector: str, regions: int, out: str) -> None:
    import numpy as np

    from layerscope.analysis.steering import summarize as _summarize

    s = _summarize(run_dir, target, np.load(vector, allow_pickle=False), regions)
    write_json(out, s)
    log.info("steered run %s: peak layer %s, total intensity %.4g", target["name"], s["peak_layer"],
             s["total_intensity"])


@warm(start=False)
def store(store: str, arrays: list, parts: int, dataset_dir: str, run: str, variant: str | None = None) -> None:
    from layerscope import __version__
    from layerscope.data.dataset import load_examples, load_tokens
    from layerscope.store.layout import finalize

    ids, offsets = load_tokens(dataset_dir)
    attrs = {"run": run, "version": __version__} | ({"variant": variant} if variant else {})
    finalize(store, [tuple(a) for a in arrays], parts, ids, offsets, attrs,
             examples=load_examples(Path(dataset_dir) / "examples.jsonl"))
    log.info("store %s finalized: %d arrays x %d parts", store, len(arrays), parts)


@warm(start=False)
def metadata(config: dict, manifest: str, adapter: str, examples: str, store: str, markers: list[str],
             metadata_out: str, run_config_out: str) -> None:
    """The run's ``metadata.json``, from the capture jobs' markers: written while the store is
    finalized, not after it."""
    from layerscope.data.metadata import write_metadata
    from layerscope.store.layout import array_records

    write_metadata(config, load_manifest(manifest, adapter), examples, array_records(store, markers),
                   metadata_out, run_config_out)


@warm(start=False)
def summarize(run_dir: str, dashboard: dict, out: str, trust_remote_code: bool = False, threads: int = 1) -> None:
    from layerscope.analysis.summaries import summarize as _summarize
    from layerscope.packed import pack

    # Per-layer results beside the summary: a re-run after one layer was captured again redoes only that layer.
    summary = _summarize(run_dir, **dashboard, trust_remote_code=trust_remote_code, workers=threads,
                         cache_dir=str(Path(out).parent / "layers"))
    write_json(out, pack(summary), indent=None)


@warm(start=False)
def dashboard(summary: str, out: str) -> None:
    from layerscope.web.page import write_dashboard

    size = write_dashboard(read_json(summary), out)
    log.info("dashboard written to %s (%d bytes)", out, size)
