"""Seed 004's layout ("Activation Collection for Introspection Experiments"): every token.

    OUT/run_config.json                    the run's run_config.json plus an ``export`` block
    OUT/{split}/metadata.json              a list, one record per example, in row order
    OUT/{split}/activations_layer_XX.npy   float16 [n_examples, seq_len, hidden]

A split plays the guide's pass directory (``mcq``, ``self_conf``...). ``seq_len`` is the
longest example of the split. Padding is on the left by default, so ``acts[i, -1]`` is example
i's last token as the guide reads it (``final_token_act = acts[42, -1]``); ``--padding right``
puts tokens first. Padded positions hold 0. Each record says where its tokens are:
``token_start`` (first real position) and ``n_tokens``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from layerscope.data.dataset import GENERATED, example_text
from layerscope.errors import LayerScopeError
from layerscope.fileio import read_json, write_json
from layerscope.interop.common import (NpyWriter, check_split_names, example_blocks, narrow, source_info,
                                       token_blocks)
from layerscope.store.reader import Run

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


def check(run: Run, arrays: list[tuple[int, str]], padding: str) -> None:
    """Refuse what the layout cannot hold, before anything is written."""
    check_split_names(run, "seed004", reserved=("run_config.json",))
    if padding not in PADDING:
        raise LayerScopeError(f"--padding must be left or right, not {padding!r}")
    last = [f"layer_{L:02d}/{s}" for L, s in arrays if run.activations(L, s).positions != "all"]
    if last:
        raise LayerScopeError(f"seed004 stores every token position, but {', '.join(last)} "
                              f"{'holds' if len(last) == 1 else 'hold'} the last position only; capture with "
                              "positions: all, leave it out with --layers, or export --format seed001 (last token)")


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


def write(run: Run, arrays: list[tuple[int, str]], dest: Path, padding: str = "left",
          variant: str | None = None) -> None:
    """Write every split's arrays and records under ``dest``, building a few MiB of rows at a time."""
    off = run.offsets
    seq_lens = {}
    for split, (e0, e1) in run.splits.items():
        d = dest / split
        d.mkdir(parents=True, exist_ok=True)
        lengths = np.diff(off[e0:e1 + 1])
        seq_len = seq_lens[split] = int(lengths.max())
        starts = seq_len - lengths if padding == "left" else np.zeros_like(lengths)
        for layer, site in arrays:
            view = run.activations(layer, site, split=split)
            w = view.width
            npy = NpyWriter(d / f"activations_layer_{layer:02d}.npy", (e1 - e0, seq_len, w), np.float16)
            base = int(off[e0])
            for a, b in example_blocks(off, e0, e1, seq_len * w * 2):
                rows = narrow(view.rows(int(off[a]) - base, int(off[b]) - base), np.float16,
                              f"layer_{layer:02d}/{site} split {split!r}", "seed004")
                block = np.zeros((b - a, seq_len, w), dtype=np.float16)
                for e in range(a, b):
                    s = int(starts[e - e0])
                    block[e - a, s:s + int(lengths[e - e0])] = rows[int(off[e] - off[a]):int(off[e + 1] - off[a])]
                npy.write(block)
            npy.close()
        records = [record(run, run.examples[e], ids, int(starts[e - e0])) for e, ids in token_blocks(run, e0, e1)]
        write_json(d / "metadata.json", records)
    config = read_json(run.path / "run_config.json") if (run.path / "run_config.json").is_file() else {}
    config["export"] = {"format": "seed004", **source_info(run, variant), "site": SITE,
                        "layers": [L for L, _ in arrays], "padding_side": padding, "pad_value": 0.0,
                        "seq_len": seq_lens, "dtype": "float16"}
    write_json(dest / "run_config.json", config)
