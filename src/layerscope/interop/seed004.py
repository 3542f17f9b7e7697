"""Seed 004's layout ("Activation Collection for Introspection Experiments"): every token.

    OUT/run_config.json                   the run's run_config.json plus an ``export`` block
    OUT/{pass}/metadata.json              a list, one record per question (example), in row order
    OUT/{pass}/activations_layer_XX.npy   float16 [n_questions, seq_len, hidden]

A run with prompted passes (``passes:``) is seed 004's own experiment: each pass becomes one of the
guide's pass directories, the built-in ones under the guide's names (``mcq`` -> ``mcq``,
``self_confidence`` -> ``self_conf``, ``other_confidence`` -> ``other_conf``), any other under its
own name; its records are the pass's ``metadata.json`` records (every question, all splits, in
store order; ``split`` says which). Exporting a pass directory (``results/RUN/mcq``) writes that
pass alone. The run's own data set is not exported then (export a run without passes for it).
For a run without passes, each split plays a pass directory, and its records are built from the
data set's records.

``seq_len`` is the longest example (prompt + reply) of the pass or split. Padding is on the left
by default, so ``acts[i, -1]`` is example i's last token as the guide reads it (``final_token_act
= acts[42, -1]``); ``--padding right`` puts tokens first. Padded positions hold 0. Each record
says where its tokens are: ``token_start`` (first real position) and ``n_tokens``; a pass's
``answer_token_index`` (and ``confidence_token_index``) are positions in the exported rows, so
``acts[i, metadata[i]["answer_token_index"]]`` is the answer position's activation (LayerScope's
own metadata.json counts them from the example's first token: subtract ``token_start``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from layerscope.data.dataset import GENERATED, example_text
from layerscope.errors import LayerScopeError
from layerscope.fileio import read_json, write_json
from layerscope.interop.common import (NpyWriter, check_split_names, example_blocks, narrow, select_arrays,
                                       source_info, token_blocks)
from layerscope.passes.runs import list_passes, pass_settings
from layerscope.store.reader import Run
from layerscope.store.rows import is_span

SITE = "resid_post"
PADDING = ("left", "right")
# Every field the guide lists for a record, in its order. Those LayerScope cannot know (generation,
# logits, parsed answers) come from the data set record when it has them, else null, so the
# guide's loaders (q["parsed_answer"], q["is_correct"], q["entropy"]) find every key.
FIELDS = ("question_id", "question_text", "options", "correct_answer_letter", "model_name", "checkpoint_id",
          "prompt_type", "prompt_text", "temperature", "top_p", "max_new_tokens", "output_text", "parsed_answer",
          "is_correct", "logits", "probs", "entropy", "logit_margin", "answer_token_index",
          "confidence_token_index", "self_confidence", "other_confidence", "char_length", "token_length",
          "question_type", "has_negation", "has_ambiguity", "token_rarity_mean", "token_rarity_max")
# Fields that describe the run, not the question: always LayerScope's
FROM_RUN = ("model_name", "checkpoint_id", "prompt_text")
# The guide's directory for each built-in prompted pass; other passes keep their names.
PASS_DIRS = {"mcq": "mcq", "self_confidence": "self_conf", "other_confidence": "other_conf"}
# A pass's record fields that are positions within its example, written as positions in the padded rows
POSITION_FIELDS = ("answer_token_index", "confidence_token_index")


def _check_positions(run: Run, arrays: list[tuple[int, str]], padding: str) -> None:
    if padding not in PADDING:
        raise LayerScopeError(f"--padding must be left or right, not {padding!r}")
    one = [(f"layer_{L:02d}/{s}", run.activations(L, s).positions) for L, s in arrays]
    one = [(k, p) for k, p in one if p != "all"]
    if one:
        where = f"{run.path}: " if run.questions is not None else ""
        modes = list(dict.fromkeys(p for _, p in one))
        held = " or ".join(f"the {p} position{'s' if is_span(p) else ''}" for p in modes)
        arrays = ", ".join(k if len(modes) == 1 else f"{k} ({p})" for k, p in one)
        raise LayerScopeError(f"{where}seed004 stores every token position, but {arrays} "
                              f"{'holds' if len(one) == 1 else 'hold'} {held} only; capture with "
                              "positions: all, leave it out with --layers, or export --format seed001 (last token)")


def check(run: Run, arrays: list[tuple[int, str]], padding: str) -> None:
    """Refuse what the layout cannot hold, before anything is written."""
    check_split_names(run, "seed004", reserved=("run_config.json",))
    _check_positions(run, arrays, padding)


def pass_dir_name(name: str) -> str:
    """The directory a prompted pass is exported to (PASS_DIRS, else its own name)."""
    return PASS_DIRS.get(name, name)


def passes_of(run: Run, variant: str | None = None) -> list[tuple[str, Run]]:
    """(pass name, its store) of every prompted pass the export writes: the run's passes, or the run
    itself when it is a pass directory; [] for a run without passes (exported split by split)."""
    if run.questions is not None:
        return [(run.path.name, run)]
    return [(n, Run(run.path / n, variant)) for n in list_passes(run.path)]


def check_passes(passes: list[tuple[str, Run]], layers, sites, padding: str) -> list[tuple[str, Run, list]]:
    """(pass name, store, arrays to write) per pass; refuses what the layout cannot hold, before
    anything is written: two passes in one directory, arrays without every position."""
    seen: dict[str, str] = {}
    plan = []
    for name, r in passes:
        d = pass_dir_name(name)
        if d in seen:
            builtin = ", ".join(f"{k} -> {v}" for k, v in PASS_DIRS.items())
            raise LayerScopeError(f"passes {seen[d]!r} and {name!r} would both be exported to {d}/; rename one "
                                  f"(the built-in passes map to {builtin})")
        seen[d] = name
        arrays = select_arrays(r, "seed004", layers, sites, format_sites=(SITE,))
        _check_positions(r, arrays, padding)
        plan.append((name, r, arrays))
    return plan


def record(run: Run, ex: dict[str, Any], ids: np.ndarray, token_start: int) -> dict[str, Any]:
    """One example as the guide's record: its fields first, then LayerScope's and the data set's own."""
    md = run.metadata
    own = {k: v for k, v in ex.items() if k not in GENERATED and k not in ("id", "split", "text")}
    derived = {
        "question_id": ex["id"],
        "question_text": example_text(ex),
        "model_name": md["model_name"],
        # the guide's "checkpoint/version": the adapter captured, else the model's resolved revision
        "checkpoint_id": (md.get("adapter") or {}).get("name") or md.get("model_revision"),
        "prompt_type": ex["split"],
        "prompt_text": example_text(ex),
        "char_length": ex["char_length"],
        "token_length": ex["n_tokens"],
        "token_rarity_mean": float(ids.mean()),
        "token_rarity_max": int(ids.max()),
    }
    out = {}
    for k in FIELDS:
        out[k] = derived[k] if k in FROM_RUN else own.get(k, derived.get(k))
    out.update({"id": ex["id"], "index": ex["index"], "split": ex["split"], "n_tokens": ex["n_tokens"],
                "token_start": token_start, "truncated": ex["truncated"]})
    out.update({k: v for k, v in own.items() if k not in out})
    return out


def write_rows(run: Run, arrays: list[tuple[int, str]], d: Path, e0: int, e1: int, padding: str, what: str,
               split: str | None = None) -> np.ndarray:
    """Write examples [e0, e1) of ``run`` (``split``'s view when given) as padded
    ``activations_layer_XX.npy`` files in ``d``, a few MiB of rows at a time; return each
    example's first real position (``token_start``)."""
    off = run.offsets
    d.mkdir(parents=True, exist_ok=True)
    lengths = np.diff(off[e0:e1 + 1])
    seq_len = int(lengths.max())
    starts = seq_len - lengths if padding == "left" else np.zeros_like(lengths)
    for layer, site in arrays:
        view = run.activations(layer, site, split=split)
        w = view.width
        npy = NpyWriter(d / f"activations_layer_{layer:02d}.npy", (e1 - e0, seq_len, w), np.float16)
        base = int(off[e0])
        for a, b in example_blocks(off, e0, e1, seq_len * w * 2):
            rows = narrow(view.rows(int(off[a]) - base, int(off[b]) - base), np.float16,
                          f"layer_{layer:02d}/{site} {what}", "seed004")
            block = np.zeros((b - a, seq_len, w), dtype=np.float16)
            for e in range(a, b):
                s = int(starts[e - e0])
                block[e - a, s:s + int(lengths[e - e0])] = rows[int(off[e] - off[a]):int(off[e + 1] - off[a])]
            npy.write(block)
        npy.close()
    return starts


def _run_config(run: Run) -> dict[str, Any]:
    return read_json(run.path / "run_config.json") if (run.path / "run_config.json").is_file() else {}


def write(run: Run, arrays: list[tuple[int, str]], dest: Path, padding: str = "left",
          variant: str | None = None) -> None:
    """Write every split's arrays and records under ``dest`` (a run without prompted passes)."""
    off = run.offsets
    seq_lens = {}
    for split, (e0, e1) in run.splits.items():
        d = dest / split
        starts = write_rows(run, arrays, d, e0, e1, padding, f"split {split!r}", split=split)
        seq_lens[split] = int(np.diff(off[e0:e1 + 1]).max())
        records = [record(run, run.examples[e], ids, int(starts[e - e0])) for e, ids in token_blocks(run, e0, e1)]
        write_json(d / "metadata.json", records)
    config = _run_config(run)
    config["export"] = {"format": "seed004", **source_info(run, variant), "site": SITE,
                        "layers": [L for L, _ in arrays], "padding_side": padding, "pad_value": 0.0,
                        "seq_len": seq_lens, "dtype": "float16"}
    write_json(dest / "run_config.json", config)


def pass_record(rec: dict[str, Any], token_start: int, n_tokens: int) -> dict[str, Any]:
    """A pass's question record as the guide's: its fields first (null where the pass has none), positions
    in the padded rows, then the rest of LayerScope's."""
    out = {k: rec.get(k) for k in FIELDS}
    for k in POSITION_FIELDS:
        if out[k] is not None:
            out[k] = int(out[k]) + token_start
    out.update({k: v for k, v in rec.items() if k not in out})
    out.update(token_start=token_start, n_tokens=n_tokens)
    return out


def write_passes(run: Run, plan: list[tuple[str, Run, list]], dest: Path, padding: str = "left",
                 variant: str | None = None) -> None:
    """Write each prompted pass of ``plan`` (check_passes) into its guide directory under ``dest``."""
    info = {}
    for name, r, arrays in plan:
        d = dest / pass_dir_name(name)
        n = len(r)
        records = r.questions or []
        if [q.get("index") for q in records] != list(range(n)):
            raise LayerScopeError(f"{r.path}: metadata.json does not hold one record per example in store order; "
                                  "re-run its pass_metadata step")
        starts = write_rows(r, arrays, d, 0, n, padding, f"pass {name!r}")
        lengths = np.diff(r.offsets)
        write_json(d / "metadata.json", [pass_record(q, int(starts[i]), int(lengths[i]))
                                         for i, q in enumerate(records)])
        info[pass_dir_name(name)] = {"pass": name, "questions": n, "seq_len": int(lengths.max()),
                                     "layers": [L for L, _ in arrays], "settings": pass_settings(r.path)}
    config = _run_config(run)
    config["export"] = {"format": "seed004", **source_info(run, variant), "site": SITE, "passes": info,
                        "padding_side": padding, "pad_value": 0.0, "dtype": "float16"}
    write_json(dest / "run_config.json", config)
