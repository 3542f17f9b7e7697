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

log = logging.getLogger("layerscope.models")

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
        from layerscope import builtin

        return builtin.hf_config_dict(ref.name)
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
    """Read layer count and widths from a config.json dict of any common causal LM."""
    from transformers import AutoConfig

    text_cfg = cfg.get("text_config") or cfg
    try:
        c = AutoConfig.for_model(**{k: v for k, v in text_cfg.items() if k != "auto_map"})
    except Exception:  # unknown model_type (remote code): fall back to the raw keys
        c = None

    def pick(*names: str) -> Any:
        for n in names:
            v = getattr(c, n, None) if c is not None else None
            if v is None:
                v = text_cfg.get(n)
            if v is not None:
                return v
        return None

    layers = pick("num_hidden_layers", "n_layer", "num_layers")
    hidden = pick("hidden_size", "n_embd", "d_model")
    if layers is None or hidden is None:
        raise ModelError("config.json names no number of layers or hidden size")
    inter = pick("intermediate_size", "n_inner", "ffn_dim") or 4 * int(hidden)
    arch = (cfg.get("architectures") or [str(text_cfg.get("model_type", "unknown"))])[0]
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    return Dims(arch, str(text_cfg.get("model_type", "unknown")), int(layers), int(hidden), int(inter),
                str(dtype) if dtype else None)


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
        from layerscope import builtin

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
    model.to(device)
    model.eval()
    torch.set_grad_enabled(False)
    return model, tokenizer


def load_tokenizer(manifest: dict[str, Any], trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    m = manifest["model"]
    try:
        return AutoTokenizer.from_pretrained(m["path"], trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(f"model.id: cannot load the tokenizer of {m['id']} from {m['path']}: {e}") from e
