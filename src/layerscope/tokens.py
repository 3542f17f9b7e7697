"""Readable token text: real UTF-8 per token, with byte-level BPE pieces merged.

A token's text is what it adds to the decoded string. Tokens that end inside a multi-byte
character (byte-level BPE, SentencePiece byte fallback) show as an empty string, and the
token that completes the character carries all of it, so no U+FFFD ever appears.
"""

from __future__ import annotations

from typing import Sequence

WINDOW = 6  # tokens of left context: enough for any UTF-8 character split into bytes


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token contributes, in order; ``"".join`` gives the decoded text."""
    ids = [int(i) for i in ids]
    out: list[str] = []
    for i in range(len(ids)):
        lo = max(0, i - WINDOW)
        before = tokenizer.decode(ids[lo:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        upto = tokenizer.decode(ids[lo:i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        stable = before.rstrip("\ufffd")  # a pending partial character is not text yet
        piece = upto[len(stable):] if upto.startswith(stable) else upto
        # Unfinished character at the end: it belongs to a later token.
        if piece.endswith("\ufffd") and i + 1 < len(ids):
            piece = piece.rstrip("\ufffd")
        out.append(piece)
    return out
