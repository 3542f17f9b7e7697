"""Token text: real UTF-8 with byte-level BPE pieces merged."""

from __future__ import annotations

from layerscope.models import load_tokenizer
from layerscope.tokens import token_texts


def test_pieces_join_to_text_without_replacement_chars(model_factory):
    tok = load_tokenizer({"model": model_factory("llama-tiny")})
    text = "Café in Zürich: 🙂 <b>bold</b> & “quotes” — 東京 🧠🧠\nnew line"
    ids = tok(text)["input_ids"]
    pieces = token_texts(tok, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    raw = tok.convert_ids_to_tokens(ids)
    assert any("Ġ" in r for r in raw) and not any("Ġ" in p for p in pieces)  # byte-level markers decoded
    # a multi-byte character split over several tokens is carried by the token that completes it
    assert "🙂" in pieces or any(p.endswith("🙂") for p in pieces)
