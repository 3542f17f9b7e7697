"""Which token each row of a stored array holds: the one definition capture, readers, analysis
and exports share.

An array's ``positions`` decide its rows:

- ``all``: one row per token, so example i's rows are the run's token offsets ``[o[i], o[i+1])``;
- ``last`` / ``answer``: one row per example, its last token or the position a prompted pass
  reads its answer at (``answer_index.npy``; the last token elsewhere);
- a span, ``prompt``, ``response`` or ``role:NAME`` (the ranges ``examples.jsonl`` records per
  example): one row per token inside the span, in example then token order. A token covered by
  two ranges of one span is one row, and an example whose span is empty has no rows.

``RowMap`` holds, per example, its row offsets (length examples + 1) and, per row, the token it
holds (an index into the run's flat token axis).
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from layerscope.errors import LayerScopeError

MODES = ("all", "last", "answer")
PER_EXAMPLE = ("last", "answer")
SPANS = ("prompt", "response")
ROLE = "role:"
# What a role may be called inside a positions name: its name is part of marker file names.
SPAN_PATTERN = r"^(prompt|response|role:[A-Za-z0-9_][A-Za-z0-9_.-]*)$"
_SPAN = re.compile(SPAN_PATTERN)


def is_span(positions: str) -> bool:
    """Whether ``positions`` names a span of tokens rather than one of ``MODES``."""
    return bool(_SPAN.match(positions))


def per_token(positions: str) -> bool:
    """Whether an array at ``positions`` has (up to) a row per token of an example, not one row per example."""
    return positions not in PER_EXAMPLE


def row_dim(positions: str) -> str:
    """The name of an array's row dimension: ``example``, ``token``, or ``SPAN_token`` for a span
    (``response_token``, ``role_user_token``): arrays whose rows differ have dimensions that differ."""
    if positions in PER_EXAMPLE:
        return "example"
    return "token" if positions == "all" else re.sub(r"\W", "_", positions) + "_token"


class RowMap:
    """The rows of one array over the run's examples: ``offsets`` (example i's rows are
    ``[offsets[i], offsets[i + 1])``) and ``tokens`` (the flat token index each row holds)."""

    def __init__(self, positions: str, offsets: np.ndarray, token_offsets: np.ndarray,
                 tokens: np.ndarray | None = None) -> None:
        self.positions = positions
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.token_offsets = np.asarray(token_offsets, dtype=np.int64)
        if tokens is not None:
            self.__dict__["tokens"] = np.asarray(tokens, dtype=np.int64)

    @property
    def per_token(self) -> bool:
        return per_token(self.positions)

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    @cached_property
    def tokens(self) -> np.ndarray:
        """The token of every row (built on first use for ``all``, where it is every token)."""
        return np.arange(self.n_rows, dtype=np.int64)

    def examples(self, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """The example each of rows [r0, r1) belongs to."""
        r1 = self.n_rows if r1 is None else r1
        return self.examples_of(np.arange(r0, r1, dtype=np.int64))

    def examples_of(self, rows: np.ndarray) -> np.ndarray:
        """The example each of ``rows`` (absolute) belongs to (empty examples hold no row)."""
        return np.searchsorted(self.offsets, np.asarray(rows, dtype=np.int64), side="right") - 1

    def positions_of(self, rows: np.ndarray) -> np.ndarray:
        """Each row's token position within its example."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.tokens[rows] - self.token_offsets[self.examples_of(rows)]

    def rows_of(self, tokens: np.ndarray) -> np.ndarray:
        """The row holding each of ``tokens`` (flat token indices), -1 where the array does not hold it."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if self.positions == "all":
            return tokens.copy()
        idx = np.searchsorted(self.tokens, tokens)  # rows hold their tokens in increasing order
        ok = idx < len(self.tokens)
        ok[ok] = self.tokens[idx[ok]] == tokens[ok]
        return np.where(ok, idx, -1)


def span_tokens(name: str, token_offsets: np.ndarray, spans: Sequence[dict[str, Any] | None],
                where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(row offsets, flat token indices) of span ``name`` over the examples (``spans``: each
    example's ``spans`` record, in store order). An example without the span has no rows."""
    token_offsets = np.asarray(token_offsets, dtype=np.int64)
    counts = np.zeros(len(token_offsets) - 1, dtype=np.int64)
    pieces = []
    for i, sp in enumerate(spans):
        if sp is None:
            raise LayerScopeError(f"{where}its examples record no spans (prepared by an older LayerScope); re-run "
                                  "it (snakemake -R prepare_dataset) to capture or select prompt/response/role tokens")
        ranges = sp.get(name) or []
        n = int(token_offsets[i + 1] - token_offsets[i])
        parts = [np.arange(max(0, a), min(b, n), dtype=np.int64) for a, b in ranges]
        if not parts:
            continue
        t = parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))
        pieces.append(t + token_offsets[i])
        counts[i] = len(t)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, np.concatenate(pieces) if pieces else np.zeros(0, np.int64)


def span_names(spans: Sequence[dict[str, Any] | None]) -> set[str]:
    """Every span name the examples record (``prompt``, ``response``, ``role:user``, ...)."""
    return {k for sp in spans if sp for k in sp}


def array_rows(positions: str, token_offsets: np.ndarray, spans: Sequence[dict[str, Any] | None] | None = None,
               answer_index: np.ndarray | None = None, where: str = "") -> RowMap:
    """The rows of an array captured at ``positions`` over examples with ``token_offsets``.

    ``spans`` (each example's recorded spans) is needed for a span; ``answer_index`` (each
    example's answer position within it) for ``answer``, whose default is the last token.
    ``where`` prefixes messages (``"results/demo: "``)."""
    token_offsets = np.asarray(token_offsets, dtype=np.int64)
    n = len(token_offsets) - 1
    if positions == "all":
        return RowMap(positions, token_offsets, token_offsets)
    if positions in PER_EXAMPLE:
        within = np.diff(token_offsets) - 1 if positions == "last" or answer_index is None else answer_index
        return RowMap(positions, np.arange(n + 1, dtype=np.int64), token_offsets,
                      token_offsets[:-1] + np.asarray(within, dtype=np.int64))
    if not is_span(positions):
        raise LayerScopeError(f"{where}positions {positions!r} is none of {', '.join(MODES)}, prompt, response, "
                              "role:NAME")
    if spans is None:
        raise LayerScopeError(f"{where}the rows of a {positions} array need the examples' spans")
    offsets, tokens = span_tokens(positions, token_offsets, spans, where)
    return RowMap(positions, offsets, token_offsets, tokens)
