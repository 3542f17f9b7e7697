"""A run's prompted passes on disk: which passes it has, and opening one.

A pass lives in ``results/{run}/{pass}/``, a run of its own inside the run: ``metadata.json`` (seed
004's list of per-question records), ``run_metadata.json``, ``run_config.json`` (with the pass's
resolved settings under ``config.pass``) and ``activations.zarr``. ``run_metadata.json`` is
written last, so a directory holding it is a finished pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerscope.errors import IncompleteRunError, LayerScopeError
from layerscope.fileio import read_json
from layerscope.store.reader import Run


@dataclass
class Pass:
    """One finished prompted pass of a run."""

    name: str
    run: Run  # the pass's own store and records (run.questions)
    answers: str  # "options" (the question's options) or "confidence" (confidence bins)
    bins: int  # confidence bins (confidence passes)

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.run.questions or []

    @property
    def path(self) -> Path:
        return self.run.path


def is_pass_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a finished pass directory (its metadata.json a list of questions)."""
    p = Path(path)
    return (p / "run_metadata.json").is_file() and (p / "metadata.json").is_file()


def list_passes(run_dir: str | os.PathLike) -> list[str]:
    """The names of the finished prompted passes of ``run_dir``, sorted."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    return sorted(c.name for c in d.iterdir() if c.is_dir() and is_pass_dir(c))


def _unfinished(run_dir: Path) -> list[str]:
    return sorted(c.name for c in run_dir.iterdir() if c.is_dir() and (c / "prompts").is_dir() and not is_pass_dir(c))


def describe_passes(run_dir: str | os.PathLike) -> str:
    """What passes ``run_dir`` has, as a phrase for error messages."""
    d = Path(run_dir)
    have = list_passes(d)
    text = f"its passes are {', '.join(have)}" if have else "it has no finished prompted passes (config passes:)"
    pending = _unfinished(d) if d.is_dir() else []
    return text + (f"; unfinished: {', '.join(pending)} (run snakemake)" if pending else "")


def open_pass(run_dir: str | os.PathLike, name: str, variant: str | None = None) -> Pass:
    """Pass ``name`` of the run ``run_dir``; a LayerScopeError listing the run's passes if it has none such."""
    d = Path(run_dir)
    if not d.is_dir():
        raise LayerScopeError(f"{d}: no such run directory")
    p = d / name
    if not is_pass_dir(p):
        if (p / "prompts").is_dir():
            raise IncompleteRunError(f"{d}: pass {name!r} is not finished (no {name}/run_metadata.json); run "
                                     "snakemake")
        raise LayerScopeError(f"{d}: no pass {name!r}; {describe_passes(d)}")
    return load_pass(p, variant)


def pass_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The pass's resolved settings (``answers``, ``bins``, ``template``...) from its run_config.json."""
    f = Path(path) / "run_config.json"
    return (read_json(f).get("config", {}).get("pass") or {}) if f.is_file() else {}


def load_pass(path: str | os.PathLike, variant: str | None = None) -> Pass:
    """The finished pass in directory ``path``."""
    run = Run(path, variant)
    if run.questions is None:
        raise LayerScopeError(f"{path}: not a prompted pass (its metadata.json is not a list of questions)")
    spec = pass_settings(path)
    answers = spec.get("answers") or ("confidence" if any("expected_confidence" in r for r in run.questions)
                                      else "options")
    bins = int(spec.get("bins") or max((len(r.get("choices") or []) for r in run.questions), default=0) or 8)
    return Pass(Path(path).name, run, answers, bins)
