"""Surface features of a question (seed 004's): what a probe on activations should beat."""

from __future__ import annotations

import re
from typing import Any, Sequence

QUESTION_WORDS = ("what", "where", "when", "who", "how", "why", "which")
NEGATION = re.compile(r"\b(not|no|never|none|neither|nor|cannot|nothing|nobody|without)\b|n't\b", re.I)
AMBIGUITY = re.compile(r"\b(possibly|possible|might|may|could|perhaps|probably|likely|unlikely|maybe|approximately|"
                       r"roughly|about|some|unclear|ambiguous|arguably|typically|usually|often)\b", re.I)
WORD = re.compile(r"[a-z]+")


def question_type(text: str) -> str:
    """The first question word of the text (what/where/when/who/how/why/which), else ``other``."""
    for w in WORD.findall(text.lower()):
        if w in QUESTION_WORDS:
            return w
        if w in ("whom", "whose"):
            return "who"
    return "other"


def surface_features(question: str, token_ids: Sequence[int]) -> dict[str, Any]:
    """``token_ids``: the question alone, tokenized without special tokens."""
    ids = [int(t) for t in token_ids]
    return {
        "char_length": len(question),
        "token_length": len(ids),
        "question_type": question_type(question),
        "has_negation": bool(NEGATION.search(question)),
        "has_ambiguity": bool(AMBIGUITY.search(question)),
        # seed 004's proxy for rarity: BPE vocabularies give rarer pieces higher ids
        "token_rarity_mean": sum(ids) / len(ids) if ids else 0.0,
        "token_rarity_max": max(ids) if ids else 0,
    }
