"""``RUN[:VARIANT]`` references: a run directory, optionally naming one variant of its store.

A variant is another forward pass over the same tokens from the same model load (``base``: the
model with its adapter switched off, beside the main ``adapter`` store; see capture.variants).
This module is the one place that parses the suffix and turns it into something readable, for
every command taking a run (``compare``, ``export``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from layerscope.errors import LayerScopeError
from layerscope.store.reader import Run

_VARIANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def parse_run_ref(text: str) -> tuple[str, str | None]:
    """Split ``RUN[:VARIANT]`` into (run directory, variant or None).

    An existing path wins over the suffix reading, so a directory whose name holds a colon
    still opens; otherwise the text after the last colon is the variant.
    """
    if os.path.exists(text) or ":" not in text:
        return text, None
    path, variant = text.rsplit(":", 1)
    if not path or not _VARIANT.fullmatch(variant):
        raise LayerScopeError(f"{text!r}: expected RUN or RUN:VARIANT (variant: letters, digits, '_', '.', '-')")
    return path, variant


def run_variants(run: Run) -> list[str]:
    """Names of the variants ``run`` stores besides its main store."""
    return list(run.variants)[1:]


def resolve_variant(run: Run, variant: str | None) -> Run:
    """The run to read for ``variant`` (None: the main store), or one error listing what exists."""
    if variant is None or variant == run.variant:
        return run
    if variant in run.variants:
        return Run(run.path, variant)
    names = run_variants(run)
    have = (f"its variants are {', '.join(names)} besides its main store ({next(iter(run.variants))})" if names
            else "it has no variants, only its main store (name the run without ':VARIANT')")
    raise LayerScopeError(f"{run.path}: no variant {variant!r}; {have}")


def open_ref(text: str | os.PathLike) -> tuple[Run, str | None]:
    """Open ``RUN[:VARIANT]``: (the run to read, the variant named or None)."""
    path, variant = parse_run_ref(os.fspath(text))
    return resolve_variant(Run(Path(path)), variant), variant
