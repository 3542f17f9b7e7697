"""What a planned run will cost before it starts: bytes per array and site, boundary bytes, jobs,
and the weights each capture job holds.

Rows come from the tokenized data set (``results/{run}/dataset/`` when ``prepare_dataset`` has
run, else the data set is tokenized here): its offsets, and the spans its examples record, so
the rows of an array at a span (``response``) are exact too; weights come from the model's
parameter shapes, read from a skeleton built on the meta device (no memory, no download beyond
config.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from layerscope.capture.chain import ST_DTYPES, part_examples
from layerscope.config import Plan
from layerscope.models.architectures import Widths
from layerscope.store.shards import ALIGN
from layerscope.store.layout import STORAGE_DTYPES, make_layout
from layerscope.store.rows import RowMap, array_rows

COMPUTE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def tokenized(d: Path) -> bool:
    """Whether ``d`` holds a tokenized data set (what ``data.dataset.prepare`` writes)."""
    return (d / "offsets.npy").is_file() and (d / "examples.jsonl").is_file()


def plan_tokens(plan: Plan, results: Path) -> tuple[np.ndarray, list]:
    """Token offsets of the run's examples and the spans each records: the prepared ones, or tokenized now."""
    from layerscope.data.dataset import load_spans, prepare

    prepared = results / "dataset"
    if tokenized(prepared):
        return np.load(prepared / "offsets.npy", allow_pickle=False), load_spans(prepared)
    import tempfile

    ds = plan.config["dataset"]
    with tempfile.TemporaryDirectory() as tmp:
        prepare(plan.base_dir / ds["path"], plan_tokenizer(plan), tmp, fmt=ds["format"],
                default_split=ds["default_split"], max_length=ds["max_length"],
                add_special_tokens=ds["add_special_tokens"], add_generation_prompt=ds["add_generation_prompt"])
        return np.load(Path(tmp) / "offsets.npy", allow_pickle=False), load_spans(tmp)


def plan_tokenizer(plan: Plan):
    """The model's tokenizer without fetching its weights (a built-in model's is trained here)."""
    from layerscope.models.loading import load_tokenizer

    ref = plan.model
    if ref.kind == "builtin":
        from layerscope.models.builtin import spec_for, train_tokenizer

        return train_tokenizer(spec_for(ref.name)["vocab_size"])
    if ref.kind == "local":
        path = ref.name
    else:
        from huggingface_hub import snapshot_download

        from layerscope.models.loading import hub_cache_dir

        path = snapshot_download(ref.name, revision=ref.revision, cache_dir=hub_cache_dir(plan.config["hub_cache"]),
                                 allow_patterns=["*.json", "*.txt", "*.model", "*.jinja", "tokenizer*"])
    return load_tokenizer({"model": {"id": ref.label, "path": str(path)}}, plan.config["model"]["trust_remote_code"])


def block_weight_bytes(plan: Plan, compute_bytes: int) -> dict[str, int]:
    """Bytes of the weights each block's job loads (see partial.load_block), from parameter shapes."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from layerscope.capture import sites as S
    from layerscope.models.loading import peek_config
    from layerscope.capture.partial import _skipped_modules

    if plan.model.kind == "builtin":
        from layerscope.models.builtin import hf_config_dict

        raw = hf_config_dict(plan.model.name)
    else:
        raw = peek_config(plan.model, plan.config["hub_cache"])
    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "auto_map"})
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=plan.config["model"]["trust_remote_code"])
    layers = S.decoder_layers(model, plan.dims.num_layers)
    out = {}
    for b in plan.blocks:
        skipped = {id(p) for m in _skipped_modules(model, layers, b.start, b.stop) for p in m.parameters()}
        n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in skipped)
        out[b.name] = n * compute_bytes
    return out


def chain_widths(plan: Plan) -> set[int]:
    """The widths the capture jobs cut example spans by (capture.run via architectures.chain_widths):
    the model's, and every LoRA module's of its adapter and of each more adapter that is a variant."""
    from layerscope.config import adapter_modules

    lora = plan.lora
    if lora is None and plan.adapter is not None:
        lora = adapter_modules(plan.adapter, plan.model, plan.config["hub_cache"])
    out = Widths(plan.dims.hidden_size, plan.dims.intermediate_size, lora or {}).all()
    for name, ref in plan.adapters.items():
        more = plan.variant_lora.get(name)
        if more is None:
            more = adapter_modules(ref, plan.model, plan.config["hub_cache"], key=f"adapters.{name}.id")
        out |= Widths(plan.dims.hidden_size, plan.dims.intermediate_size, more).all()
    return out


def window_tokens(offsets: np.ndarray, examples: int) -> int:
    """The most tokens any run of ``examples`` consecutive examples holds (a batch-by-length window)."""
    csum = np.asarray(offsets, dtype=np.int64)
    k = min(examples, len(csum) - 1)
    return int((csum[k:] - csum[:-k]).max()) if k > 0 else 0


def job_memory(plan: Plan, offsets: np.ndarray, rows: dict[str, RowMap], compute_bytes: int,
               weights: dict[str, int], device: str) -> dict[str, dict[str, int]]:
    """Per block, the memory one of its jobs needs beyond the Python runtime (about 0.4 GiB with torch).

    ``device``: weights plus one batch's activations at the longest example (about 8 hidden-wide
    and 3 intermediate-wide tensors per token in flight; attention kernels that materialise the
    score matrix add batch x heads x T^2). ``host``: the rows a batch-by-length window holds for
    each captured array until its chunks are complete, a few chunk buffers per array, and the
    boundary rows of a batch; plus the weights and activations where the device is the CPU.
    ``rows``: each position mode's rows (a span's window rows are bounded by the window's tokens).
    """
    cap, store = plan.config["capture"], plan.config["store"]
    itemsize = STORAGE_DTYPES[cap["dtype"]].itemsize
    h, inter = plan.dims.hidden_size, plan.dims.intermediate_size
    n_ex = len(offsets) - 1
    bs = cap["batch_size"]
    longest = int(np.diff(offsets).max()) if n_ex else 0
    window = window_tokens(offsets, cap["length_window"] * bs)
    batch = bs * longest * (8 * h + 3 * inter) * compute_bytes
    out = {}
    for b in plan.blocks:
        staging = chunks = 0
        for layer, site, pos in plan.captures(b):
            width = plan.widths.site(layer, site)
            lay = make_layout(rows[pos].n_rows, width, itemsize, cap["parts"], store["chunk_mib"], store["shard_mib"])
            held = window if rows[pos].per_token else min(cap["length_window"] * bs, n_ex)
            staging += held * width * itemsize
            chunks += 4 * lay.chunk_rows * width * itemsize  # one being filled, one being written, a queue
        boundary = 2 * bs * longest * h * compute_bytes if b.reads_boundary or b.writes_boundary else 0
        dev = weights[b.name] + batch
        host = staging + chunks + boundary + (dev if device == "cpu" else 0)
        out[b.name] = {"device_bytes": dev, "host_bytes": host, "window_bytes": staging}
    return out


def disk_bytes(lay, itemsize: int, store: dict[str, Any]) -> int:
    """Bytes of an array's shard files: whole chunks (the last one filled up) and each shard's
    index, every write in whole 4 KiB blocks (see shards.ShardFile). Compressed arrays: the raw bytes,
    an upper bound in practice."""
    chunks = -(-lay.rows // lay.chunk_rows)
    if store.get("compression", "none") != "none":
        return lay.rows * lay.width * itemsize
    per_shard = lay.shard_rows // lay.chunk_rows
    return chunks * _blocks(lay.chunk_rows * lay.width * itemsize) + lay.num_shards * _blocks(16 * per_shard + 4)


def _blocks(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def row_maps(captures: list[tuple[int, str, str]], offsets: np.ndarray, spans: list | None) -> dict[str, RowMap]:
    """The rows of each positions mode of ``captures`` over the examples with ``offsets`` (and their
    recorded ``spans``, which arrays at a span need)."""
    return {pos: array_rows(pos, offsets, spans) for pos in {p for _, _, p in captures}}


def array_costs(plan: Plan, captures: list[tuple[int, str, str]], maps: dict[str, RowMap]) -> list[dict[str, Any]]:
    """Rows, bytes, bytes on disk and shards of each (layer, site, positions) array (``maps``: row_maps)."""
    cap, store = plan.config["capture"], plan.config["store"]
    itemsize = STORAGE_DTYPES[cap["dtype"]].itemsize
    out = []
    for layer, site, pos in captures:
        rows = maps[pos].n_rows
        width = plan.widths.site(layer, site)
        lay = make_layout(rows, width, itemsize, cap["parts"], store["chunk_mib"], store["shard_mib"])
        out.append({"layer": layer, "site": site, "positions": pos, "rows": rows, "width": width,
                    "bytes": rows * width * itemsize, "disk_bytes": disk_bytes(lay, itemsize, store),
                    "shards": lay.num_shards})
    return out


def boundary_costs(plan: Plan, offsets: np.ndarray, spans: list | None, compute_dtype: str) -> list[int]:
    """Bytes of one boundary per part: the residual stream of the tokens the part computes."""
    cap = plan.config["capture"]
    item = np.dtype(ST_DTYPES[compute_dtype][1]).itemsize
    out = []
    for p in range(cap["parts"]):
        ranges = part_examples(offsets, chain_widths(plan), cap["dtype"], cap["parts"], plan.config["store"], p, spans)
        out.append(sum(int(offsets[b] - offsets[a]) for a, b in ranges) * plan.dims.hidden_size * item)
    return out


def estimate(plan: Plan, offsets: np.ndarray, spans: list | None = None, compute_dtype: str = "float32",
             device: str = "cpu") -> dict[str, Any]:
    """Bytes, rows, shards and jobs of the planned run; per block, the weights its jobs hold.
    ``spans``: each example's recorded spans (plan_tokens), which arrays at a span need."""
    cap = plan.config["capture"]
    n_ex, n_tok = len(offsets) - 1, int(offsets[-1])
    captures = [c for b in plan.blocks for c in plan.captures(b)]
    maps = row_maps(captures, offsets, spans)
    arrays = array_costs(plan, captures, maps)
    sites: dict[str, int] = {}
    for a in arrays:
        sites[a["site"]] = sites.get(a["site"], 0) + a["bytes"]
    per_boundary = boundary_costs(plan, offsets, spans, compute_dtype)
    n_boundaries = sum(b.writes_boundary for b in plan.blocks)
    weights = block_weight_bytes(plan, COMPUTE_BYTES[compute_dtype])
    memory = job_memory(plan, offsets, maps, COMPUTE_BYTES[compute_dtype], weights, device)
    return {
        "examples": n_ex, "tokens": n_tok, "jobs": len(plan.blocks) * cap["parts"],
        "blocks": [{"name": b.name, "layers": list(b.layers), "weight_bytes": weights[b.name], **memory[b.name],
                    "reads_boundary": b.reads_boundary, "writes_boundary": b.writes_boundary} for b in plan.blocks],
        "arrays": arrays, "bytes_per_site": sites, "array_bytes": sum(sites.values()),
        "disk_bytes": sum(a["disk_bytes"] for a in arrays),
        "shards": sum(a["shards"] for a in arrays),
        "boundary_bytes_per_part": per_boundary, "boundary_bytes": n_boundaries * sum(per_boundary),
        "compute_dtype": compute_dtype, "device": device,
    }
