"""Reading prompt sets (JSONL or CSV), rendering chat messages and tokenizing them (ragged).

Output of ``prepare``: ``token_ids.npy`` (flat int32 ids), ``offsets.npy`` (int64, one more
than the examples: example i is ids[offsets[i]:offsets[i+1]]) and ``examples.jsonl`` (one
record per example, in store order: grouped by split, in order of first appearance). The text
the model saw is stored once: ``text`` for text records, ``rendered`` (the chat template's
output, next to ``messages``) for chat records; ``example_text`` returns whichever it is.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from layerscope.errors import DataError
from layerscope.fileio import atomic_write_bytes, atomic_write_text

log = logging.getLogger("layerscope.data.dataset")

# Keys LayerScope adds to examples ("rendered" only to chat records); a data set may not use them for its own fields.
GENERATED = ("index", "rendered", "n_tokens", "n_tokens_full", "truncated", "char_length", "source_line", "spans")
# CSV columns that keep their cell as a string; other cells that look like numbers become numbers.
CSV_STRING_FIELDS = ("id", "split", "text", "messages")
# A JSON number (no leading zeros, no '+', no bare '.5'), so a CSV cell converts exactly when
# the same value written in JSONL would be a number; "007", "+5", "1." or " 5" stay strings.
_CSV_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def example_text(ex: dict[str, Any]) -> str:
    """The text the model saw for an example of ``examples.jsonl``: the rendered chat, else ``text``."""
    return ex["rendered"] if "rendered" in ex else ex["text"]


def csv_value(cell: str) -> str | int | float:
    """A CSV metadata cell as JSON would have it: int or float if it is a JSON number, else the string.

    Empty cells stay empty strings; floats that overflow to infinity stay strings.
    """
    m = _CSV_NUMBER.fullmatch(cell)
    if m is None:
        return cell
    if m.group(1) is None and m.group(2) is None:
        return int(cell)
    x = float(cell)
    return x if math.isfinite(x) else cell


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "csv" if path.suffix.lower() == ".csv" else "jsonl"


def read_records(path: str | os.PathLike, fmt: str = "auto") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) pairs; raise DataError naming the file and line of a malformed record."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    try:
        # utf-8-sig: a leading byte-order mark (Excel, Notepad) is dropped, not read as part of the header.
        f = open(path, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise DataError(f"{path}: cannot open data set: {e.strerror}") from e
    with f:
        try:
            if fmt == "csv":
                reader = csv.DictReader(f)
                if not reader.fieldnames:
                    raise DataError(f"{path}:1: CSV file has no header row")
                for row in reader:
                    if None in row:
                        raise DataError(f"{path}:{reader.line_num}: row has more cells than the header")
                    if "messages" in row and row["messages"]:
                        try:
                            row["messages"] = json.loads(row["messages"])
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}:{reader.line_num}: 'messages' cell is not JSON: {e.msg}") from e
                    yield reader.line_num, {k: v if k in CSV_STRING_FIELDS else csv_value(v) for k, v in row.items()
                                            if not (k == "messages" and v == "")}
            else:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from e
                    if not isinstance(rec, dict):
                        raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
                    yield n, rec
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def _check_record(path: Path, line: int, rec: dict[str, Any]) -> None:
    where = f"{path}:{line}"
    has_text, has_msgs = "text" in rec, "messages" in rec
    if has_text == has_msgs:
        raise DataError(f"{where}: a record needs exactly one of 'text' or 'messages'"
                        + (" (it has both)" if has_text else " (it has neither)"))
    if has_text and not isinstance(rec["text"], str):
        raise DataError(f"{where}: 'text' must be a string, got {type(rec['text']).__name__}")
    if has_text and not rec["text"]:
        raise DataError(f"{where}: 'text' is empty")
    if has_msgs:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for j, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: messages[{j}] must be an object with string 'role' and 'content'")
    for key in ("id", "split"):
        if key in rec and not isinstance(rec[key], (str, int)) or (key in rec and rec[key] in ("", None)):
            raise DataError(f"{where}: '{key}' must be a non-empty string or integer")
    for key in GENERATED:
        if key in rec:
            raise DataError(f"{where}: field '{key}' is reserved for LayerScope's own metadata; rename it")
    # JSON may escape a lone surrogate ("\ud800"): the tokenizer and the UTF-8 writer would fail on it later.
    bad = _lone_surrogate(rec)
    if bad is not None:
        field, s, i = bad
        raise DataError(f"{where}: {field} is not valid Unicode (lone surrogate U+{ord(s[i]):04X} at character {i})")


def _lone_surrogate(obj: Any, field: str = "") -> tuple[str, str, int] | None:
    """(field description, string, index) of the first string (or key) holding a lone surrogate, else None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"field '{field}'", obj, e.start
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            name = f"{field}.{k}" if field else str(k)
            if isinstance(k, str) and (bad := _lone_surrogate(k, name)) is not None:
                return f"a key of {'field ' + repr(field) if field else 'the record'}", k, bad[2]
            if (bad := _lone_surrogate(v, name)) is not None:
                return bad
    elif isinstance(obj, list):
        for j, v in enumerate(obj):
            if (bad := _lone_surrogate(v, f"{field}[{j}]")) is not None:
                return bad
    return None


def identify(ex: dict[str, Any], path: Path, line: int, seen: dict[str, int], default_split: str) -> dict[str, Any]:
    """Give a record its split, id (``{file stem}-{n}`` where it has none) and source line; refuse
    an id ``seen`` (id -> line) on an earlier line."""
    ex["split"] = str(ex.get("split", default_split))
    ex["id"] = str(ex["id"]) if "id" in ex else f"{path.stem}-{len(seen)}"
    if ex["id"] in seen:
        raise DataError(f"{path}:{line}: duplicate id {ex['id']!r} (first used on line {seen[ex['id']]})")
    seen[ex["id"]] = line
    ex["source_line"] = line
    return ex


def prepare(path: str | os.PathLike, tokenizer, out_dir: str | os.PathLike, fmt: str = "auto",
            default_split: str = "all", max_length: int = 512, add_special_tokens: bool = True,
            add_generation_prompt: bool = False) -> dict[str, Any]:
    """Read, validate, render and tokenize a data set into ``out_dir``; return a small summary.

    ``add_generation_prompt``: chat (``messages``) records end with the template's cue for the
    assistant's turn, so their last token is where the model starts its answer."""
    path = Path(path)
    out = Path(out_dir)
    examples: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for line, rec in read_records(path, fmt):
        _check_record(path, line, rec)
        ex = identify(dict(rec), path, line, seen, default_split)
        if "messages" in rec:
            if not getattr(tokenizer, "chat_template", None):
                raise DataError(f"{path}:{line}: record uses 'messages' but the model's tokenizer has no chat template")
            ex["rendered"] = tokenizer.apply_chat_template(rec["messages"], tokenize=False,
                                                           add_generation_prompt=add_generation_prompt)
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: the data set has no records")

    split_order = list(dict.fromkeys(ex["split"] for ex in examples))
    examples.sort(key=lambda ex: split_order.index(ex["split"]))  # stable: keeps file order inside a split
    ids_list = []
    for ex in examples:
        # Chat templates already contain the special tokens they need.
        special = add_special_tokens and "messages" not in ex
        enc = _encode(tokenizer, example_text(ex), special, with_offsets="messages" in ex)
        ids = enc["input_ids"]
        if not ids:
            raise DataError(f"{path}:{ex['source_line']}: the text tokenizes to no tokens")
        ex["n_tokens_full"] = len(ids)
        ex["truncated"] = len(ids) > max_length
        ids = ids[:max_length]
        ex["n_tokens"] = len(ids)
        ex["spans"] = chat_spans(ex, enc.get("offset_mapping"), len(ids)) if "messages" in ex else {
            "prompt": [[0, len(ids)]], "response": []}
        ex["char_length"] = len(example_text(ex))
        ids_list.append(np.asarray(ids, dtype=np.int64))
    offsets = write_tokenized(out, examples, ids_list, path)
    splits = {s: {"examples": 0, "tokens": 0} for s in split_order}
    for ex in examples:
        splits[ex["split"]]["examples"] += 1
        splits[ex["split"]]["tokens"] += ex["n_tokens"]
    n_trunc = sum(ex["truncated"] for ex in examples)
    log.info("prepared %d examples, %d tokens, splits %s, %d truncated to %d tokens",
             len(examples), int(offsets[-1]), splits, n_trunc, max_length)
    return {"examples": len(examples), "tokens": int(offsets[-1]), "splits": splits, "truncated": n_trunc}


def _encode(tokenizer, text: str, special: bool, with_offsets: bool) -> dict[str, Any]:
    if with_offsets and getattr(tokenizer, "is_fast", False):
        return tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    return tokenizer(text, add_special_tokens=special)


def chat_spans(ex: dict[str, Any], offsets: list[tuple[int, int]] | None, n: int) -> dict[str, list[list[int]]]:
    """Token ranges [start, end) of a chat record: ``role:NAME`` (each message's content, by its
    role), ``response`` (the assistant's messages) and ``prompt`` (everything before the first
    assistant message: the template's own tokens, the system and user turns, the assistant's cue).

    Ranges are found from the rendered text (each message's content, in order) and the
    tokenizer's character offsets; a token belongs to a message where its characters overlap the
    content. Without character offsets (a slow tokenizer) only ``prompt`` (everything) is known."""
    if offsets is None:
        return {"prompt": [[0, n]], "response": []}
    text, pos = ex["rendered"], 0
    spans: dict[str, list[list[int]]] = {}
    first_reply = n
    for m in ex["messages"]:
        c0 = text.find(m["content"], pos) if m["content"] else -1
        if c0 < 0:
            continue
        c1 = c0 + len(m["content"])
        pos = c1
        toks = [i for i, (a, b) in enumerate(offsets[:n]) if a < c1 and b > c0 and b > a]
        if not toks:
            continue
        rng = [toks[0], toks[-1] + 1]
        spans.setdefault(f"role:{m['role']}", []).append(rng)
        if m["role"] == "assistant":
            spans.setdefault("response", []).append(rng)
            first_reply = min(first_reply, rng[0])
    spans["prompt"] = [[0, first_reply]] if first_reply else []
    spans.setdefault("response", [])
    return spans


def possible_spans(path: str | os.PathLike, fmt: str, wanted: set[str]) -> set[str]:
    """Which of the span names ``wanted`` some record of a data set can have: ``prompt`` any record;
    ``response`` a chat record with an assistant message, ``role:NAME`` one with a message of that
    role (with content). Reads records only until every wanted name is found."""
    found = {"prompt"} & wanted
    for _, rec in read_records(path, fmt):
        if found >= wanted:
            break
        msgs = rec.get("messages")
        for m in msgs if isinstance(msgs, list) else []:
            if isinstance(m, dict) and m.get("content") and isinstance(m.get("role"), str):
                found |= {f"role:{m['role']}"} | ({"response"} if m["role"] == "assistant" else set())
    return found & wanted


def load_spans(dataset_dir: str | os.PathLike) -> list[dict[str, list[list[int]]] | None]:
    """Each example's recorded spans (None where an older LayerScope prepared it), in store order."""
    return [ex.get("spans") for ex in load_examples(Path(dataset_dir) / "examples.jsonl")]


def write_tokenized(out_dir: str | os.PathLike, examples: list[dict[str, Any]], ids_list: list[np.ndarray],
                    source: str | os.PathLike, answer_index: np.ndarray | None = None) -> np.ndarray:
    """Write a tokenized data set (examples in store order, with their ids) into ``out_dir``; return the offsets.

    ``answer_index``: per example, the position whose logits give its answer (prompted passes);
    without it, the last token is."""
    lengths = np.array([len(x) for x in ids_list], dtype=np.int64)
    offsets = np.zeros(len(ids_list) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(ids_list)
    if flat.max() >= 2**31:
        raise DataError(f"{source}: token id {int(flat.max())} does not fit int32")
    for i, ex in enumerate(examples):
        ex["index"] = i
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if answer_index is not None:
        _save_npy(out / "answer_index.npy", np.asarray(answer_index, dtype=np.int64))
    _save_npy(out / "token_ids.npy", flat.astype(np.int32))
    _save_npy(out / "offsets.npy", offsets)
    lines = []
    for ex in examples:
        # Text records keep their 'text' (the text the model saw); chat records add 'rendered'.
        head = {k: ex[k] for k in ("index", "id", "split", "n_tokens", "n_tokens_full", "truncated", "char_length",
                                   "source_line", "rendered") if k in ex}
        rest = {k: v for k, v in ex.items() if k not in head}
        lines.append(json.dumps({**head, **rest}, ensure_ascii=False))
    atomic_write_text(out / "examples.jsonl", "\n".join(lines) + "\n")
    return offsets


def load_answer_index(dataset_dir: str | os.PathLike, offsets: np.ndarray) -> np.ndarray:
    """Per example, the index of its answer position within it: ``answer_index.npy`` where a
    prompted pass wrote one, else the last token."""
    path = Path(dataset_dir) / "answer_index.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    return np.diff(offsets) - 1


def _save_npy(path: Path, arr: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def load_tokens(dataset_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(flat token ids, offsets) written by ``prepare``; never unpickles."""
    d = Path(dataset_dir)
    return (np.load(d / "token_ids.npy", allow_pickle=False), np.load(d / "offsets.npy", allow_pickle=False))


def load_examples(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
