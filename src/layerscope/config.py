"""Validating the workflow config and turning it into a plan of capture jobs.

All checks that can run before any job does live here, so that a bad config stops the
workflow with one message naming the key and the problem.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match

from layerscope.errors import ConfigError, ModelError
from layerscope.models import Dims, ModelRef, dims_from_config, parse_ref, peek_config

SITES = ("resid_post", "attn_out", "mlp_out", "mlp_act")


def _with_defaults(cls):
    """A validator class that fills in schema defaults while it validates."""
    validate_props = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return validators.extend(cls, {"properties": set_defaults})


_Validator = _with_defaults(Draft202012Validator)


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _message(err) -> str:
    where = _path(err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        key = f"{where}.{extra[0]}" if err.absolute_path else extra[0]
        return f"{key}: unknown key (allowed here: {', '.join(allowed)})"
    if err.validator == "required":
        return f"{where}: {err.message}"
    if err.validator == "enum":
        return f"{where}: {err.instance!r} is not one of {', '.join(map(str, err.validator_value))}"
    if err.validator == "oneOf" and "layers" in where:
        return f"{where}: {err.instance!r} is not 'all' or a list of layer numbers"
    if err.validator == "propertyNames":
        return f"{where}: key {err.instance!r} is not a layer number"
    return f"{where}: {err.message}"


def load_schema(path: str | os.PathLike) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def validate(config: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Validate ``config`` against ``schema``, returning a copy with defaults filled in."""
    cfg = copy.deepcopy(config)
    errors = list(_Validator(schema).iter_errors(cfg))
    if errors:
        raise ConfigError("config error: " + _message(best_match(errors)))
    return cfg


def layer_error(layer: int, num_layers: int, model: str, key: str = "capture.layers") -> ConfigError:
    return ConfigError(f"config error: {key}: layer {layer} is out of range for model {model} with "
                       f"{num_layers} layers (valid: 0..{num_layers - 1}, or -{num_layers}..-1 from the end)")


def resolve_layers(layers: Any, num_layers: int | None, model: str) -> list[int] | None:
    """Resolve ``all`` and negative layer numbers; None when the model's depth is not known yet."""
    if num_layers is None:
        if layers == "all" or any(x < 0 for x in layers):
            return None
        return sorted(set(layers))
    if layers == "all":
        return list(range(num_layers))
    out = set()
    for x in layers:
        if not -num_layers <= x < num_layers:
            raise layer_error(x, num_layers, model)
        out.add(x % num_layers)
    return sorted(out)


@dataclass
class Plan:
    """The resolved config: what each capture job captures."""

    config: dict[str, Any]
    base_dir: Path
    model: ModelRef
    adapter: ModelRef | None
    dims: Dims | None
    layers: list[int]
    settings: dict[int, dict[str, Any]]  # layer -> {"sites": [...], "positions": ...}

    @property
    def groups(self) -> dict[str, list[int]]:
        """Capture job groups, named by their first and last layer, of ``layers_per_job`` layers each."""
        n = self.config["capture"]["layers_per_job"]
        out = {}
        for i in range(0, len(self.layers), n):
            g = self.layers[i:i + n]
            out[f"L{g[0]:02d}-{g[-1]:02d}"] = g
        return out

    @property
    def parts(self) -> int:
        return self.config["capture"]["parts"]

    def arrays(self, layers: list[int] | None = None) -> list[tuple[int, str]]:
        """(layer, site) pairs captured for ``layers`` (default: all planned layers)."""
        return [(L, s) for L in (self.layers if layers is None else layers) for s in self.settings[L]["sites"]]

    def job_params(self, group: str) -> dict[str, Any]:
        """Everything that decides the bytes a capture job writes; Snakemake re-runs the job when it changes."""
        c = self.config["capture"]
        return {
            "layers": {str(L): self.settings[L] for L in self.groups[group]},
            "dtype": c["dtype"], "batch_size": c["batch_size"], "padding_side": c["padding_side"],
            "parts": c["parts"], "model_dtype": self.config["model"]["dtype"],
            "trust_remote_code": self.config["model"]["trust_remote_code"], "store": self.config["store"],
        }


def build_plan(config: dict[str, Any], schema_path: str | os.PathLike, base_dir: str | os.PathLike = ".",
               allow_download: bool = True) -> Plan:
    """Validate ``config`` and resolve models, layers and per-layer settings; raise ConfigError if anything is off."""
    base = Path(base_dir).resolve()
    cfg = validate(config, load_schema(schema_path))
    data = Path(cfg["dataset"]["path"])
    data = data if data.is_absolute() else base / data
    if not data.is_file():
        raise ConfigError(f"config error: dataset.path: file {data} does not exist")
    cfg["dataset"]["path"] = str(data)
    fmt = cfg["dataset"]["format"]
    if fmt == "auto" and data.suffix.lower() not in (".jsonl", ".json", ".ndjson", ".csv"):
        raise ConfigError(f"config error: dataset.format: cannot tell the format of {data.name} from its suffix; "
                          "set dataset.format to jsonl or csv")
    if not cfg["dataset"]["name"]:
        cfg["dataset"]["name"] = data.stem
    try:
        model = parse_ref(cfg["model"], base)
        adapter = parse_ref(cfg["adapter"], base) if cfg["adapter"] else None
        for key, ref in (("model", model), ("adapter", adapter)):
            if ref is not None and ref.kind == "local" and not Path(ref.name).is_dir():
                raise ConfigError(f"config error: {key}.id: local directory {ref.name} does not exist")
        if adapter is not None and adapter.kind == "builtin" and adapter.name != "lora":
            raise ConfigError(f"config error: adapter.id: unknown built-in adapter 'builtin:{adapter.name}' "
                              "(choose builtin:lora)")
        raw = peek_config(model, cfg["hub_cache"], allow_download=allow_download)
        dims = dims_from_config(raw) if raw is not None else None
    except ModelError as e:
        raise ConfigError(f"config error: {e}") from e
    cap = cfg["capture"]
    layers = resolve_layers(cap["layers"], dims.num_layers if dims else None, model.label)
    if layers is None:
        raise ConfigError(
            f"config error: capture.layers: {cap['layers']!r} needs the number of layers of {model.label}, whose "
            "config.json is not available offline; list non-negative layer numbers, or fetch the model first "
            "(snakemake --cores 1 fetch_model) while online")
    settings = {L: {"sites": list(cap["sites"]), "positions": cap["positions"]} for L in layers}
    for key, over in cap["overrides"].items():
        L = int(key)
        if dims is not None:
            if not -dims.num_layers <= L < dims.num_layers:
                raise layer_error(L, dims.num_layers, model.label, key=f"capture.overrides.{key}")
            L %= dims.num_layers
        if L not in settings:
            raise ConfigError(f"config error: capture.overrides.{key}: layer {L} is not in capture.layers")
        settings[L].update(copy.deepcopy(over))
    # Key order must not matter: Snakemake compares params by their text, so a config file
    # rewritten with its keys in another order would otherwise re-run every job.
    cfg = json.loads(dumps_stable(cfg))
    settings = {L: json.loads(dumps_stable(v)) for L, v in settings.items()}
    return Plan(cfg, base, model, adapter, dims, layers, settings)


def check_layers_against(plan_layers: list[int], num_layers: int, model: str) -> None:
    """After a download: fail with the same message as at planning time if a layer is out of range."""
    for L in plan_layers:
        if not 0 <= L < num_layers:
            raise layer_error(L, num_layers, model)


def dumps_stable(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
