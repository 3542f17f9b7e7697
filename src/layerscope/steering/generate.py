"""Text out, for the qualitative check: greedy continuations of a few prompts, normal and steered."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger("layerscope.steering.generate")


def generate(manifest: dict[str, Any], dataset_dir: str, target: dict[str, Any], vector: np.ndarray,
             examples: int, max_new_tokens: int, device: str = "cpu", dtype: str = "float32",
             trust_remote_code: bool = False) -> list[dict[str, Any]]:
    """For the first ``examples`` examples, ``max_new_tokens`` greedy tokens without and with the
    vector added at the target's layer: at every position (``all``, generated ones included) or at
    the prompt's last token (``last``)."""
    import torch
    from tqdm import tqdm

    from layerscope.capture.sites import decoder_layers, first_tensor
    from layerscope.data.dataset import load_examples, load_tokens
    from layerscope.models.loading import load_model, resolve_device
    from pathlib import Path

    dev = resolve_device(device)
    model, tok = load_model(manifest, dev, dtype, trust_remote_code)
    layer = decoder_layers(model, manifest["model"]["num_layers"])[target["layer"]]
    vec = torch.as_tensor(vector * target["strength"], dtype=next(model.parameters()).dtype, device=dev)
    on = {"steer": False}

    def add(mod, args, out):
        if not on["steer"]:
            return None
        h = first_tensor(out)
        if target["positions"] == "all":
            h = h + vec
        elif h.shape[1] > 1:  # the prompt's pass (later passes see one new token each)
            h = h.clone()
            h[:, -1] += vec
        else:
            return None
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = layer.register_forward_hook(add, prepend=True)
    ids, offsets = load_tokens(dataset_dir)
    records = load_examples(Path(dataset_dir) / "examples.jsonl")
    out = []
    try:
        with torch.inference_mode():
            for e in tqdm(range(min(examples, len(offsets) - 1)), desc=f"generate {target['name']}", unit="prompt"):
                prompt = torch.from_numpy(ids[offsets[e]:offsets[e + 1]].astype(np.int64))[None].to(dev)
                texts = {}
                for mode in ("normal", "steered"):
                    on["steer"] = mode == "steered"
                    gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                         do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
                    texts[mode] = tok.decode(gen[0, prompt.shape[1]:], skip_special_tokens=True)
                out.append({"id": records[e]["id"], "prompt": tok.decode(prompt[0], skip_special_tokens=False),
                            **texts})
    finally:
        handle.remove()
    return out
