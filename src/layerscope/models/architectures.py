"""Which sites an architecture defines, decided from config.json facts alone (no torch), so that
the config check can refuse a site before any job runs (see sites.py for the hooks themselves)."""

from __future__ import annotations

from typing import Any, Iterable


def site_width(site: str, hidden: int, intermediate: int) -> int:
    """Width of a site's rows: the MLP's neurons for mlp_act, the residual width for the others."""
    return intermediate if site == "mlp_act" else hidden

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
