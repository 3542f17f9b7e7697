"""Planning at scale: a Llama-70B-shaped model (80 layers, hidden 8192), one layer per job, 64 parts.

Builds a local model directory with only config.json and a tokenizer (no weights: planning
must not need them), a data set of ``--examples`` records, and a config with
``layers_per_job: 1`` and ``parts: 64`` (5120 capture jobs), then times, each ``--repeats``
times: ``snakemake -n`` (the dry run), ``snakemake --summary`` (every output's state) and
``python -m layerscope plan`` (bytes, jobs, memory). Prints the medians and one JSON line.
Targets (issue 7): dry run well under 30 s, summary under 60 s on the 2-core machine.

    python benchmarks/planning.py [--examples 2000] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "max_position_embeddings": 8192, "vocab_size": 32000, "rms_norm_eps": 1e-5,
             "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    from layerscope.models.builtin import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(tmp)
        model = wd / "llama-70b-shape"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(LLAMA_70B))
        train_tokenizer(512).save_pretrained(model)
        (wd / "config").mkdir()
        with open(wd / "config" / "data.jsonl", "w") as f:
            for i in range(args.examples):
                f.write(json.dumps({"text": f"Example {i}: " + "the quick brown fox " * (1 + i % 20),
                                    "split": "ab"[i % 2]}) + "\n")
        cfg = {"run": "big", "model": {"id": str(model), "dtype": "bfloat16"},
               "dataset": {"path": "config/data.jsonl", "max_length": 512},
               "capture": {"layers": "all", "sites": ["resid_post", "mlp_act"], "positions": "all",
                           "layers_per_job": 1, "parts": 64, "dtype": "bfloat16"}}
        (wd / "config" / "big.yaml").write_text(yaml.safe_dump(cfg))
        base = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(wd),
                "--configfile", str(wd / "config" / "big.yaml"), "--nocolor"]
        commands = {"dry_run": base + ["-n", "--quiet", "rules"], "summary": base + ["--summary"],
                    "plan": [sys.executable, "-m", "layerscope", "plan", "--directory", str(wd), "--configfile",
                             str(wd / "config" / "big.yaml")]}
        times: dict[str, list[float]] = {k: [] for k in commands}
        out = {}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                t = time.perf_counter()
                res = subprocess.run(cmd, capture_output=True, text=True, cwd=wd)
                times[name].append(time.perf_counter() - t)
                if res.returncode:
                    print(res.stdout[-2000:], res.stderr[-3000:])
                    return 1
                out[name] = res.stdout + res.stderr
    jobs = next((line for line in out["plan"].splitlines() if line.startswith("jobs")), "")
    print(jobs)
    med = {k: round(statistics.median(v), 2) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:<8} {v:7.2f} s")
    print(json.dumps({"examples": args.examples, "layers": 80, "parts": 64, "median_s": med}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
