"""Validating the workflow config and turning it into a plan of capture jobs.

All checks that can run before any job does live here, so that a bad config stops the
workflow with one message naming the key and the problem.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match

from layerscope.errors import ConfigError, ModelError
from layerscope.models.adapters import LORA_SITES, matches, split_site
from layerscope.models.architectures import Widths, check_capture
from layerscope.models.loading import Dims, ModelRef, dims_from_config, parse_ref, peek_config
from layerscope.steering.targets import Target, targets

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
    if err.validator == "pattern" and where.endswith("positions"):
        return f"{where}: {err.instance!r} is not one of last, all, answer, prompt, response, role:NAME"
    if err.validator == "propertyNames":
        return f"{where}: key {err.instance!r} is not a layer number"
    return f"{where}: {err.message}"


def load_schema(path: str | os.PathLike) -> dict[str, Any]:
    # libyaml where PyYAML has it: every snakemake start and plan reads this file (5x faster)
    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


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


def resolve_layers(layers: Any, num_layers: int, model: str) -> list[int]:
    """Resolve ``all`` and negative layer numbers against the model's depth."""
    if layers == "all":
        return list(range(num_layers))
    out = set()
    for x in layers:
        if not -num_layers <= x < num_layers:
            raise layer_error(x, num_layers, model)
        out.add(x % num_layers)
    return sorted(out)


@dataclass(frozen=True)
class Block:
    """One capture job's share of the model: consecutive layers ``start..end`` (a fixed block of
    ``layers_per_job`` layers), the captured layers among them, and the residual-stream boundaries
    it reads (entering ``start``) and writes (entering ``end + 1``)."""

    start: int
    end: int
    layers: tuple[int, ...]
    reads_boundary: bool
    writes_boundary: bool

    @property
    def name(self) -> str:
        return f"L{self.start:02d}-{self.end:02d}"

    @property
    def stop(self) -> int:
        """The last layer the job runs: its end where it hands the stream on, else its top captured layer."""
        return self.end if self.writes_boundary or not self.layers else max(self.layers)


@dataclass
class Plan:
    """The resolved config: what each capture job captures."""

    config: dict[str, Any]
    base_dir: Path
    model: ModelRef
    adapter: ModelRef | None
    dims: Dims
    layers: list[int]
    settings: dict[int, dict[str, Any]]  # layer -> {"sites": [...], "positions": ...}
    lora: dict[int, dict[str, list[int]]] | None = None  # the adapter's modules, where LoRA sites need them
    steering: list[Target] = field(default_factory=list)
    adapters: dict[str, ModelRef] = field(default_factory=dict)  # more adapters: variants beside the main one
    # where LoRA sites are planned: each more adapter's own modules, and its sites per layer
    # (the config's sites with lora_a/lora_delta expanded to that adapter's modules)
    variant_lora: dict[str, dict[int, dict[str, list[int]]]] = field(default_factory=dict)
    variant_sites: dict[str, dict[int, list[str]]] = field(default_factory=dict)
    passes: dict[str, dict[str, Any]] = field(default_factory=dict)  # prompted passes, resolved (passes/prompts.py)

    def pass_captures(self, block: Block, name: str) -> list[tuple[int, str, str]]:
        """(layer, site, positions) of every array a block's job writes into a pass's store: the
        run's, at the pass's own positions where it names them."""
        pos = self.passes[name].get("positions")
        return [(L, s, pos or p) for L, s, p in self.captures(block)]

    def target(self, name: str) -> Target:
        return next(t for t in self.steering if t.name == name)

    def steered_blocks(self, name: str) -> list[Block]:
        """The blocks a steered run re-runs: from the one holding its layer up."""
        layer = self.target(name).layer
        return [b for b in self.blocks if b.end >= layer]

    @property
    def main_variant(self) -> str:
        """What the main store (activations.zarr) holds: the adapter's model, or the model alone."""
        return "adapter" if self.adapter is not None else "base"

    @property
    def variants(self) -> list[str]:
        """Every variant captured, the main one first."""
        return self.config["capture"]["variants"]

    @property
    def extra_variants(self) -> list[str]:
        return self.variants[1:]

    @property
    def widths(self) -> Widths:
        return Widths(self.dims.hidden_size, self.dims.intermediate_size, self.lora or {})

    def variant_widths(self, variant: str | None = None) -> Widths:
        """Widths of a variant's arrays: a more adapter's LoRA sites have its own ranks."""
        if variant in self.variant_lora:
            return Widths(self.dims.hidden_size, self.dims.intermediate_size, self.variant_lora[variant])
        return self.widths

    @property
    def blocks(self) -> list[Block]:
        """The chain of capture jobs, bottom up.

        Blocks are fixed ranges of ``layers_per_job`` model layers ([0, n), [n, 2n), ...), so
        adding or removing a captured layer never regroups the others. Every block from the
        bottom up to the one holding the highest captured layer is a job, capturing or not:
        each hands the residual stream entering the next block to the job above, and every
        block but the model's last writes that boundary, so the chain can grow without
        re-running anything below.
        """
        n, total = self.config["capture"]["layers_per_job"], self.dims.num_layers
        top = max(self.layers) // n
        out = []
        for k in range(top + 1):
            start, end = k * n, min((k + 1) * n, total) - 1
            out.append(Block(start, end, tuple(L for L in self.layers if start <= L <= end), start > 0,
                             end < total - 1))
        return out

    @property
    def parts(self) -> int:
        return self.config["capture"]["parts"]

    def arrays(self, layers: list[int] | None = None) -> list[tuple[int, str]]:
        """(layer, site) pairs captured for ``layers`` (default: all planned layers)."""
        return [(L, s) for L in (self.layers if layers is None else layers) for s in self.settings[L]["sites"]]

    def captures(self, block: Block, variant: str | None = None) -> list[tuple[int, str, str]]:
        """(layer, site, positions) of every array a block's job writes into ``variant``'s store
        (default: the main one); a base variant beside an adapter has no LoRA sites, a more
        adapter's variant the LoRA sites of its own adapter."""
        if variant in self.variant_sites:
            sites = self.variant_sites[variant]
            return [(L, s, self.settings[L]["positions"]) for L in block.layers for s in sites[L]]
        lora_ok = variant in (None, self.main_variant) or variant.startswith("steer-")  # steered: the main model
        return [(L, s, self.settings[L]["positions"]) for L in block.layers for s in self.settings[L]["sites"]
                if lora_ok or split_site(s)[0] not in LORA_SITES]

    def recorded_config(self) -> dict[str, Any]:
        """The config as ``run_config.json`` records it: everything that decides the data, without the
        settings that only say where and how jobs run, or how the page looks (those re-run nothing
        upstream of them, so they must not make the metadata stale either)."""
        cfg = copy.deepcopy(self.config)
        cfg["capture"]["layers"] = self.layers  # `all` and the list of every layer are the same data
        for key in ("device", "threads", "boundaries"):
            del cfg["capture"][key]
        del cfg["dashboard"]
        del cfg["steering"]  # steered runs record their own provenance; they change nothing of the normal run
        del cfg["task"], cfg["passes"]  # passes have their own stores and metadata
        cfg["adapters"] = {n: a for n, a in cfg["adapters"].items() if n in self.adapters}  # unused ones change nothing
        if self.lora is None:  # without LoRA sites the module choice changes nothing
            del cfg["capture"]["lora_modules"]
        if self.model.kind != "hub" and (self.adapter is None or self.adapter.kind != "hub"):
            del cfg["hub_cache"]
        for key, ref in (("model", self.model), ("adapter", self.adapter)):
            if ref is not None:  # a revision means something only on the hub, a seed only for built-ins
                cfg[key] = {k: v for k, v in cfg[key].items() if not (k == "revision" and ref.kind != "hub"
                                                                       or k == "seed" and ref.kind != "builtin")}
        return cfg

    def pass_config(self, name: str) -> dict[str, Any]:
        """What a pass's ``run_config.json`` records: the run's recorded config with the task and
        the pass in place of the data set."""
        cfg = self.recorded_config()
        task, spec = self.config["task"], self.passes[name]
        cfg["dataset"] = {"name": f"{Path(task['path']).stem}.{name}", "path": task["path"],
                          "max_length": task["max_length"] + spec["generate"]["max_new_tokens"]}
        cfg["task"], cfg["pass"] = task, spec
        return cfg

    def capture_settings(self) -> dict[str, Any]:
        """What decides the bytes of every capture job's outputs, other than its layers.

        Which arrays a job writes, and at which positions, is named by its output paths instead:
        removing a layer or a site then re-runs no capture job (``store`` drops the array), and a
        change that touches one layer re-runs only its block. Everything here also shapes the
        boundaries, so it is the same for all blocks and a job never reads a boundary computed
        under other settings. The workflow writes it to a file every capture job reads, so a
        change reaches every block even where Snakemake skips a job whose only link to a re-run
        job below is its (ancient) boundary.
        """
        c = self.config["capture"]
        return {
            "dtype": c["dtype"], "batch_size": c["batch_size"], "length_window": c["length_window"],
            "padding_side": c["padding_side"],
            "parts": c["parts"], "model_dtype": self.config["model"]["dtype"],
            "trust_remote_code": self.config["model"]["trust_remote_code"], "store": self.config["store"],
        }

    def job_params(self, block: Block) -> dict[str, Any]:
        """A block's job: its layer range and the shared capture settings."""
        return {"block": [block.start, block.end], **self.capture_settings()}


def build_plan(config: dict[str, Any], schema_path: str | os.PathLike, base_dir: str | os.PathLike = ".",
               allow_download: bool = True) -> Plan:
    """Validate ``config`` and resolve models, layers and per-layer settings; raise ConfigError if anything is off."""
    base = Path(base_dir).resolve()
    cfg = validate(config, load_schema(schema_path))
    data = resolve_data_file(cfg["dataset"], "dataset", base)
    if not cfg["dataset"]["name"]:
        cfg["dataset"]["name"] = data.stem
    try:
        model = parse_ref(cfg["model"], base)
        adapter = parse_ref(cfg["adapter"], base) if cfg["adapter"] else None
        extra_refs = {name: parse_ref(spec, base) for name, spec in cfg["adapters"].items()}
        for name, ref in extra_refs.items():
            if ref.kind == "local" and not Path(ref.name).is_dir():
                raise ConfigError(f"config error: adapters.{name}.id: local directory {ref.name} does not exist")
            if ref.kind == "builtin" and ref.name != "lora":
                raise ConfigError(f"config error: adapters.{name}.id: unknown built-in adapter 'builtin:{ref.name}' "
                                  "(choose builtin:lora)")
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
    if dims is None:
        raise ConfigError(
            f"config error: model.id: the config.json of {model.label} is not in the hub cache and cannot be "
            "downloaded (offline, or no such repo); planning needs its number of layers: run once online, or "
            "point hub_cache at a cache that holds it")
    cap = cfg["capture"]
    max_pos = raw.get("max_position_embeddings") or raw.get("n_positions") or raw.get("n_ctx")
    if isinstance(max_pos, int) and cfg["dataset"]["max_length"] > max_pos:
        # Past its positions GPT-2 crashes at capture, and rotary models silently give wrong values.
        raise ConfigError(f"config error: dataset.max_length: {cfg['dataset']['max_length']} is more than the "
                          f"{max_pos} positions {model.label} was built for; set it to {max_pos} or less")
    check_site_names(cap)
    layers = resolve_layers(cap["layers"], dims.num_layers, model.label)
    settings = {L: {"sites": list(cap["sites"]), "positions": cap["positions"]} for L in layers}
    for key, over in cap["overrides"].items():
        L = int(key)
        if not -dims.num_layers <= L < dims.num_layers:
            raise layer_error(L, dims.num_layers, model.label, key=f"capture.overrides.{key}")
        L %= dims.num_layers
        if L not in settings:
            raise ConfigError(f"config error: capture.overrides.{key}: layer {L} is not in capture.layers")
        settings[L].update(copy.deepcopy(over))
    check_span_positions(cap, cfg["dataset"]["format"], data)
    if problem := check_capture(dims.model_type, dims.architecture, cap):
        raise ConfigError(f"config error: {problem}")
    main = "adapter" if adapter is not None else "base"
    variants = cap["variants"] or [main]
    extra = cfg["adapters"]
    if adapter is None and any(v in extra for v in variants):
        raise ConfigError("config error: adapters: more adapters are variants beside the main adapter; set adapter: "
                          "(the one activations.zarr holds) too")
    for name in extra:
        if name.startswith("steer-"):
            raise ConfigError(f"config error: adapters.{name}: names starting with 'steer-' are steered runs'")
    for i, v in enumerate(variants):
        if v not in ("adapter", "base", *extra):
            raise ConfigError(f"config error: capture.variants[{i}]: {v!r} is none of adapter, base"
                              + "".join(f", {n}" for n in extra) + " (more adapters are named under adapters:)")
    if "adapter" in variants and adapter is None:
        raise ConfigError("config error: capture.variants: 'adapter' is the model with its adapter, and adapter: is "
                          "null; name one (adapter.id) or capture only [base]")
    if main not in variants:
        raise ConfigError(f"config error: capture.variants: {variants} leaves out {main!r}, which the main store "
                          "(activations.zarr) holds; to capture the model without its adapter, set adapter: null")
    cap["variants"] = [main] + sorted(v for v in variants if v != main)
    lora, variant_lora, variant_sites = None, {}, {}
    if any(split_site(s)[0] in LORA_SITES for v in settings.values() for s in v["sites"]):
        lora = adapter_modules(adapter, model, cfg["hub_cache"], allow_download)
        # each more adapter that is a variant captures the LoRA sites of its own modules
        variant_lora = {n: adapter_modules(extra_refs[n], model, cfg["hub_cache"], allow_download,
                                           key=f"adapters.{n}.id") for n in cap["variants"] if n in extra_refs}
        variant_sites = expand_lora_sites(settings, lora, cap["lora_modules"], variant_lora)
    # Key order must not matter: Snakemake compares params by their text, so a config file
    # rewritten with its keys in another order would otherwise re-run every job.
    cfg = json.loads(dumps_stable(cfg))
    settings = {L: json.loads(dumps_stable(v)) for L, v in settings.items()}
    steer = targets(cfg["steering"], dims.num_layers, base, {L: v["sites"] for L, v in settings.items()})
    passes = plan_passes(cfg, base, max_pos, model.label, {v["positions"] for v in settings.values()})
    if passes and len(cfg["capture"]["variants"]) > 1:
        raise ConfigError("config error: passes: prompted passes capture one model; capture.variants lists "
                          f"{', '.join(cfg['capture']['variants'])}: run each model as its own run and compare them "
                          "with `python -m layerscope inspect RUN --pass NAME --compare-with OTHER_RUN`")
    for t in steer:
        if t.layer > max(layers):
            raise ConfigError(f"config error: steering.runs: {t.name} steers layer {t.layer}, above every captured "
                              f"layer (the highest is {max(layers)}): nothing would show its effect")
    variant_sites = {n: {int(L): v for L, v in json.loads(dumps_stable(per)).items()}
                     for n, per in variant_sites.items()}
    return Plan(cfg, base, model, adapter, dims, layers, settings, lora, steer,
                {n: r for n, r in extra_refs.items() if n in cfg["capture"]["variants"]}, variant_lora, variant_sites,
                passes)


def resolve_data_file(section: dict[str, Any], key: str, base: Path) -> Path:
    """Check ``section["path"]`` (a data set or task file) exists; record it relative to the working
    directory where possible (moving a project must not re-run it) and resolve ``format: auto``
    from its suffix (so naming the format a file already has re-runs nothing)."""
    data = Path(section["path"])
    data = data if data.is_absolute() else base / data
    if not data.is_file():
        raise ConfigError(f"config error: {key}.path: file {data} does not exist")
    section["path"] = str(data.relative_to(base)) if data.is_relative_to(base) else str(data)
    if section["format"] == "auto":
        if data.suffix.lower() not in (".jsonl", ".json", ".ndjson", ".csv"):
            raise ConfigError(f"config error: {key}.format: cannot tell the format of {data.name} from its suffix; "
                              f"set {key}.format to jsonl or csv")
        section["format"] = "csv" if data.suffix.lower() == ".csv" else "jsonl"
    return data


def check_span_positions(cap: dict[str, Any], fmt: str, data: Path) -> None:
    """Refuse a span in capture.positions or an override that no record of the data set can have:
    its arrays would hold no row at all. (An example whose span is empty only adds no rows.)"""
    from layerscope.data.dataset import possible_spans
    from layerscope.store.rows import is_span

    keys = [("capture.positions", cap["positions"])] + [(f"capture.overrides.{k}.positions", o["positions"])
                                                        for k, o in cap["overrides"].items() if "positions" in o]
    spans = {p for _, p in keys if is_span(p)}
    if not spans:
        return
    have = possible_spans(data, fmt, spans)
    for key, p in keys:
        if is_span(p) and p not in have:
            what = "an assistant message (text records have no response)" if p == "response" else \
                f"a message of role {p.removeprefix('role:')!r}"
            raise ConfigError(f"config error: {key}: {p!r} would capture nothing: no record of {data.name} has "
                              f"{what}; choose all, last, prompt or a span its records have")


def check_pass_positions(name: str, spec: dict[str, Any], inherited: set[str]) -> None:
    """A pass's examples record two spans, its prompt and the model's reply: refuse any other, and
    the reply where the pass generates none. ``inherited``: the run's positions, which a pass
    without its own captures at."""
    own = spec.get("positions")
    for pos in [own] if own else sorted(inherited):
        if pos in ("all", "last", "answer", "prompt"):
            continue
        via = "" if own else f" (the run's positions, which the pass captures at without passes.{name}.positions)"
        if pos != "response":
            raise ConfigError(f"config error: passes.{name}.positions: {pos!r}{via}: a pass's examples record their "
                              "prompt and the model's reply only (spans prompt, response)")
        if not spec["generate"]["max_new_tokens"]:
            raise ConfigError(f"config error: passes.{name}.positions: 'response'{via} is the model's reply, and this "
                              f"pass generates none; set passes.{name}.generate.max_new_tokens, or capture prompt or "
                              "all")


def plan_passes(cfg: dict[str, Any], base: Path, max_pos: Any, model: str,
                inherited: set[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Resolve the prompted passes (built-in defaults, templates checked) and the task they read;
    ``inherited``: the run's positions, where a pass names none of its own."""
    from layerscope.passes.prompts import resolve_pass

    if not cfg["passes"]:
        return {}
    task = cfg["task"]
    if task is None:
        raise ConfigError("config error: passes: the passes need questions; set task.path (a JSONL or CSV file of "
                          "question, options, answer records)")
    resolve_data_file(task, "task", base)
    out = {}
    for name, spec in cfg["passes"].items():
        p = resolve_pass(name, spec or {})
        p.setdefault("generate", {"max_new_tokens": 0, "temperature": 0.0, "top_p": 1.0, "seed": 0})
        check_pass_positions(name, p, inherited)
        total = task["max_length"] + p["generate"]["max_new_tokens"]
        if isinstance(max_pos, int) and total > max_pos:
            raise ConfigError(f"config error: passes.{name}.generate.max_new_tokens: task.max_length "
                              f"{task['max_length']} + {p['generate']['max_new_tokens']} new tokens is more than the "
                              f"{max_pos} positions {model} was built for")
        out[name] = json.loads(dumps_stable(p))  # key order must not re-run anything
    return out


def locate(files: list[str | os.PathLike], key: str) -> str | None:
    """``FILE:LINE`` where the last of the YAML ``files`` that sets ``key`` (``a.b[0].c``) sets it, or
    where it sets the nearest enclosing key; None where no file sets any of it."""
    parts = [int(x) if x.isdigit() else x for x in re.findall(r"[^.\[\]]+", key)]
    found = None
    for f in files:
        try:
            node = yaml.compose(Path(f).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        where = None
        for part in parts:
            child = None
            if isinstance(node, yaml.MappingNode):
                child = next(((k, v) for k, v in node.value if k.value == part or k.value == str(part)), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                child = (node.value[part], node.value[part])
            if child is None:
                break
            where = child[0].start_mark
            node = child[1]
        if where is not None:
            found = f"{f}:{where.line + 1}"
    return found


def with_location(message: str, files: list[str | os.PathLike]) -> str:
    """A ``config error: KEY: ...`` message prefixed with the FILE:LINE that sets KEY, where one does."""
    m = re.match(r"config error: ([A-Za-z0-9_.\-\[\]]+):", message)
    where = locate(files, m.group(1)) if m else None
    return f"{where}: {message}" if where else message


SITE_NAME = re.compile(r"^(resid_post|attn_out|mlp_out|mlp_act|lora_a|lora_delta|lora_(a|delta)(\.[A-Za-z0-9_]+)+)$")


def check_site_names(cap: dict[str, Any]) -> None:
    """Refuse a site name that is none of the sites, naming the key and what there is."""
    lists = [("capture.sites", cap["sites"])] + [(f"capture.overrides.{k}.sites", o["sites"])
                                                 for k, o in cap["overrides"].items() if "sites" in o]
    for key, sites in lists:
        for i, s in enumerate(sites):
            if not SITE_NAME.match(s):
                raise ConfigError(f"config error: {key}[{i}]: {s!r} is not a site; choose from "
                                  f"{', '.join(SITES)}, lora_a, lora_delta, lora_a.MODULE, lora_delta.MODULE")


def adapter_modules(adapter: ModelRef | None, model: ModelRef, hub_cache: str | None,
                    allow_download: bool = True, key: str = "adapter.id") -> dict[int, dict[str, list[int]]]:
    """The adapter's LoRA modules per layer, read before any job runs (LoRA sites need their names and
    widths); ``key``: the config key that names it (``adapters.NAME.id`` for a more adapter)."""
    from layerscope.models.adapters import builtin_lora_modules, lora_modules

    if adapter is None:
        raise ConfigError("config error: capture.sites: lora_a and lora_delta are the sites of a LoRA adapter, "
                          "and adapter: is null; name one (adapter.id) or drop the LoRA sites")
    try:
        if adapter.kind == "builtin":
            if model.kind != "builtin":
                raise ConfigError(f"config error: {key}: LoRA sites of builtin:lora need a built-in model "
                                  "(planning builds the adapter to read its modules)")
            return builtin_lora_modules(model.name, adapter.seed)
        if adapter.kind == "local":
            return lora_modules(adapter.name)
        from layerscope.models.loading import peek_adapter

        directory = peek_adapter(adapter, hub_cache, allow_download)
        if directory is None:
            raise ConfigError(f"config error: {key}: the files of {adapter.label} are not in the hub cache and "
                              "cannot be downloaded; planning LoRA sites needs its adapter_config.json and weights")
        return lora_modules(directory)
    except ModelError as e:  # its messages name adapter.id: name the key that holds this adapter
        msg = str(e)
        raise ConfigError(f"config error: {key + msg[len('adapter.id'):] if msg.startswith('adapter.id:') else msg}"
                          ) from e
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"config error: {key}: cannot read the LoRA modules of {adapter.label}: {e}") from e


def expand_lora_sites(settings: dict[int, dict[str, Any]], lora: dict[int, dict[str, list[int]]],
                      names: str | list[str], more: dict[str, dict[int, dict[str, list[int]]]] | None = None
                      ) -> dict[str, dict[int, list[str]]]:
    """Turn ``lora_a`` / ``lora_delta`` into one site per adapted module of each layer (those
    ``capture.lora_modules`` names), for the main adapter (``lora``: in ``settings``, in place) and
    for each of the ``more`` adapters that are variants (returned: name -> layer -> sites).

    Each adapter gets the LoRA sites of its own modules: a module site the config names
    (``lora_a.mlp.down_proj``) is left out of an adapter that does not adapt that module there. A
    name that no adapter has (a module site in its layer, a ``capture.lora_modules`` entry) is
    one config error, as is a plan where no adapter has a LoRA site at all.
    """
    adapters = {"adapter": lora, **(more or {})}
    every = {a: sorted({m for mods in lm.values() for m in mods}) for a, lm in adapters.items()}

    def listing(per: dict[str, list[str]]) -> str:  # what each adapter adapts (one adapter: the plain list)
        if len(per) == 1:
            return ", ".join(next(iter(per.values()))) or "none"
        return "; ".join(f"{a}: {', '.join(ms) or 'none'}" for a, ms in per.items())

    if names != "all":
        for name in names:
            if not any(matches(m, name) for ms in every.values() for m in ms):
                who = "the adapter adapts" if len(adapters) == 1 else "any adapter adapts"
                raise ConfigError(f"config error: capture.lora_modules: {name!r} matches no module {who} "
                                  f"({listing(every)})")
    chosen = lambda m: names == "all" or any(matches(m, n) for n in names)  # noqa: E731
    out: dict[str, dict[int, list[str]]] = {}
    for a, lm in adapters.items():
        out[a] = {}
        for L, v in settings.items():
            mods = lm.get(L, {})
            sites = []
            for s in v["sites"]:
                kind, module = split_site(s)
                if kind not in LORA_SITES:
                    sites.append(s)
                elif module is None:
                    sites += [f"{kind}.{m}" for m in sorted(mods) if chosen(m)]
                elif module in mods:
                    sites.append(s)
                elif not any(module in other.get(L, {}) for other in adapters.values()):
                    there = {b: sorted(other.get(L, {})) for b, other in adapters.items()}
                    raise ConfigError(f"config error: capture.sites: {s}: layer {L} has no LoRA module {module!r} "
                                      f"{'in any adapter ' if len(adapters) > 1 else ''}(adapted there: "
                                      f"{listing(there)})")
            out[a][L] = list(dict.fromkeys(sites))
    if not any(split_site(s)[0] in LORA_SITES for per in out.values() for sites in per.values() for s in sites):
        who = "the adapter adapts no module" if len(adapters) == 1 else "no adapter adapts a module"
        raise ConfigError(f"config error: capture.sites: {who} in the captured layers that capture.lora_modules "
                          f"selects (adapted: {listing(every)})")
    for L, v in settings.items():
        v["sites"] = out["adapter"][L]
        if not any(per[L] for per in out.values()):
            raise ConfigError(f"config error: capture.sites: layer {L} would capture nothing (no adapted "
                              "module there); add a site or leave it out of capture.layers")
    return {a: per for a, per in out.items() if a != "adapter"}


def dumps_stable(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
