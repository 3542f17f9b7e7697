"""A run held in memory, with the reader's interface, for page-size tests and the dashboard
benchmark: 32 layers, 2048 MLP neurons, activations drawn from a seeded generator (one layer
at a time, so memory stays small). Token texts come from a real byte-level BPE tokenizer."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np


class SyntheticActivations:
    """What the summaries read of a reader view: positions, map, per_token, dtype, width, shape,
    row_range, iter_shards, example."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, positions: str, shard_rows: int = 1024) -> None:
        from layerscope.store.rows import array_rows

        self.data, self.offsets, self.positions = data, offsets, positions
        self.dtype, self.width, self.shard_rows = "float16", data.shape[1], shard_rows
        self.map = array_rows(positions, offsets)
        self.per_token = self.map.per_token

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape

    @property
    def row_range(self) -> tuple[int, int]:
        return 0, self.data.shape[0]

    def iter_shards(self, raw: bool = False):
        for r in range(0, len(self.data), self.shard_rows):
            yield (r, min(r + self.shard_rows, len(self.data))), self.data[r:r + self.shard_rows]

    def example(self, e: int) -> np.ndarray:
        if self.positions == "last":
            return self.data[e]
        return self.data[self.offsets[e]:self.offsets[e + 1]]


class SyntheticUnembedding:
    """Random logit effects over a vocabulary of ``vocab`` token ids."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def logit_effects(self, layer: int, neurons: np.ndarray, k: int):
        rng = np.random.default_rng(layer)
        logits = rng.standard_normal((len(neurons), self.vocab)).astype(np.float32)
        up = np.argsort(-logits, axis=1)[:, :k]
        down = np.argsort(logits, axis=1)[:, :k]
        return up, np.take_along_axis(logits, up, 1), down, np.take_along_axis(logits, down, 1)


class SyntheticRun:
    """``layers`` layers of resid_post, attn_out, mlp_out (width ``hidden``) and mlp_act (width
    ``neurons``) for ``examples`` examples of ``tokens`` tokens in two splits."""

    def __init__(self, layers: int = 32, neurons: int = 2048, hidden: int = 256, examples: int = 64,
                 tokens: int = 64, vocab: int = 500, positions: str = "all", seed: int = 0,
                 split_names: tuple[str, str] = ("A", "B"), id_prefix: str = "ex",
                 model_name: str = "synthetic") -> None:
        self.n_layers, self.neurons, self.hidden, self.vocab, self.seed = layers, neurons, hidden, vocab, seed
        rng = np.random.default_rng(seed)
        lengths = rng.integers(tokens // 2, tokens + 1, size=examples)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.ids = rng.integers(3, vocab, size=int(self.offsets[-1]))
        self.positions = positions
        self.path = Path("synthetic-32")
        half = examples // 2
        self.splits = {split_names[0]: (0, half), split_names[1]: (half, examples)}
        self.examples = [{"id": f"{id_prefix}{i}", "split": split_names[i >= half]} for i in range(examples)]
        self.arrays = [(L, s) for L in range(layers) for s in ("resid_post", "attn_out", "mlp_out", "mlp_act")]
        self.sites = ["resid_post", "attn_out", "mlp_out", "mlp_act"]
        self.metadata = {"model_name": model_name, "dataset_name": "synthetic", "total_examples": examples,
                         "total_tokens": int(self.offsets[-1]), "num_layers": layers, "hidden_dim": hidden,
                         "dtype": "float16", "created": "", "layerscope_version": "test", "adapter": None,
                         "splits": {s: {"examples": b - a} for s, (a, b) in self.splits.items()}}

    def tokens(self, e: int) -> np.ndarray:
        return self.ids[self.offsets[e]:self.offsets[e + 1]]

    @lru_cache(maxsize=2)
    def _data(self, layer: int, site: str) -> np.ndarray:
        rng = np.random.default_rng((self.seed, layer, self.sites.index(site)))
        rows = int(self.offsets[-1]) if self.positions == "all" else len(self.examples)
        width = self.neurons if site == "mlp_act" else self.hidden
        x = rng.standard_normal((rows, width), dtype=np.float32) * (1 + layer / 8)
        return x.astype(np.float16)

    def activations(self, layer: int, site: str) -> SyntheticActivations:
        return SyntheticActivations(self._data(layer, site), self.offsets, self.positions)


def tokenizer(vocab: int = 500) -> Any:
    """A byte-level BPE tokenizer trained on a few sentences (as the built-in test models use)."""
    from layerscope.models.builtin import train_tokenizer

    return train_tokenizer(vocab)


class PiecesDecoder:
    """A decoder whose token i is ``pieces[i % len(pieces)]`` (strings a page must show as text)."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids, **_: Any) -> str:
        return "".join(self.pieces[int(i) % len(self.pieces)] for i in ids)


def synthetic_summary(budget_mib: float = 10, neurons_per_layer: int = 64, decoder: Any = None,
                      **run: Any) -> dict[str, Any]:
    from layerscope.analysis.summaries import build_summary

    r = SyntheticRun(**run)
    decoder = decoder or tokenizer(r.vocab)
    return build_summary(r, decoder, SyntheticUnembedding(r.vocab), site="mlp_act", top_k=10, context=8,
                         neurons_per_layer=neurons_per_layer, heatmap_examples=20, example_columns=512,
                         output_tokens=10, budget_mib=budget_mib)
