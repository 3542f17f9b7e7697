"""Prompted passes: question records, the prompt templates of each pass, and their tokens.

A task data set holds one question per record (JSONL or CSV): ``question``, ``options`` (a list,
lettered A, B, C...; or an object keyed by consecutive letters from A), optional ``answer`` (a
letter), ``id``, ``split`` and any other fields. Each pass renders every question through its
template (``{question}``, ``{options}``, ``{bins}`` for confidence passes, or any field of the
record), through the tokenizer's chat template where it has one (the prompt is the user's turn
and ends at the assistant's cue), else followed by the pass's ``cue`` (``"\\nAnswer:"``).

The answer distribution is read at the prompt's last token, over one token per choice: the
first token of the choice's label as the model would write it there (after a space when the
prompt ends without one and no chat template is used). Labels whose first tokens coincide are
refused: their probabilities could not be told apart.
"""

from __future__ import annotations

import logging
import os
import string
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.data.dataset import GENERATED, detect_format, identify, read_records, write_tokenized
from layerscope.errors import ConfigError, DataError
from layerscope.fileio import write_json
from layerscope.passes.features import surface_features

log = logging.getLogger("layerscope.passes.prompts")

LETTERS = string.ascii_uppercase
OPTION_INTRO = "{question}\n\n{options}\n\n"
BUILTIN: dict[str, dict[str, Any]] = {
    "mcq": {
        "answers": "options",
        "template": "Answer the following multiple-choice question.\n\n" + OPTION_INTRO
                    + "Reply with the letter of the correct option only.",
    },
    "self_confidence": {
        "answers": "confidence",
        "template": "Here is a multiple-choice question.\n\n" + OPTION_INTRO
                    + "Do not answer it. How likely is it that you would answer it correctly? Choose a range:\n"
                    "{bins}\n\nReply with the letter of the range only.",
    },
    "other_confidence": {
        "answers": "confidence",
        "template": "Here is a multiple-choice question.\n\n" + OPTION_INTRO
                    + "Do not answer it. How likely is it that another AI model like you would answer it correctly? "
                    "Choose a range:\n{bins}\n\nReply with the letter of the range only.",
    },
}
# Fields a task record may not use for its own data: LayerScope writes them into examples.jsonl.
PASS_FIELDS = ("prompt_tokens", "answer_token_index", "output_tokens", "features")
QUESTION_FIELDS = ("question", "options", "answer", "id", "split")


def template_fields(template: str, key: str) -> list[str]:
    """The fields a template uses; a ConfigError naming ``key`` if it is empty or malformed."""
    if not template.strip():
        raise ConfigError(f"config error: {key}: the template is empty")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"config error: {key}: {e} (write a literal brace as {{{{ or }}}})") from e
    for f in fields:
        if not f.isidentifier():
            raise ConfigError(f"config error: {key}: {{{f}}} is not a field name; fields are {{question}}, "
                              "{options}, {bins} or a field of the task's records")
    return fields


def resolve_pass(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A pass's settings with the built-in pass of the same name filling what it leaves out, checked."""
    key = f"passes.{name}"
    spec = {**BUILTIN.get(name, {}), **{k: v for k, v in spec.items() if v is not None}}
    for what in ("template", "answers"):
        if what not in spec:
            raise ConfigError(f"config error: {key}.{what}: required for a pass that is none of the built-in "
                              f"passes ({', '.join(BUILTIN)})")
    fields = template_fields(spec["template"], f"{key}.template")
    if "bins" in fields and spec["answers"] != "confidence":
        raise ConfigError(f"config error: {key}.template: {{bins}} lists confidence ranges, and the pass answers "
                          f"with {spec['answers']}; set answers: confidence or drop {{bins}}")
    if "answer" in fields:
        raise ConfigError(f"config error: {key}.template: {{answer}} would show the model the correct answer")
    spec.setdefault("bins", 8)
    spec.setdefault("cue", "\nAnswer:")
    spec["name"] = name
    return spec


def bin_ranges(n: int) -> list[tuple[float, float]]:
    """Confidence ranges, in percent, of ``n`` equal bins from 0 to 100 (lettered A, B, ...)."""
    return [(100 * i / n, 100 * (i + 1) / n) for i in range(n)]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def bins_text(n: int) -> str:
    return "\n".join(f"{LETTERS[i]}. {_fmt(lo)}-{_fmt(hi)}%" for i, (lo, hi) in enumerate(bin_ranges(n)))


def options_text(options: dict[str, str]) -> str:
    return "\n".join(f"{k}. {v}" for k, v in options.items())


def check_question(where: str, rec: dict[str, Any]) -> dict[str, str]:
    """Validate one task record; return its options keyed by letter. ``where`` is FILE:LINE."""
    q = rec.get("question")
    if not isinstance(q, str) or not q.strip():
        raise DataError(f"{where}: a task record needs a non-empty string 'question'"
                        + ("" if "question" in rec else " (it has none)"))
    opts = rec.get("options")
    if isinstance(opts, list):
        if len(opts) > len(LETTERS):
            raise DataError(f"{where}: {len(opts)} options, at most {len(LETTERS)} (A-Z)")
        opts = {LETTERS[i]: v for i, v in enumerate(opts)}
    elif isinstance(opts, dict):
        labels = list(opts)
        for i, label in enumerate(labels):
            if label not in LETTERS:
                raise DataError(f"{where}: option label {label!r} is not a capital letter A-Z")
        expected = list(LETTERS[:len(labels)])
        if sorted(labels) != expected:
            missing = next(x for x in expected if x not in labels)
            raise DataError(f"{where}: option {missing} is missing (options are lettered from A without gaps; "
                            f"this record has {', '.join(sorted(labels))})")
        opts = {k: opts[k] for k in expected}
    else:
        raise DataError(f"{where}: 'options' must be a list of strings or an object keyed A, B, C..."
                        + ("" if "options" in rec else " (it has none)"))
    if len(opts) < 2:
        raise DataError(f"{where}: a question needs at least two options, this one has {len(opts)}")
    for k, v in opts.items():
        if not isinstance(v, str) or not v.strip():
            raise DataError(f"{where}: option {k} is missing (empty or not a string)")
    if "answer" in rec and rec["answer"] not in (None, ""):
        if rec["answer"] not in opts:
            raise DataError(f"{where}: answer {rec['answer']!r} is not among the options ({', '.join(opts)})")
    for key in ("id", "split"):
        if key in rec and (not isinstance(rec[key], (str, int)) or rec[key] in ("", None)):
            raise DataError(f"{where}: '{key}' must be a non-empty string or integer")
    for key in (*GENERATED, *PASS_FIELDS):
        if key in rec:
            raise DataError(f"{where}: field '{key}' is reserved for LayerScope's own metadata; rename it")
    return opts


def read_questions(path: str | os.PathLike, fmt: str = "auto", default_split: str = "all") -> list[dict[str, Any]]:
    """The task's questions, checked, in store order (grouped by split, file order inside one)."""
    path = Path(path)
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    csv_file = detect_format(path, fmt) == "csv"
    for line, rec in read_records(path, fmt):
        if csv_file and isinstance(rec.get("options"), str):
            import json

            try:  # a CSV cell holds the options as JSON
                rec["options"] = json.loads(rec["options"])
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line}: 'options' cell is not JSON: {e.msg}") from e
        opts = check_question(f"{path}:{line}", rec)
        q = identify({k: v for k, v in rec.items() if k not in ("options", "answer")}, path, line, seen, default_split)
        q["options"] = opts
        q["answer"] = rec.get("answer") or None
        out.append(q)
    if not out:
        raise DataError(f"{path}: the task has no questions")
    order = list(dict.fromkeys(q["split"] for q in out))
    out.sort(key=lambda q: order.index(q["split"]))
    return out


def render(spec: dict[str, Any], q: dict[str, Any], tokenizer, chat: bool, where: str) -> str:
    """The text the model sees for one question in one pass."""
    values = {**{k: v for k, v in q.items() if k not in ("answer",)}, "options": options_text(q["options"])}
    if spec["answers"] == "confidence":
        values["bins"] = bins_text(spec["bins"])
    try:
        prompt = spec["template"].format_map(values)
    except KeyError as e:
        raise DataError(f"{where}: the template of pass {spec['name']!r} uses {{{e.args[0]}}}, which this record "
                        "does not have") from e
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt + spec["cue"]


def choice_labels(spec: dict[str, Any], q: dict[str, Any]) -> list[str]:
    return list(q["options"]) if spec["answers"] == "options" else list(LETTERS[:spec["bins"]])


def choice_ids(tokenizer, labels: list[str], prefix: str) -> list[int]:
    """The first token of each label written after the prompt; refused where two labels share it."""
    ids = []
    for label in labels:
        toks = tokenizer(prefix + label, add_special_tokens=False)["input_ids"]
        ids.append(int(toks[0]))
    if len(set(ids)) < len(ids):
        same = [l for l, i in zip(labels, ids) if ids.count(i) > 1]
        raise DataError(f"choices {', '.join(same)} start with the same token ({ids[labels.index(same[0])]}); "
                        "their probabilities cannot be told apart: use labels that tokenize apart")
    return ids


def uses_chat(tokenizer, chat: str | bool) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat is True and not has:
        raise ConfigError("config error: task.chat: true, and the model's tokenizer has no chat template")
    return has if chat == "auto" else bool(chat)


def prepare_pass(task: dict[str, Any], spec: dict[str, Any], tokenizer, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Render and tokenize every question of the task for one pass into ``out_dir`` (the format
    ``data.dataset.prepare`` writes, plus ``choices.json``); return a small summary."""
    path = Path(task["path"])
    questions = read_questions(path, task["format"], task["default_split"])
    chat = uses_chat(tokenizer, task["chat"])
    examples, ids_list = [], []
    cache: dict[tuple[str, ...], list[int]] = {}
    choices = []
    for q in questions:
        where = f"{path}:{q['source_line']}"
        text = render(spec, q, tokenizer, chat, where)
        ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
        if len(ids) > task["max_length"]:
            raise DataError(f"{where}: the {spec['name']} prompt is {len(ids)} tokens, more than task.max_length "
                            f"{task['max_length']}; cutting it would cut off where the model answers")
        labels = choice_labels(spec, q)
        prefix = "" if chat or text[-1:].isspace() else " "
        key = (prefix, *labels)
        if key not in cache:
            try:
                cache[key] = choice_ids(tokenizer, labels, prefix)
            except DataError as e:
                raise DataError(f"{where}: {e}") from e
        choices.append({"labels": labels, "token_ids": cache[key]})
        ex = {"id": q["id"], "split": q["split"], "n_tokens": len(ids), "n_tokens_full": len(ids), "truncated": False,
              "char_length": len(text), "source_line": q["source_line"], "text": text,
              "spans": {"prompt": [[0, len(ids)]], "response": []},
              "question": q["question"], "options": q["options"], "answer": q["answer"],
              "features": surface_features(q["question"],
                                           tokenizer(q["question"], add_special_tokens=False)["input_ids"]),
              **{k: v for k, v in q.items() if k not in (*QUESTION_FIELDS, "source_line")}}
        examples.append(ex)
        ids_list.append(np.asarray(ids, dtype=np.int64))
    offsets = write_tokenized(out_dir, examples, ids_list, path,
                              answer_index=np.array([len(x) - 1 for x in ids_list], dtype=np.int64))
    write_json(Path(out_dir) / "choices.json", {"pass": spec["name"], "answers": spec["answers"], "chat": chat,
                                                 "bins": spec["bins"], "choices": choices})
    log.info("pass %s: %d questions, %d prompt tokens (%s)", spec["name"], len(examples), int(offsets[-1]),
             "chat template" if chat else "plain text + cue")
    return {"questions": len(examples), "tokens": int(offsets[-1]), "chat": chat}
