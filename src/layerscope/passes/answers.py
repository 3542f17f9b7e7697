"""A pass's answering job: the model's distribution over the choices at the answer position, and
optionally its generated reply, per question.

One forward pass per batch of prompts (left-padded, so every prompt ends in the last column and
only that column's logits are computed), or one ``generate`` call when the pass generates (its
first step's raw logits are the answer distribution: no second forward). The prompt plus the
generated tokens become the pass's data set, which the capture chain then runs over, with
``answer_index.npy`` saying where each answer was read.

Per question (seed 004's fields): ``logits`` and ``probs`` (softmax over the choices' first
tokens), ``entropy`` (nats), ``logit_margin`` (correct minus best incorrect, where an answer is
known), ``parsed_answer`` (from the reply when the pass generates and the reply names a choice,
else the most probable choice), ``is_correct``, expected confidence (0-100) for confidence
passes, ``answer_token_index``, ``output_text``, and the surface features.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.data.dataset import load_examples, load_tokens, write_tokenized
from layerscope.fileio import read_json, write_json
from layerscope.passes.prompts import bin_ranges

log = logging.getLogger("layerscope.passes.answers")


def distribution(choice_logits: np.ndarray, labels: list[str], correct: str | None,
                 answers: str, bins: int) -> dict[str, Any]:
    """The answer distribution's fields from the logits of the choices' tokens (float64 math)."""
    z = choice_logits.astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    nz = p[p > 0]
    out: dict[str, Any] = {"logits": z.tolist(), "probs": p.tolist(), "entropy": float(-(nz * np.log(nz)).sum()),
                           "argmax_answer": labels[int(np.argmax(z))]}
    if answers == "options" and correct is not None:
        k = labels.index(correct)
        out["logit_margin"] = float(z[k] - np.delete(z, k).max())
    else:
        out["logit_margin"] = None
    if answers == "confidence":
        mids = np.array([(lo + hi) / 2 for lo, hi in bin_ranges(bins)])
        out["expected_confidence"] = float(p @ mids)
    return out


def parse_reply(text: str, labels: list[str]) -> str | None:
    """The choice a reply names: a label standing alone (``B``, ``(B)``, ``B.``, ``Answer: B``), first one wins."""
    m = re.search(r"(?<![A-Za-z])(" + "|".join(map(re.escape, labels)) + r")(?![A-Za-z])", text)
    return m.group(1) if m else None


def answer_pass(manifest: dict[str, Any], prompts_dir: str, out_dir: str, answers_out: str, spec: dict[str, Any],
                batch_size: int, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False,
                loaded: tuple[Any, Any] | None = None) -> list[dict[str, Any]]:
    """Answer every prompt of ``prompts_dir``; write the pass's data set (prompt + reply tokens) into
    ``out_dir`` and the per-question records to ``answers_out``; return the records."""
    import torch
    from tqdm import tqdm

    from layerscope.models.loading import load_model, resolve_device

    dev = resolve_device(device)
    model, tok = loaded if loaded is not None else load_model(manifest, dev, dtype, trust_remote_code)
    ids, offsets = load_tokens(prompts_dir)
    examples = load_examples(Path(prompts_dir) / "examples.jsonl")
    info = read_json(Path(prompts_dir) / "choices.json")
    gen = spec.get("generate") or {}
    new = int(gen.get("max_new_tokens") or 0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    eos = tok.eos_token_id
    keep_kw = "logits_to_keep" in inspect.signature(model.forward).parameters
    if new:
        torch.manual_seed(int(gen.get("seed", 0)))  # the batches are fixed, so the draws are too
    n = len(offsets) - 1
    replies: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n
    rows: list[np.ndarray] = []
    with torch.inference_mode(), tqdm(total=n, desc=f"answer {spec['name']}", unit="question", mininterval=1.0) as bar:
        for b0 in range(0, n, batch_size):
            es = range(b0, min(n, b0 + batch_size))
            seqs = [ids[offsets[e]:offsets[e + 1]].astype(np.int64) for e in es]
            width = max(len(s) for s in seqs)
            x = np.full((len(seqs), width), pad, dtype=np.int64)
            mask = np.zeros((len(seqs), width), dtype=np.int64)
            for i, s in enumerate(seqs):  # left padding: every prompt ends in the last column
                x[i, width - len(s):] = s
                mask[i, width - len(s):] = 1
            xt, mt = torch.from_numpy(x).to(dev), torch.from_numpy(mask).to(dev)
            if new:
                out = model.generate(xt, attention_mask=mt, max_new_tokens=new, do_sample=gen["temperature"] > 0,
                                     temperature=gen["temperature"] if gen["temperature"] > 0 else None,
                                     top_p=gen["top_p"] if gen["temperature"] > 0 else None, pad_token_id=pad,
                                     return_dict_in_generate=True, output_logits=True)
                last = out.logits[0]
                for i, e in enumerate(es):
                    replies[e] = _reply(out.sequences[i, width:].cpu().numpy(), eos, pad)
            else:
                kw = {"logits_to_keep": 1} if keep_kw else {}
                pos = (mt.cumsum(-1) - 1).clamp(min=0)
                last = model(input_ids=xt, attention_mask=mt, position_ids=pos, use_cache=False, **kw).logits[:, -1]
            rows.append(last.float().cpu().numpy())
            bar.update(len(seqs))
    logits_all = np.concatenate(rows)  # a task has at least one question
    records, ids_list = [], []
    for e, ex in enumerate(examples):
        ch = info["choices"][e]
        z = logits_all[e, ch["token_ids"]]
        full = logits_all[e].astype(np.float64)
        mass = float(np.exp(z.astype(np.float64) - full.max()).sum() / np.exp(full - full.max()).sum())
        d = distribution(z, ch["labels"], ex["answer"], info["answers"], info["bins"])
        reply = replies[e]
        text = tok.decode(reply, skip_special_tokens=True) if len(reply) else ""
        parsed = (parse_reply(text, ch["labels"]) if new else None) or d["argmax_answer"]
        prompt_ids = ids[offsets[e]:offsets[e + 1]].astype(np.int64)
        rec = {
            "index": e, "question_id": ex["id"], "split": ex["split"], "question_text": ex["question"],
            "options": ex["options"], "correct_answer_letter": ex["answer"],
            "model_name": manifest["model"]["id"],
            "checkpoint_id": (manifest.get("adapter") or {}).get("id"),
            "prompt_type": spec["name"], "prompt_text": ex["text"],
            "temperature": gen.get("temperature", 0.0), "top_p": gen.get("top_p", 1.0), "max_new_tokens": new,
            "output_text": text, "parsed_answer": parsed,
            "is_correct": (parsed == ex["answer"]) if info["answers"] == "options" and ex["answer"] else None,
            "choices": ch["labels"], "choice_token_ids": ch["token_ids"], **d,
            "choice_probability_mass": mass,
            "answer_token_index": len(prompt_ids) - 1,
            "prompt_tokens": len(prompt_ids), "output_tokens": int(len(reply)),
            **ex["features"],
            **{k: v for k, v in ex.items() if k not in _EXAMPLE_KEYS},
        }
        if info["answers"] == "confidence":
            rec["confidence_token_index"] = rec["answer_token_index"]
            if spec["name"] in ("self_confidence", "other_confidence"):
                rec[spec["name"]] = d["expected_confidence"]
        records.append(rec)
        ids_list.append(np.concatenate([prompt_ids, reply]))
        if len(reply):
            ex["text"] = ex["text"] + tok.decode(reply, skip_special_tokens=False)
        n_all, n_p = len(ids_list[-1]), len(prompt_ids)
        ex.update(n_tokens=n_all, n_tokens_full=n_all, prompt_tokens=n_p, output_tokens=int(len(reply)),
                  answer_token_index=n_p - 1, spans={"prompt": [[0, n_p]], "response": [[n_p, n_all]] if len(reply) else []})
        ex.pop("features", None)
    write_tokenized(out_dir, examples, ids_list, prompts_dir,
                    answer_index=np.array([r["answer_token_index"] for r in records], dtype=np.int64))
    write_json(answers_out, records)
    acc = [r["is_correct"] for r in records if r["is_correct"] is not None]
    log.info("pass %s: %d questions%s, mean entropy %.3f nats%s", spec["name"], n,
             f", accuracy {sum(acc) / len(acc):.3f} over {len(acc)} with answers" if acc else "",
             float(np.mean([r["entropy"] for r in records])) if records else math.nan,
             f", {sum(r['output_tokens'] for r in records)} tokens generated" if new else "")
    return records


# examples.jsonl keys that the record carries under seed 004's names, or not at all
_EXAMPLE_KEYS = ("index", "id", "split", "n_tokens", "n_tokens_full", "truncated", "char_length", "source_line",
                 "text", "question", "options", "answer", "features")


def _reply(seq: np.ndarray, eos: int | None, pad: int) -> np.ndarray:
    """The generated tokens up to and with the first end-of-sequence token (padding after it dropped)."""
    seq = seq.astype(np.int64)
    if eos is not None:
        hit = np.flatnonzero(seq == eos)
        if len(hit):
            return seq[:hit[0] + 1]
    if pad != eos:
        hit = np.flatnonzero(seq == pad)
        if len(hit):
            return seq[:hit[0]]
    return seq
