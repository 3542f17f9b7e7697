"""Token text: real UTF-8 with byte-level BPE pieces merged."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from layerscope.models.loading import load_tokenizer
from layerscope.data.tokens import TokenTexts, load_decoder, token_texts


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


TEXTS = ["Café in Zürich: 🙂 <b>bold</b> & “quotes” — 東京 🧠🧠\nnew line",
         "The quick brown fox jumps over the lazy dog. Ünïcödé: Москва, Αθήνα, ★ ✓ → ∑ π ≈ 3.14159",
         " leading space,\ttabs\t and  double  spaces 😀😀😀 end"]


def in_context_only(tok, ids):
    """The reference: every token decoded in context (no per-id cache)."""
    t = TokenTexts(tok)
    return [t.in_context(list(ids), i)[0] for i in range(len(ids))]


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "qwen2-tiny"])
def test_decoding_each_id_once_gives_the_context_pieces(model_factory, name):
    tok = load_tokenizer({"model": model_factory(name)})
    texts = TokenTexts(tok)  # one cache across sequences, as summarize uses it
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        pieces = texts(ids)
        assert pieces == in_context_only(tok, ids)
        assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_random_ids_join_to_the_decoded_text(model_factory):
    tok = load_tokenizer({"model": model_factory("llama-tiny")})
    rng = np.random.default_rng(0)
    texts = TokenTexts(tok)
    for _ in range(20):
        ids = rng.integers(0, len(tok), size=int(rng.integers(1, 40))).tolist()
        pieces = texts(ids)
        assert len(pieces) == len(ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_plain_tokenizer_json_decodes_without_transformers(model_factory, tmp_path):
    m = model_factory("llama-tiny")
    tok = load_tokenizer({"model": m})
    fast = load_decoder({"model": m})
    assert type(fast).__module__.startswith("tokenizers")  # no transformers object
    rng = np.random.default_rng(1)
    for _ in range(20):
        ids = rng.integers(0, len(tok), size=30).tolist()
        assert token_texts(fast, ids) == token_texts(tok, ids)
    # a tokenizer_config that asks for more than tokenizer.json holds goes through transformers
    d = tmp_path / "tok"
    shutil.copytree(m["path"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {"100000": {"content": "<extra>", "special": True}}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert not type(load_decoder({"model": {**m, "path": str(d)}})).__module__.startswith("tokenizers")
