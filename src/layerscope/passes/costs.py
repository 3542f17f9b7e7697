"""What each prompted pass of a planned run will cost: its jobs, the bytes of its store and its
boundaries (``python -m layerscope plan``).

The pass's tokens come from what the workflow already wrote, else are rendered here: the
answered data set (prompt + reply, exact), else the prompts, with each reply counted at its
longest (``generate.max_new_tokens``): an upper bound until the model has answered.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.analysis.costs import array_costs, boundary_costs, plan_tokenizer, row_maps, tokenized
from layerscope.config import Plan
from layerscope.data.dataset import load_spans
from layerscope.passes.prompts import prepare_pass

STEPS = ("prepare_pass", "answer_pass", "store_pass", "pass_metadata")  # a pass's jobs beside its captures


def pass_tokens(plan: Plan, name: str, pass_dir: Path) -> tuple[np.ndarray, list, bool]:
    """(token offsets, each example's spans, exact) of one pass's captured data set."""
    if tokenized(pass_dir / "dataset"):
        return np.load(pass_dir / "dataset" / "offsets.npy", allow_pickle=False), load_spans(pass_dir / "dataset"), True
    spec = plan.passes[name]
    if tokenized(pass_dir / "prompts"):
        offsets = np.load(pass_dir / "prompts" / "offsets.npy", allow_pickle=False)
    else:
        task = dict(plan.config["task"])
        path = Path(task["path"])
        task["path"] = str(path if path.is_absolute() else plan.base_dir / path)
        with tempfile.TemporaryDirectory() as tmp:
            prepare_pass(task, spec, plan_tokenizer(plan), tmp)
            offsets = np.load(Path(tmp) / "offsets.npy", allow_pickle=False)
    prompts = np.diff(offsets)
    new = spec["generate"]["max_new_tokens"]
    full = np.concatenate([[0], np.cumsum(prompts + new)]).astype(np.int64)
    spans = [{"prompt": [[0, int(n)]], "response": [[int(n), int(n) + new]] if new else []} for n in prompts]
    return full, spans, not new


def pass_estimates(plan: Plan, results: Path, compute_dtype: str) -> list[dict[str, Any]]:
    """Per pass: questions, tokens (``exact``, or at most), jobs, array bytes (raw and on disk) and
    boundary bytes, as ``analysis.costs.estimate`` counts them for the run."""
    parts = plan.config["capture"]["parts"]
    n_boundaries = sum(b.writes_boundary for b in plan.blocks)
    out = []
    for name in plan.passes:
        offsets, spans, exact = pass_tokens(plan, name, results / name)
        captures = [c for b in plan.blocks for c in plan.pass_captures(b, name)]
        arrays = array_costs(plan, captures, row_maps(captures, offsets, spans))
        out.append({"name": name, "questions": len(offsets) - 1, "tokens": int(offsets[-1]), "exact": exact,
                    "jobs": len(STEPS) + len(plan.blocks) * parts, "capture_jobs": len(plan.blocks) * parts,
                    "arrays": len(arrays), "array_bytes": sum(a["bytes"] for a in arrays),
                    "disk_bytes": sum(a["disk_bytes"] for a in arrays),
                    "boundary_bytes": n_boundaries * sum(boundary_costs(plan, offsets, spans, compute_dtype))})
    return out
