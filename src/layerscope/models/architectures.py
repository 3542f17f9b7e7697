"""Which sites an architecture defines, decided from config.json facts alone (no torch), so that
the config check can refuse a site before any job runs (see sites.py for the hooks themselves)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from layerscope.errors import ModelError
from layerscope.models.adapters import split_site


@dataclass(frozen=True)
class Widths:
    """Row widths of every site of a model (and its LoRA adapter, if any)."""

    hidden: int
    intermediate: int
    lora: dict[int, dict[str, list[int]]] = field(default_factory=dict)  # layer -> module -> [r, out]

    @classmethod
    def of(cls, manifest: dict[str, Any], adapter: str | None = None) -> "Widths":
        """From a job manifest: the model's shape and the modules its adapter adapts (``adapter``:
        one of the more adapters, ``manifest["adapters"][adapter]``, instead of the main one)."""
        m = manifest["model"]
        a = (manifest.get("adapter") if adapter is None else (manifest.get("adapters") or {}).get(adapter)) or {}
        return cls(m["hidden_size"], m["intermediate_size"],
                   {int(k): v for k, v in (a.get("modules") or {}).items()})

    def site(self, layer: int, site: str) -> int:
        """Width of a site's rows: the MLP's neurons for mlp_act, the rank for lora_a, the module's
        output for lora_delta, the residual width for the others."""
        kind, module = split_site(site)
        if module is not None:
            if module not in self.lora.get(layer, {}):
                raise ModelError(f"layer {layer}: the adapter has no LoRA module {module!r} (site {site}); "
                                 "re-plan the workflow")
            r, out = self.lora[layer][module]
            return r if kind == "lora_a" else out
        return self.intermediate if site == "mlp_act" else self.hidden

    def all(self) -> set[int]:
        """Every width an array of this run could have (the chain's example spans cover all their layouts)."""
        return {self.hidden, self.intermediate} | {w for mods in self.lora.values() for ro in mods.values() for w in ro}


def chain_widths(manifest: dict[str, Any]) -> set[int]:
    """The widths a job's example spans are cut by: every width an array of any of its variants could
    have (the model's, and the LoRA modules' of the main adapter and of each more adapter)."""
    out = Widths.of(manifest).all()
    for name in manifest.get("adapters") or {}:
        out |= Widths.of(manifest, name).all()
    return out

# Sparse mixture-of-experts models whose model_type does not say "moe".
MOE_MODEL_TYPES = frozenset({
    "mixtral", "dbrx", "deepseek_v2", "deepseek_v3", "gpt_oss", "jamba", "llama4", "llama4_text", "minimax",
    "qwen3_next", "dots1", "longcat_flash", "flex_olmo",
})
SPARSE_MOE_HINT = "use mlp_out or resid_post"


def is_sparse_moe(model_type: str, architecture: str) -> bool:
    """Whether config.json's model_type / architecture names a sparse mixture-of-experts model."""
    mt, arch = model_type.lower(), architecture.lower()
    return mt in MOE_MODEL_TYPES or "moe" in mt or "moe" in arch


def check_sites(model_type: str, architecture: str, sites: Iterable[str], key: str = "capture.sites") -> str | None:
    """The one-line problem with capturing ``sites`` (the value of config key ``key``) on this
    architecture, or None when every site is defined for it. Needs only config.json facts."""
    if "mlp_act" in sites and is_sparse_moe(model_type, architecture):
        return (f"{key}: mlp_act is not defined for {model_type} (a sparse mixture-of-experts MLP: "
                f"each expert has its own neurons); {SPARSE_MOE_HINT}")
    return None


def check_capture(model_type: str, architecture: str, capture: dict[str, Any]) -> str | None:
    """``check_sites`` for the ``capture:`` config section: capture.sites and every override's sites."""
    lists = [("capture.sites", capture.get("sites") or [])]
    lists += [(f"capture.overrides.{k}.sites", o["sites"]) for k, o in (capture.get("overrides") or {}).items()
              if "sites" in o]
    for key, sites in lists:
        problem = check_sites(model_type, architecture, sites, key)
        if problem:
            return problem
    return None
