"""Data set reading, rendering, tokenization and one clear error per malformed record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from layerscope.data.dataset import csv_value, example_text, load_examples, load_tokens, prepare
from layerscope.errors import DataError
from layerscope.models.loading import load_tokenizer
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def tok(model_factory):
    return load_tokenizer({"model": model_factory("llama-tiny")})


def test_jsonl_splits_fields_and_chat(tmp_path, tok):
    recs = [
        {"id": "a", "split": "EM", "text": "one two three", "label": 1},
        {"text": "neutral text", "split": "Neutral", "score": 0.5},
        {"id": 7, "split": "EM", "messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]},
        {"text": "no split here"},
    ]
    out = tmp_path / "ds"
    summary = prepare(write_jsonl(tmp_path / "d.jsonl", recs), tok, out, default_split="rest", max_length=100)
    ex = load_examples(out / "examples.jsonl")
    # grouped by split in order of first appearance, file order kept inside a split
    assert [e["id"] for e in ex] == ["a", "7", "d-1", "d-3"]
    assert [e["split"] for e in ex] == ["EM", "EM", "Neutral", "rest"]
    assert [e["index"] for e in ex] == [0, 1, 2, 3]
    assert ex[0]["label"] == 1 and ex[2]["score"] == 0.5 and ex[0]["source_line"] == 1
    assert ex[1]["rendered"] == tok.apply_chat_template(recs[2]["messages"], tokenize=False)
    ids, offsets = load_tokens(out)
    assert offsets[0] == 0 and offsets[-1] == len(ids) and len(offsets) == 5
    for e in ex:
        want = tok(example_text(e), add_special_tokens="messages" not in e)["input_ids"]
        assert ids[offsets[e["index"]]:offsets[e["index"] + 1]].tolist() == want
    assert summary["splits"]["EM"]["examples"] == 2 and summary["tokens"] == int(offsets[-1])


def test_examples_store_the_text_once(tmp_path, tok):
    """Text records keep 'text' and no copy of it; chat records keep 'messages' and their rendering."""
    msgs = [{"role": "user", "content": "hi"}]
    prepare(write_jsonl(tmp_path / "d.jsonl", [{"text": "plain words"}, {"messages": msgs}]), tok, tmp_path / "o")
    text_ex, chat_ex = load_examples(tmp_path / "o" / "examples.jsonl")
    assert "rendered" not in text_ex and text_ex["text"] == example_text(text_ex) == "plain words"
    assert chat_ex["messages"] == msgs and "text" not in chat_ex
    assert example_text(chat_ex) == chat_ex["rendered"] == tok.apply_chat_template(msgs, tokenize=False)
    assert (tmp_path / "o" / "examples.jsonl").read_text().count("plain words") == 1
    # examples.jsonl written before the change (text and rendered both present) still reads the same
    assert example_text({"text": "a", "rendered": "a"}) == "a"


def test_truncation_is_recorded(tmp_path, tok):
    long = " ".join(["word"] * 50)
    prepare(write_jsonl(tmp_path / "d.jsonl", [{"text": long}, {"text": "short"}]), tok, tmp_path / "o", max_length=8)
    ex = load_examples(tmp_path / "o" / "examples.jsonl")
    assert ex[0]["truncated"] and ex[0]["n_tokens"] == 8 and ex[0]["n_tokens_full"] > 8
    assert not ex[1]["truncated"] and ex[1]["n_tokens"] == ex[1]["n_tokens_full"]
    assert np.diff(load_tokens(tmp_path / "o")[1]).tolist() == [8, ex[1]["n_tokens"]]


def test_csv(tmp_path, tok):
    p = tmp_path / "d.csv"
    p.write_text('id,split,text,extra\nx,s1,"hello, world",1\ny,s2,bye,2\n', encoding="utf-8")
    prepare(p, tok, tmp_path / "o")
    ex = load_examples(tmp_path / "o" / "examples.jsonl")
    assert [(e["id"], e["split"], e["text"], e["extra"]) for e in ex] == [("x", "s1", "hello, world", 1),
                                                                          ("y", "s2", "bye", 2)]


def test_csv_numbers_are_inferred_in_metadata_only(tmp_path, tok):
    p = tmp_path / "d.csv"
    p.write_text("id,split,text,n,score,zip,note,big,empty\n"
                 "1,2,3,-4,0.25,007,1.,1e999,\n"
                 "05,s,x,0,-1.5e-3,+5,.5,12345678901234567890,\n", encoding="utf-8")
    prepare(p, tok, tmp_path / "o")
    a, b = load_examples(tmp_path / "o" / "examples.jsonl")
    assert (a["id"], a["split"], a["text"], b["id"]) == ("1", "2", "3", "05")  # never converted
    assert (a["n"], a["score"], b["n"], b["score"]) == (-4, 0.25, 0, -1.5e-3)
    assert type(a["n"]) is int and type(a["score"]) is float
    assert (a["zip"], a["note"], a["big"], a["empty"]) == ("007", "1.", "1e999", "")
    assert (b["zip"], b["note"], b["big"], b["empty"]) == ("+5", ".5", 12345678901234567890, "")


@pytest.mark.parametrize("cell,want", [("42", 42), ("-7", -7), ("3.5", 3.5), ("2E3", 2000.0), ("0", 0),
                                       ("007", "007"), ("-0.50", -0.5), ("1_000", "1_000"), (" 1", " 1"),
                                       ("nan", "nan"), ("inf", "inf"), ("0x10", "0x10"), ("", ""), ("1.5.2", "1.5.2")])
def test_csv_value(cell, want):
    got = csv_value(cell)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_byte_order_mark_is_ignored(tmp_path, tok, fmt):
    body = ('id,split,text,label\na1,s,hello,1\na2,s,bye,0\n' if fmt == "csv" else
            '{"id": "a1", "split": "s", "text": "hello", "label": 1}\n{"id": "a2", "split": "s", "text": "bye"}\n')
    (tmp_path / "plain").mkdir()
    (tmp_path / "bom").mkdir()
    (tmp_path / "plain" / f"d.{fmt}").write_text(body, encoding="utf-8")
    (tmp_path / "bom" / f"d.{fmt}").write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    for d in ("plain", "bom"):
        prepare(tmp_path / d / f"d.{fmt}", tok, tmp_path / d / "o")
    with_bom = (tmp_path / "bom" / "o" / "examples.jsonl").read_text(encoding="utf-8")
    assert with_bom == (tmp_path / "plain" / "o" / "examples.jsonl").read_text(encoding="utf-8")
    assert [e["id"] for e in load_examples(tmp_path / "bom" / "o" / "examples.jsonl")] == ["a1", "a2"]


@pytest.mark.parametrize("line,field", [
    ('{"text": "ab\\ud800c"}', r"field 'text' is not valid Unicode \(lone surrogate U\+D800 at character 2\)"),
    ('{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "\\udfff"}]}',
     r"field 'messages\[1\]\.content' is not valid Unicode \(lone surrogate U\+DFFF"),
    ('{"messages": [{"role": "\\ud83d", "content": "x"}]}', r"field 'messages\[0\]\.role' is not valid Unicode"),
    ('{"text": "ok", "meta": {"tags": ["a", "\\udc00"]}}', r"field 'meta\.tags\[1\]' is not valid Unicode"),
    ('{"text": "ok", "x\\ud800": 1}', r"a key of the record is not valid Unicode \(lone surrogate U\+D800"),
])
def test_lone_surrogate_is_refused(tmp_path, tok, line, field):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: " + field):
        prepare(p, tok, tmp_path / "o")
    assert not (tmp_path / "o" / "examples.jsonl").exists()


def test_lone_surrogate_in_csv_messages_cell(tmp_path, tok):
    p = tmp_path / "d.csv"
    p.write_text('id,messages\nq,"[{""role"": ""user"", ""content"": ""\\ud800""}]"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv:2: field 'messages\[0\]\.content' is not valid Unicode"):
        prepare(p, tok, tmp_path / "o")


@pytest.mark.parametrize("line,reason", [
    ('{"text": "ok"}\n{"text": "broken"\n', r"d.jsonl:2: invalid JSON"),
    ('{"text": "ok"}\n[1, 2]\n', r"d.jsonl:2: expected a JSON object"),
    ('{"text": "ok"}\n\n{"label": 1}\n', r"d.jsonl:3: a record needs exactly one of 'text' or 'messages'"),
    ('{"text": 5}\n', r"d.jsonl:1: 'text' must be a string"),
    ('{"text": ""}\n', r"d.jsonl:1: 'text' is empty"),
    ('{"messages": [{"role": "user"}]}\n', r"d.jsonl:1: messages\[0\] must be an object"),
    ('{"text": "a", "id": "x"}\n{"text": "b", "id": "x"}\n', r"d.jsonl:2: duplicate id 'x' \(first used on line 1\)"),
    ('{"text": "a", "index": 3}\n', r"d.jsonl:1: field 'index' is reserved"),
    ('{"text": "a", "split": ""}\n', r"d.jsonl:1: 'split' must be"),
    ('', r"d.jsonl: the data set has no records"),
])
def test_malformed_records_name_file_line_reason(tmp_path, tok, line, reason):
    p = tmp_path / "d.jsonl"
    p.write_text(line, encoding="utf-8")
    with pytest.raises(DataError, match=reason):
        prepare(p, tok, tmp_path / "o")
    assert not (tmp_path / "o" / "examples.jsonl").exists()


def test_not_utf8(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        prepare(p, tok, tmp_path / "o")


def test_messages_without_chat_template(tmp_path, tok):
    tok2 = type(tok).from_pretrained(tok.name_or_path)
    tok2.chat_template = None
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="d.jsonl:1: .*no chat template"):
        prepare(p, tok2, tmp_path / "o")


def test_generation_prompt_ends_chat_records_at_the_answer(tmp_path, model_factory):
    from layerscope.data.dataset import load_examples, load_tokens, prepare
    from layerscope.models.loading import load_tokenizer
    from tests.conftest import write_jsonl

    tok = load_tokenizer({"model": model_factory("llama-tiny")})
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}, {"text": "plain text"}])
    got = {}
    for flag in (False, True):
        prepare(data, tok, tmp_path / str(flag), add_generation_prompt=flag)
        ex = load_examples(tmp_path / str(flag) / "examples.jsonl")
        ids, offsets = load_tokens(tmp_path / str(flag))
        assert ex[0]["rendered"] == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=flag)
        got[flag] = (ids[offsets[0]:offsets[1]].tolist(), ids[offsets[1]:offsets[2]].tolist())
    with_cue, without = got[True][0], got[False][0]
    assert len(with_cue) > len(without) and with_cue[:len(without)] == without  # the cue comes after the turn
    assert got[True][1] == got[False][1]  # text records are not chat: unchanged


def test_chat_records_record_role_prompt_and_response_spans(tmp_path, model_factory):
    from layerscope.data.dataset import load_examples, load_tokens, prepare
    from layerscope.models.loading import load_tokenizer
    from tests.conftest import write_jsonl

    tok = load_tokenizer({"model": model_factory("llama-tiny")})
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, who are you?"},
            {"role": "assistant", "content": "A small model."}, {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You are welcome!"}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}, {"text": "plain text"}])
    prepare(data, tok, tmp_path / "ds", max_length=512)
    chat, plain = load_examples(tmp_path / "ds/examples.jsonl")
    ids, offsets = load_tokens(tmp_path / "ds")
    seq = ids[offsets[0]:offsets[1]].tolist()
    text = lambda rr: [tok.decode(seq[a:b]) for a, b in rr]  # noqa: E731
    sp = chat["spans"]
    assert text(sp["role:system"]) == ["Be brief."] and text(sp["role:user"]) == ["Hi there, who are you?", "Thanks"]
    assert text(sp["response"]) == text(sp["role:assistant"])
    assert text(sp["response"])[0] == "A small model."
    # the prompt is everything before the first reply: template tokens, system and user turns, the cue
    assert sp["prompt"] == [[0, sp["response"][0][0]]] and tok.decode(seq[:sp["prompt"][0][1]]).endswith("<|assistant|>\n")
    # truncated: no span reaches past the stored tokens, and a reply cut off entirely is no reply
    prepare(data, tok, tmp_path / "cut", max_length=sp["response"][0][0])
    cut = load_examples(tmp_path / "cut/examples.jsonl")[0]
    assert cut["truncated"] and cut["spans"]["response"] == [] and cut["spans"]["prompt"] == [[0, cut["n_tokens"]]]
    assert all(b <= cut["n_tokens"] for rr in cut["spans"].values() for _, b in rr)
    assert plain["spans"] == {"prompt": [[0, plain["n_tokens"]]], "response": []}
