"""Run-level metadata: ``metadata.json`` (the fields of the older per-split guides, and more) and ``run_config.json``."""

from __future__ import annotations

import datetime as dt
from typing import Any

from layerscope import __version__
from layerscope.data.dataset import load_examples
from layerscope.fileio import write_json


def build_metadata(config: dict[str, Any], manifest: dict[str, Any], examples: list[dict[str, Any]],
                   arrays: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Everything a reader needs to interpret the store, without opening it."""
    m, a, cap = manifest["model"], manifest.get("adapter"), config["capture"]
    splits: dict[str, dict[str, int]] = {}
    for ex in examples:
        s = splits.setdefault(ex["split"], {"examples": 0, "tokens": 0, "truncated": 0})
        s["examples"] += 1
        s["tokens"] += ex["n_tokens"]
        s["truncated"] += int(ex["truncated"])
    layers = sorted({v["layer"] for v in arrays.values()})
    positions = sorted({v["positions"] for v in arrays.values()})
    shard_rows = sorted({v["layout"]["shard_rows"] for v in arrays.values()})
    return {
        # the fields of the per-split metadata.json that existing loaders read
        "model_name": m["id"],
        "dataset_name": config["dataset"]["name"],
        "split": list(splits) if len(splits) > 1 else next(iter(splits)),
        "load_in_4bit": False,
        "total_examples": len(examples),
        "shard_size": shard_rows[0] if len(shard_rows) == 1 else shard_rows,
        "batch_size": cap["batch_size"],
        "hidden_dim": m["hidden_size"],
        "num_layers": m["num_layers"],
        # and what they lacked
        "model_revision": m.get("revision"),
        "model_source": m["source"],
        "model_seed": m.get("seed"),
        "architecture": m["architecture"],
        "intermediate_dim": m["intermediate_size"],
        "model_dtype": config["model"]["dtype"],
        "adapter": None if not a else {"name": a["id"], "revision": a.get("revision"), "source": a["source"],
                                       "peft_type": a.get("peft_type"), "r": a.get("r"),
                                       "target_modules": a.get("target_modules")},
        "layers": layers,
        "sites": sorted({v["site"] for v in arrays.values()}),
        "positions": positions[0] if len(positions) == 1 else positions,
        "dtype": cap["dtype"],
        "arrays": arrays,
        "splits": splits,
        "total_tokens": sum(s["tokens"] for s in splits.values()),
        "max_length": config["dataset"]["max_length"],
        "padding_side": cap["padding_side"],
        "parts": cap["parts"],
        "layers_per_job": cap["layers_per_job"],
        "store": "activations.zarr",
        # which forward pass each store holds: the main one, then e.g. the base model beside an adapter
        "variants": {v: "activations.zarr" if i == 0 else f"activations.{v}.zarr"
                     for i, v in enumerate(cap.get("variants") or ["adapter" if a else "base"])},
        "layerscope_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_metadata(config: dict[str, Any], manifest: dict[str, Any], examples_path: str,
                   arrays: dict[str, dict[str, Any]], metadata_out: str, run_config_out: str) -> dict[str, Any]:
    """Write ``metadata.json`` and ``run_config.json``; ``arrays``: each array's record
    (store.layout.array_records)."""
    meta = build_metadata(config, manifest, load_examples(examples_path), arrays)
    write_json(run_config_out, {"config": config, "manifest": {k: {kk: vv for kk, vv in v.items() if kk != "files"}
                                                               if isinstance(v, dict) else v
                                                               for k, v in manifest.items()},
                                "layerscope_version": __version__})
    write_json(metadata_out, meta)
    return meta
