"""A prompted pass with generation vs a plain ``generate`` loop.

``--questions`` synthetic four-option questions through the built-in ``mcq`` pass on the
``llama-512`` model (hidden 512, 8 layers), ``--new`` greedy tokens each, batch ``--batch-size``,
CPU. Interleaved and repeated in one process, each timed from loaded model on:

  pass        passes.answers.answer_pass: generation + answer distributions + the pass's data set
  loop        model.generate over the same left-padded batches (what any script pays)
  one_by_one  model.generate one question at a time, unpadded

Prints generated tokens per second of each, and ``ratio = pass / loop`` (time); then one JSON line.

    python benchmarks/passes.py [--questions 64] [--new 32] [--batch-size 8] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from layerscope.data.dataset import load_tokens
from layerscope.models.loading import fetch, load_model, parse_ref
from layerscope.passes.answers import answer_pass
from layerscope.passes.prompts import prepare_pass, resolve_pass

WORDS = "river stone light market winter engine garden letter silver valley paper number doctor island".split()


def questions(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    pick = lambda k: " ".join(rng.choice(WORDS, size=k))  # noqa: E731
    return [{"id": f"q{i}", "question": f"Which {pick(3)} is the {pick(int(rng.integers(2, 12)))}?",
             "options": [pick(2) for _ in range(4)], "answer": "ABCD"[i % 4]} for i in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="builtin:llama-512")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    dev = args.device
    tmp = Path(tempfile.mkdtemp(prefix="ls-passes-"))
    try:
        m = fetch(parse_ref({"id": args.model}), tmp / "model")
        manifest = {"model": m, "adapter": None}
        model, tok = load_model(manifest, dev)
        task = {"path": str(tmp / "q.jsonl"), "format": "jsonl", "default_split": "all", "max_length": 512,
                "chat": "auto"}
        Path(task["path"]).write_text("".join(json.dumps(q) + "\n" for q in questions(args.questions)))
        gen = {"max_new_tokens": args.new, "temperature": 0.0, "top_p": 1.0, "seed": 0}
        spec = {**resolve_pass("mcq", {}), "generate": gen}
        prepare_pass(task, spec, tok, tmp / "prompts")
        ids, offsets = load_tokens(tmp / "prompts")
        prompts = [ids[offsets[e]:offsets[e + 1]].astype(np.int64) for e in range(len(offsets) - 1)]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        def run_pass() -> int:
            recs = answer_pass(manifest, str(tmp / "prompts"), str(tmp / "out"), str(tmp / "answers.json"), spec,
                               args.batch_size, device=dev, loaded=(model, tok))
            return sum(r["output_tokens"] for r in recs)

        def run_loop() -> int:
            n = 0
            with torch.inference_mode():
                for b in range(0, len(prompts), args.batch_size):
                    seqs = prompts[b:b + args.batch_size]
                    w = max(len(s) for s in seqs)
                    x = torch.full((len(seqs), w), pad, dtype=torch.long)
                    mask = torch.zeros_like(x)
                    for i, s in enumerate(seqs):
                        x[i, w - len(s):] = torch.from_numpy(s)
                        mask[i, w - len(s):] = 1
                    out = model.generate(x.to(dev), attention_mask=mask.to(dev), max_new_tokens=args.new,
                                         do_sample=False, pad_token_id=pad)
                    n += int((out[:, w:] != pad).sum())
            return n

        def run_one() -> int:
            n = 0
            with torch.inference_mode():
                for s in prompts:
                    x = torch.from_numpy(s)[None].to(dev)
                    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new,
                                         do_sample=False, pad_token_id=pad)
                    n += out.shape[1] - x.shape[1]
            return n

        times: dict[str, list[float]] = {"pass": [], "loop": [], "one_by_one": []}
        tokens: dict[str, int] = {}
        fns = {"pass": run_pass, "loop": run_loop, "one_by_one": run_one}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t = time.perf_counter()
                tokens[name] = fn()
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k in fns:
            print(f"{k:<11} {med[k]:7.3f} s  {tokens[k] / med[k]:8.1f} generated tokens/s  ({tokens[k]} tokens; "
                  f"runs {', '.join(f'{x:.3f}' for x in times[k])})")
        ratio = med["pass"] / med["loop"]
        print(f"pass / loop = {ratio:.3f}; pass / one_by_one = {med['pass'] / med['one_by_one']:.3f}")
        print(json.dumps({"benchmark": "passes", "questions": args.questions, "new_tokens": args.new,
                          "batch_size": args.batch_size, "device": dev, "seconds": {k: round(v, 4) for k, v in med.items()},
                          "tokens_per_s": {k: round(tokens[k] / med[k], 1) for k in fns},
                          "ratio_pass_vs_loop": round(ratio, 4),
                          "ratio_pass_vs_one_by_one": round(med["pass"] / med["one_by_one"], 4)}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
