"""``RUN[:VARIANT]`` references: a run directory, optionally naming one variant of its store.

A variant is a second capture of the same tokens from the same model load (base vs adapter).
None are stored yet: this module is the one place that parses the suffix and turns it into
something readable, so that commands taking a run (``compare``, ``export``) gain variants when
``run_variants`` and ``resolve_variant`` learn to find them.
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
    """Names of the variants ``run`` stores besides its default store; none can be stored yet."""
    return []


def resolve_variant(run: Run, variant: str | None) -> Run:
    """The run to read for ``variant`` (None: the run's default store), or one error listing what exists."""
    if variant is None:
        return run
    names = run_variants(run)
    have = (f"its variants are {', '.join(names)}" if names
            else "it has no variants, only its default store (name the run without ':VARIANT')")
    raise LayerScopeError(f"{run.path}: no variant {variant!r}; {have}")


def open_ref(text: str | os.PathLike) -> tuple[Run, str | None]:
    """Open ``RUN[:VARIANT]``: (the run to read, the variant named or None)."""
    path, variant = parse_run_ref(os.fspath(text))
    return resolve_variant(Run(Path(path)), variant), variant
