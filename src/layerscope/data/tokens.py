"""Readable token text: real UTF-8 per token, with byte-level BPE pieces merged.

A token's text is what it adds to the decoded string. Tokens that end inside a multi-byte
character (byte-level BPE, SentencePiece byte fallback) show as an empty string, and the
token that completes the character carries all of it, so no U+FFFD ever appears in valid text.

Decoding is the slow part, so a token whose text does not depend on its neighbours (one that
decodes to whole characters after a plain letter) is decoded once per distinct id; only the
first token of a sequence and tokens inside a split character are decoded in context.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

WINDOW = 6  # tokens of left context: enough for any UTF-8 character split into bytes
ANCHOR_SCAN = 4096  # ids searched for a plain-letter token to decode others after
# tokenizer_config classes that only wrap tokenizer.json: transformers decodes them with it as it is
GENERIC_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}


def load_decoder(manifest: dict[str, Any], trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, for decoding. A plain tokenizer.json (a generic class, no remote code,
    no added token it lacks) is loaded with the ``tokenizers`` library: the same decode as
    transformers', without importing transformers and torch, which takes seconds per job."""
    d = Path(manifest["model"]["path"])
    try:
        cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = None
    if (isinstance(cfg, dict) and cfg.get("tokenizer_class") in GENERIC_CLASSES and "auto_map" not in cfg
            and (d / "tokenizer.json").is_file()):
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(d / "tokenizer.json"))
            added = cfg.get("added_tokens_decoder") or {}
            if all(tok.id_to_token(int(i)) == (v or {}).get("content") for i, v in added.items()):
                return tok
        except Exception:  # noqa: BLE001 - anything unexpected: transformers decides, as before
            pass
    from layerscope.models.loading import load_tokenizer

    return load_tokenizer(manifest, trust_remote_code)


def _decode_fn(tokenizer: Any) -> Callable[[list[int]], str]:
    if type(tokenizer).__module__.split(".")[0] == "tokenizers":
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class TokenTexts:
    """Token texts for one tokenizer; distinct ids are decoded once across all the sequences it sees."""

    def __init__(self, tokenizer: Any) -> None:
        self._decode = _decode_fn(tokenizer)
        self._alone: dict[int, str | None] = {}
        self._anchor: tuple[int, str] | None | bool = False  # False: not searched yet

    def __call__(self, ids: Sequence[int]) -> list[str]:
        """The text each token contributes, in order; ``"".join`` gives the decoded text."""
        ids = [int(i) for i in ids]
        out: list[str] = []
        pending = False  # the text so far ends inside a character that a later token completes
        for i, t in enumerate(ids):
            piece = None if i == 0 or pending else self.alone(t)
            if piece is None:
                piece, pending = self.in_context(ids, i)
            out.append(piece)
        # A decoder whose pieces depend on their neighbours after all: every token in context.
        if len(ids) > 1 and "".join(out) != self._decode(ids):
            out = [self.in_context(ids, i)[0] for i in range(len(ids))]
        return out

    def in_context(self, ids: list[int], i: int) -> tuple[str, bool]:
        """Token i's text decoded after up to WINDOW tokens, and whether it leaves a character unfinished."""
        lo = max(0, i - WINDOW)
        before = self._decode(ids[lo:i])
        upto = self._decode(ids[lo:i + 1])
        stable = before.rstrip("\ufffd")  # a pending partial character is not text yet
        piece = upto[len(stable):] if upto.startswith(stable) else upto
        # Unfinished character at the end: it belongs to a later token.
        if piece.endswith("\ufffd") and i + 1 < len(ids):
            return piece.rstrip("\ufffd"), True
        return piece, False

    def alone(self, t: int) -> str | None:
        """Token t's text after a plain letter, if it is whole characters (None: decode it in context)."""
        if t not in self._alone:
            anchor = self.anchor()
            piece = None
            if anchor is not None:
                a, a_text = anchor
                s = self._decode([a, t])
                if s.startswith(a_text) and "\ufffd" not in s:
                    piece = s[len(a_text):]
            self._alone[t] = piece
        return self._alone[t]

    def anchor(self) -> tuple[int, str] | None:
        """A token that decodes to one ASCII letter or digit, alone and twice in a row, or None."""
        if self._anchor is False:
            self._anchor = None
            for a in range(ANCHOR_SCAN):
                try:
                    s = self._decode([a])
                    ok = len(s) == 1 and s.isascii() and s.isalnum() and self._decode([a, a]) == s + s
                except Exception:  # noqa: BLE001 - ids past the vocabulary raise in some tokenizers
                    break
                if ok:
                    self._anchor = (a, s)
                    break
        return self._anchor  # type: ignore[return-value]


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token contributes, in order; ``"".join`` gives the decoded text."""
    return TokenTexts(tokenizer)(ids)
