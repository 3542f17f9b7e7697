"""Resolving, fetching and loading models and adapters: built-in, local directory, or Hugging Face hub.

A model is named by one string: ``builtin:NAME``, a local directory, or a hub repo id
(with an optional revision). Only safetensors weights are ever loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerscope.errors import ModelError
from layerscope.fileio import sha256_file

log = logging.getLogger("layerscope.models.loading")

# What a snapshot download may fetch: configs, tokenizers and safetensors weights, never pickles.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass(frozen=True)
class ModelRef:
    """Where a model or adapter comes from."""

    kind: str  # "builtin" | "local" | "hub"
    name: str  # built-in name, absolute directory, or repo id
    revision: str | None = None
    seed: int = 0

    @property
    def label(self) -> str:
        return {"builtin": f"builtin:{self.name}", "local": self.name, "hub": self.name}[self.kind]


def parse_ref(spec: dict[str, Any], base_dir: str | os.PathLike = ".") -> ModelRef:
    """Turn a ``model:``/``adapter:`` config mapping into a ModelRef."""
    ident = spec["id"]
    if ident.startswith("builtin:"):
        return ModelRef("builtin", ident.split(":", 1)[1], None, int(spec.get("seed") or 0))
    p = Path(os.path.expanduser(ident))
    looks_local = ident.startswith(("/", ".", "~")) or ident.count("/") > 1 or p.exists()
    if looks_local:
        p = p if p.is_absolute() else Path(base_dir) / p
        return ModelRef("local", str(p.resolve()), None, 0)
    return ModelRef("hub", ident, spec.get("revision") or None, 0)


def hub_cache_dir(hub_cache: str | None) -> str | None:
    """The hub cache to use: the configured one, else huggingface_hub's default (HF_HUB_CACHE, HF_HOME)."""
    return os.path.expanduser(hub_cache) if hub_cache else None


def peek_config(ref: ModelRef, hub_cache: str | None = None, allow_download: bool = True) -> dict[str, Any] | None:
    """The model's config.json as a dict, if it can be had without downloading weights; else None."""
    if ref.kind == "builtin":
        from layerscope.models import builtin
        return builtin.config_facts(ref.name)
    if ref.kind == "local":
        f = Path(ref.name) / "config.json"
        return json.loads(f.read_text()) if f.is_file() else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(ref.name, "config.json", cache_dir=hub_cache_dir(hub_cache), revision=ref.revision)
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if not allow_download or _offline():
        return None
    try:
        path = hf_hub_download(ref.name, "config.json", revision=ref.revision, cache_dir=hub_cache_dir(hub_cache))
    except Exception as e:  # no network, no such repo: planning goes on without the model's shape
        log.warning("could not read config.json of %s: %s", ref.name, e)
        return None
    return json.loads(Path(path).read_text())


def peek_adapter(ref: ModelRef, hub_cache: str | None = None, allow_download: bool = True) -> Path | None:
    """A hub adapter's directory with its config and weights (adapters are small), or None offline without it."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref.name, revision=ref.revision, cache_dir=hub_cache_dir(hub_cache),
                                      allow_patterns=["adapter_config.json", "adapter_model*.safetensors"],
                                      local_files_only=not allow_download or _offline()))
    except Exception as e:  # not cached and offline, or no such repo
        log.warning("could not read the adapter files of %s: %s", ref.name, e)
        return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Dims:
    """The shape facts of a causal LM that planning needs."""

    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    dtype: str | None


def dims_from_config(cfg: dict[str, Any]) -> Dims:
    """Read layer count and widths from a config.json dict of any common causal LM.

    The raw keys answer for every common architecture; transformers' AutoConfig (which imports
    torch, ~2.7 s) is consulted only for a width the file leaves to the config class's default.
    """
    text_cfg = cfg.get("text_config") or cfg

    def raw(*names: str) -> Any:
        return next((text_cfg[n] for n in names if text_cfg.get(n) is not None), None)

    layers = raw("num_hidden_layers", "n_layer", "num_layers")
    hidden = raw("hidden_size", "n_embd", "d_model")
    inter = raw("intermediate_size", "n_inner", "ffn_dim")
    # GPT-2 style configs say "n_inner": null to mean 4 x hidden: nothing is missing then.
    if layers is None or hidden is None or (inter is None and "n_inner" not in text_cfg):
        c = _auto_config(text_cfg)

        def pick(*names: str) -> Any:
            return next((v for n in names if (v := getattr(c, n, None)) is not None), None) if c else None

        layers = layers if layers is not None else pick("num_hidden_layers", "n_layer", "num_layers")
        hidden = hidden if hidden is not None else pick("hidden_size", "n_embd", "d_model")
        inter = inter if inter is not None else pick("intermediate_size", "n_inner", "ffn_dim")
    if layers is None or hidden is None:
        raise ModelError("config.json names no number of layers or hidden size")
    inter = inter or 4 * int(hidden)
    arch = (cfg.get("architectures") or [str(text_cfg.get("model_type", "unknown"))])[0]
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    return Dims(arch, str(text_cfg.get("model_type", "unknown")), int(layers), int(hidden), int(inter),
                str(dtype) if dtype else None)


def _auto_config(text_cfg: dict[str, Any]):
    """The transformers config object of a config dict (class defaults filled in), or None if unknown."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**{k: v for k, v in text_cfg.items() if k != "auto_map"})
    except Exception:  # unknown model_type (remote code): only the raw keys are known
        return None


def _check_safetensors(d: Path, what: str) -> list[Path]:
    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES] if d.is_dir() else []
        extra = f" (found pickle weights {', '.join(pickles)}, which are refused)" if pickles else ""
        raise ModelError(f"{what}: no .safetensors weights in {d}{extra}")
    return weights


def _file_entries(d: Path, digest: bool = True) -> list[dict[str, Any]]:
    """path, bytes, mtime_ns (and sha256 if ``digest``) of every non-hidden file under ``d``.

    mtime_ns lets a reader notice a directory changed in place (an adapter retrained into the
    same folder) without hashing; reader.model_changes lists files with ``digest=False``.
    """
    out = []
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            e: dict[str, Any] = {"path": str(p.relative_to(d)), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
            if digest:
                e["sha256"] = sha256_file(p)
            out.append(e)
    return out


def fetch(ref: ModelRef, dest: str | os.PathLike, hub_cache: str | None = None, what: str = "model",
          base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Make the model (or adapter) available locally and describe it.

    Built-in models are generated into ``dest``; local directories are used in place; hub
    repos are snapshot-downloaded into the hub cache (honouring HF_HUB_OFFLINE).
    ``base_dir`` is the resolved base model directory, needed to build a built-in adapter.
    """
    dest = Path(dest)
    revision = None
    if ref.kind == "builtin":
        from layerscope.models import builtin
        if dest.exists():
            shutil.rmtree(dest)
        if what == "adapter":
            if ref.name != "lora":
                raise ModelError(f"adapter.id: unknown built-in adapter 'builtin:{ref.name}' (choose builtin:lora)")
            builtin.build_adapter(base_dir, ref.seed, dest)
        else:
            builtin.build_model(ref.name, ref.seed, dest)
        directory = dest
    elif ref.kind == "local":
        directory = Path(ref.name)
        if not directory.is_dir():
            raise ModelError(f"{what}.id: local directory {directory} does not exist")
    else:
        from huggingface_hub import snapshot_download

        try:
            directory = Path(snapshot_download(ref.name, revision=ref.revision, cache_dir=hub_cache_dir(hub_cache),
                                               allow_patterns=HUB_ALLOW_PATTERNS))
        except Exception as e:
            raise ModelError(f"{what}.id: cannot fetch '{ref.name}' (revision {ref.revision or 'main'}) "
                             f"from the hub: {type(e).__name__}: {e}") from e
        revision = directory.name  # snapshots/<commit sha>
    if what == "adapter":
        if not (directory / "adapter_config.json").is_file():
            raise ModelError(f"adapter.id: {directory} has no adapter_config.json (not a PEFT adapter)")
        _check_safetensors(directory, "adapter.id")
        cfg = json.loads((directory / "adapter_config.json").read_text())
        info: dict[str, Any] = {"peft_type": cfg.get("peft_type"), "r": cfg.get("r"),
                                "target_modules": cfg.get("target_modules")}
        if cfg.get("peft_type", "LORA") == "LORA":
            from layerscope.models.adapters import check_fits, lora_modules

            info["modules"] = lora_modules(directory)
            if base_dir is not None:
                check_fits(directory, base_dir)
    else:
        if not (directory / "config.json").is_file():
            raise ModelError(f"model.id: {directory} has no config.json (not a Hugging Face model directory)")
        _check_safetensors(directory, "model.id")
        dims = dims_from_config(json.loads((directory / "config.json").read_text()))
        info = {"architecture": dims.architecture, "model_type": dims.model_type, "num_layers": dims.num_layers,
                "hidden_size": dims.hidden_size, "intermediate_size": dims.intermediate_size, "dtype": dims.dtype}
    return {"source": ref.kind, "id": ref.label, "requested_revision": ref.revision, "revision": revision,
            "seed": ref.seed if ref.kind == "builtin" else None, "path": str(directory.resolve()),
            **info, "files": _file_entries(directory)}


def resolve_device(device: str) -> str:
    """``auto`` means CUDA when present, else CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"capture.device: '{device}' requested but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def add_adapters(model: Any, more: dict[str, Any] | None) -> None:
    """Load more adapters beside the main one under their variant names; the main one stays active."""
    for name, spec in (more or {}).items():
        try:
            model.load_adapter(spec["path"], adapter_name=name, is_trainable=False)
        except Exception as e:
            raise ModelError(f"adapters.{name}: cannot load {spec['id']} from {spec['path']}: "
                             f"{type(e).__name__}: {e}") from e
    if more:
        model.set_adapter("default")


def load_model(manifest: dict[str, Any], device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False):
    """Load the model (and its adapter, if the manifest names one) for inference; return (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = manifest["model"]
    tdtype = resolve_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(m["path"], trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(m["path"], dtype=tdtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(f"model.id: cannot load {m['id']} from {m['path']}: {type(e).__name__}: {e}") from e
    a = manifest.get("adapter")
    if a:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, a["path"], is_trainable=False)
        except Exception as e:
            raise ModelError(f"adapter.id: cannot load {a['id']} from {a['path']}: {type(e).__name__}: {e}") from e
        add_adapters(model, manifest.get("adapters"))
    model.to(device)
    model.eval()
    torch.set_grad_enabled(False)
    return model, tokenizer


def load_tokenizer(manifest: dict[str, Any], trust_remote_code: bool = False):
    """The model's tokenizer, exactly as ``AutoTokenizer.from_pretrained`` would load it.

    AutoTokenizer imports torch (~2.7 s) only to read the model config; where the class it would
    choose can be told from the JSON files alone (see ``_tokenizer_class``), that class is used
    directly, so jobs that only tokenize never import torch.
    """
    m = manifest["model"]
    try:
        cls = _tokenizer_class(Path(m["path"]))
        if cls is not None:
            return cls.from_pretrained(m["path"], _from_auto=True)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(m["path"], trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(f"model.id: cannot load the tokenizer of {m['id']} from {m['path']}: {e}") from e


def check_tokenizer_choice(m: dict[str, Any], auto_tokenizer) -> None:
    """Refuse a run whose tokenization (``load_tokenizer``, without torch) used another class than
    AutoTokenizer picks: capture jobs load AutoTokenizer anyway, so a mirror that drifted from a
    newer transformers fails loudly here instead of capturing other tokens than the model expects."""
    cls = _tokenizer_class(Path(m["path"]))
    if cls is not None and type(auto_tokenizer) is not cls:
        raise ModelError(f"model.id: the data set was tokenized with {cls.__name__} but transformers' AutoTokenizer "
                         f"loads {type(auto_tokenizer).__name__} for {m['id']}; this is a LayerScope bug, please report "
                         "it with your transformers version")


# The generic backends: a tokenizer.json loaded as it is.
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast", "PythonBackend")


def _tokenizer_class(d: Path):
    """The tokenizer class AutoTokenizer (transformers 5) would pick for directory ``d``, without importing torch.

    Mirrors AutoTokenizer.from_pretrained for a local directory with tokenizer.json and no remote
    code; returns None (use AutoTokenizer) for anything else: other transformers majors, auto_map,
    model types AutoTokenizer's tables do not name, Mistral, SentencePiece-only tokenizers.
    tests/test_no_torch.py checks the result against AutoTokenizer on the built-in models.
    """
    import transformers

    if not transformers.__version__.startswith("5."):
        return None
    try:
        tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return None
    declared = tok_cfg.get("tokenizer_class")
    model_type = cfg.get("model_type")
    if (not (d / "tokenizer.json").is_file() or "auto_map" in tok_cfg or "auto_map" in cfg or "model_name" in cfg
            or not isinstance(declared, str) or not isinstance(model_type, str) or not model_type):
        return None
    tables = _auto_tokenizer_tables()
    # A model type AutoConfig does not know makes AutoTokenizer read it as "": not mirrored.
    if tables is None or model_type not in tables[2]:
        return None
    names, incorrect, _ = tables
    from transformers import TokenizersBackend

    registered = names.get(model_type)  # None for model types AutoTokenizer has no entry for, as there
    if registered == _OPTIONAL or "Mistral" in (registered or "") or "Mistral" in declared:
        return None
    if (declared.removesuffix("Fast") == "LlamaTokenizer" and model_type not in incorrect
            and TokenizersBackend._tokenizer_json_has_byte_level(str(d))):
        return TokenizersBackend
    if registered is not None and registered.removesuffix("Fast") != declared.removesuffix("Fast"):
        # AutoTokenizer trusts the declared class unless the model type is known to declare a wrong one.
        name = registered.removesuffix("Fast") if model_type in incorrect else declared
        if registered.removesuffix("Fast") in _GENERIC_TOKENIZERS:
            return TokenizersBackend
        if name.endswith("Fast") and name != "PreTrainedTokenizerFast":
            return None  # AutoTokenizer looks "XFast" up in its alias registry: not mirrored
        cls = _transformers_class(name)
        return cls if cls is not None and cls.__name__ not in _GENERIC_TOKENIZERS else TokenizersBackend
    cls = _transformers_class(declared.removesuffix("Fast"))
    return TokenizersBackend if cls is None or cls.__name__ in _GENERIC_TOKENIZERS else cls


def _transformers_class(name: str):
    """A tokenizer class of transformers by name, or None (never triggers torch: tokenizer modules are torch-free)."""
    import transformers

    if name in _GENERIC_TOKENIZERS:
        return transformers.TokenizersBackend
    if not name.endswith(("Tokenizer", "Backend")):
        return None  # not a tokenizer class name: leave it to AutoTokenizer
    try:
        return getattr(transformers, name)
    except (AttributeError, ImportError):
        return None


def preload() -> None:
    """What the warm worker does once before it forks steps: read AutoTokenizer's tables (0.3 s
    of parsing transformers' source, which every capture job's tokenizer check would repeat)."""
    _auto_tokenizer_tables()


_OPTIONAL = "?"  # a table entry that depends on an optional package (sentencepiece, mistral_common)
_TABLES: tuple[dict[str, str | None], set[str], set[str]] | None = None


def _auto_tokenizer_tables() -> tuple[dict[str, str | None], set[str], set[str]] | None:
    """AutoTokenizer's model type -> class table, its set of model types whose hub class is wrong,
    and the model types AutoConfig knows.

    Read from the source of transformers.models.auto (tokenization_auto, configuration_auto) with
    ``ast``: importing those modules imports torch. None if the source no longer has the expected shape.
    """
    global _TABLES
    if _TABLES is not None:
        return _TABLES
    import ast

    import transformers

    try:
        # By path, not find_spec: importing the transformers.models package alone costs ~0.3 s.
        auto = Path(transformers.__file__).parent / "models" / "auto"
        names: dict[str, str | None] = {}
        incorrect: set[str] | None = None
        # AutoConfig's model types: auto_mappings' table plus what configuration_auto adds to it.
        known: set[str] = set()
        for f in ("auto_mappings.py", "configuration_auto.py"):
            for node in ast.walk(ast.parse((auto / f).read_text(encoding="utf-8"))):
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CONFIG_MAPPING_NAMES":
                    arg = node.value.args[0] if isinstance(node.value, ast.Call) and node.value.args else None
                    if isinstance(arg, ast.List):
                        known |= {ast.literal_eval(item.elts[0]) for item in arg.elts}
                    for kw in getattr(node.value, "keywords", []):  # OrderedDict(**{"gpt-sw3": ...}, **...)
                        if isinstance(kw.value, ast.Dict):
                            known |= {ast.literal_eval(k) for k in kw.value.keys}
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update"
                      and getattr(node.func.value, "id", None) == "CONFIG_MAPPING_NAMES"
                      and node.args and isinstance(node.args[0], ast.Dict)):
                    known |= {ast.literal_eval(k) for k in node.args[0].keys}
        for node in ast.parse((auto / "tokenization_auto.py").read_text(encoding="utf-8")).body:
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            tname = getattr(target, "id", None)
            if tname == "TOKENIZER_MAPPING_NAMES" and isinstance(node.value, ast.Call):
                for item in node.value.args[0].elts:
                    key, val = item.elts
                    names[ast.literal_eval(key)] = _table_value(val)
            elif tname == "MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS":
                incorrect = set(ast.literal_eval(node.value))
        if not names or incorrect is None or not known:
            return None
    except Exception:  # another layout of the module: let AutoTokenizer decide
        return None
    for model_type in incorrect:  # as tokenization_auto does at import
        names.setdefault(model_type, "TokenizersBackend")
    _TABLES = (names, incorrect, known)
    return _TABLES


def _table_value(node: Any) -> str | None:
    """One value of TOKENIZER_MAPPING_NAMES: a name, None, or ``"Name" if is_tokenizers_available() else None``."""
    import ast

    if isinstance(node, ast.IfExp):
        return ast.literal_eval(node.body) if ast.unparse(node.test) == "is_tokenizers_available()" else _OPTIONAL
    return ast.literal_eval(node)
