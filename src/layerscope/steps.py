"""The workflow's steps as plain functions; ``workflow/scripts/`` only pass the snakemake object's fields in.

``run_step`` turns a LayerScopeError into one clear message in the job's log and on stderr,
and a non-zero exit, instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from layerscope.errors import LayerScopeError
from layerscope.fileio import read_json, write_json
from layerscope.logs import setup_logging

log = logging.getLogger("layerscope.steps")


def run_step(log_path: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    setup_logging(log_path)
    try:
        return fn(**kwargs)
    except LayerScopeError as e:
        log.error("%s", e)
        sys.exit(1)


def fetch_model(model: dict, adapter: dict | None, hub_cache: str | None, layers: list[int], weights_dir: str,
                adapter_dir: str, manifest_out: str) -> dict:
    """Resolve the model (and adapter), check the planned layers against it, write manifest.json."""
    from layerscope.config import check_layers_against
    from layerscope.models import fetch, parse_ref

    ref = parse_ref(model, os.getcwd())
    log.info("fetching model %s", ref.label)
    m = fetch(ref, weights_dir, hub_cache, what="model")
    check_layers_against(layers, m["num_layers"], m["id"])
    a = None
    if adapter:
        aref = parse_ref(adapter, os.getcwd())
        log.info("fetching adapter %s", aref.label)
        a = fetch(aref, adapter_dir, hub_cache, what="adapter", base_dir=m["path"])
    manifest = {"model": m, "adapter": a}
    write_json(manifest_out, manifest)
    log.info("model %s: %s, %d layers, hidden %d, files %d", m["id"], m["architecture"], m["num_layers"],
             m["hidden_size"], len(m["files"]))
    return manifest


def prepare_dataset(manifest: str, dataset: dict, out_dir: str, trust_remote_code: bool = False) -> dict:
    from layerscope.dataset import prepare
    from layerscope.models import load_tokenizer

    tok = load_tokenizer(read_json(manifest), trust_remote_code)
    return prepare(dataset["path"], tok, out_dir, fmt=dataset["format"], default_split=dataset["default_split"],
                   max_length=dataset["max_length"], add_special_tokens=dataset["add_special_tokens"])


def capture(manifest: str, dataset_dir: str, store: str, params: dict, part: int, device: str, group: str) -> dict:
    from layerscope.capture import run_capture

    return run_capture(manifest, dataset_dir, store, params, part, device=device, group=group)


def store(store: str, arrays: list, parts: int, dataset_dir: str, run: str) -> None:
    from layerscope import __version__
    from layerscope.dataset import load_tokens
    from layerscope.store import finalize

    ids, offsets = load_tokens(dataset_dir)
    finalize(store, [tuple(a) for a in arrays], parts, ids, offsets, {"run": run, "version": __version__})
    log.info("store %s finalized: %d arrays x %d parts", store, len(arrays), parts)


def metadata(config: dict, manifest: str, examples: str, store: str, metadata_out: str, run_config_out: str) -> None:
    from layerscope.metadata import write_metadata

    write_metadata(config, manifest, examples, store, metadata_out, run_config_out)


def summarize(run_dir: str, dashboard: dict, out: str, trust_remote_code: bool = False) -> None:
    from layerscope.summaries import summarize as _summarize

    write_json(out, _summarize(run_dir, **dashboard, trust_remote_code=trust_remote_code), indent=None)


def dashboard(summary: str, out: str) -> None:
    from layerscope.dashboard import write_dashboard

    write_dashboard(read_json(summary), out)
    log.info("dashboard written to %s (%d bytes)", out, Path(out).stat().st_size)
