"""Test helpers that drive the package directly, without Snakemake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerscope.capture.run import run_capture
from layerscope.data.dataset import load_tokens, prepare
from layerscope.models.loading import load_model, load_tokenizer
from layerscope.store.layout import finalize

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "What is the capital of France? The capital of France is Paris.",
    "Café in Zürich 🙂",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 42 100",
    "A",
    "Interpretability researchers capture activations of the residual stream at every layer.",
]


def make_params(layers: dict[int, dict[str, Any]], dtype: str = "float32", batch_size: int = 3, parts: int = 2,
                padding_side: str = "right", chunk_mib: float = 2, shard_mib: float = 64, length_window: int = 4,
                **store: Any) -> dict:
    return {"layers": {str(k): v for k, v in layers.items()}, "dtype": dtype, "batch_size": batch_size,
            "length_window": length_window,
            "padding_side": padding_side, "parts": parts, "model_dtype": "float32", "trust_remote_code": False,
            "store": {"chunk_mib": chunk_mib, "shard_mib": shard_mib, "compression": "none",
                      "compression_level": 3, **store}}


def prepare_texts(tmp: Path, model: dict, texts=TEXTS) -> Path:
    from tests.conftest import write_jsonl

    data = write_jsonl(tmp / "data.jsonl", [{"text": t, "split": "a" if i % 2 else "b"} for i, t in enumerate(texts)])
    prepare(data, load_tokenizer({"model": model}), tmp / "dataset", max_length=64)
    return tmp / "dataset"


def capture_store(tmp: Path, manifest: dict, params: dict, dataset_dir: Path, name: str = "store",
                  layers_per_job: int | None = None, device: str = "cpu") -> Path:
    """Capture ``params["layers"]`` (as make_params builds it) for every part, as the workflow
    does: one job per block of ``layers_per_job`` layers (default: one block up to the highest
    captured layer), chained by boundary files; then finalize the store. Returns the store root."""
    from layerscope.capture.chain import boundary_path

    layers = {int(k): v for k, v in params["layers"].items()}
    top = max(layers)
    n = layers_per_job or top + 1
    root = tmp / f"{name}.zarr"
    total = manifest["model"]["num_layers"]
    for p in range(params["parts"]):
        for start in range(0, top + 1, n):
            end = min(start + n, total) - 1
            captures = [(L, s, v["positions"]) for L, v in sorted(layers.items()) if start <= L <= end
                        for s in v["sites"]]
            job = {k: v for k, v in params.items() if k != "layers"} | {"block": [start, end]}
            run_capture(manifest, dataset_dir, root, job, p, captures, device=device, group="test",
                        boundary_in=boundary_path(tmp / f"{name}-chain", start, p) if start else None,
                        boundary_out=boundary_path(tmp / f"{name}-chain", end + 1, p) if end < total - 1 else None)
    ids, offsets = load_tokens(dataset_dir)
    arrays = [(L, s, v["positions"]) for L, v in sorted(layers.items()) for s in v["sites"]]
    finalize(root, arrays, params["parts"], ids, offsets, {"run": "test"})
    return root


def store_records(root: Path) -> dict[str, dict[str, Any]]:
    """The arrays' records for metadata.json of a store captured by capture_store (its markers as
    the workflow lists them, found on disk)."""
    from layerscope.store.layout import array_records

    return array_records(root, sorted(Path(root).glob("layer_*/*/parts/*.json")))


def reference(manifest: dict, dataset_dir: Path) -> dict[tuple[int, str], list[np.ndarray]]:
    """Per example, run alone and unpadded: hidden states from output_hidden_states, and the other
    sites from plain hooks; returns {(layer, site): [per-example [tokens, width] float32 arrays]}."""
    from layerscope.capture.sites import base_model, decoder_layers

    model, _ = load_model(manifest, "cpu", "float32")
    n = manifest["model"]["num_layers"]
    layers = decoder_layers(model, n)
    ids, offsets = load_tokens(dataset_dir)
    out: dict[tuple[int, str], list[np.ndarray]] = {}
    got: dict[str, torch.Tensor] = {}
    hooks = []
    sites = ["attn_out", "mlp_out", "mlp_act"]
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attn")
        hooks.append(attn.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(f"{i}/attn_out", o[0])))
        mlp = getattr(layer, "mlp", None)
        if mlp is None:  # OPT: fc1 -> activation -> fc2 on the layer itself, no MLP module
            mlp = down = layer.fc2
        elif isinstance(getattr(mlp, "experts", None), torch.nn.Module):  # sparse MoE: no single set of neurons
            down = None
            sites = ["attn_out", "mlp_out"]
        else:
            down = getattr(mlp, "down_proj", None) or getattr(mlp, "c_proj")
        hooks.append(mlp.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(f"{i}/mlp_out", o)))
        if down is not None:
            hooks.append(down.register_forward_pre_hook(lambda m, a, i=i: got.__setitem__(f"{i}/mlp_act", a[0])))
    final_norm = [m for name, m in base_model(model).named_modules()
                  if name.endswith(("model.norm", "ln_f", "decoder.final_layer_norm"))][0]
    hooks.append(final_norm.register_forward_pre_hook(lambda m, a: got.__setitem__("pre_norm", a[0])))
    with torch.no_grad():
        for e in range(len(offsets) - 1):
            x = torch.from_numpy(ids[offsets[e]:offsets[e + 1]].astype(np.int64))[None]
            res = model(input_ids=x, output_hidden_states=True)
            hs = res.hidden_states
            for i in range(n):
                # hidden_states[n] is after the final norm; the residual stream itself is its input.
                resid = hs[i + 1] if i < n - 1 else got["pre_norm"]
                out.setdefault((i, "resid_post"), []).append(resid[0].float().numpy())
                # One example, unpadded: [1, tokens, width], or [tokens, width] where the model
                # flattens the tokens (OPT's MLP).
                site = {s: got[f"{i}/{s}"].reshape(-1, got[f"{i}/{s}"].shape[-1]) for s in sites}
                for s in sites:
                    out.setdefault((i, s), []).append(site[s].float().numpy())
                # The sites decompose the residual stream: each layer adds attn_out, then mlp_out.
                torch.testing.assert_close(hs[i][0] + site["attn_out"] + site["mlp_out"], resid[0],
                                           atol=1e-5, rtol=1e-5)
            assert torch.allclose(final_norm(got["pre_norm"]), hs[n], atol=1e-5)
    for h in hooks:
        h.remove()
    return out
