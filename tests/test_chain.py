"""Layer groups chained by their residual stream: the same store as one whole forward pass, layers
below a group never run, a group holds only its own weights, boundaries are checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from layerscope.capture.chain import Boundary, BoundaryWriter, boundary_path, part_examples
from layerscope.errors import IncompleteRunError
from layerscope.capture.partial import PassThrough, load_block, weight_bytes
from layerscope.store.layout import make_layout
from tests.helpers import capture_store, make_params, prepare_texts

SITES = ["resid_post", "attn_out", "mlp_out", "mlp_act"]


def store_files(root) -> dict[str, bytes]:
    """Shards and array metadata (markers hold job ids and timings)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "parts" not in p.parts and p.relative_to(root) != Path("zarr.json")}


@pytest.mark.parametrize("arch", ["llama-tiny", "qwen2-tiny", "gpt2-tiny", "opt-tiny", "mixtral-tiny"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_one_layer_groups_equal_one_group_byte_for_byte(tmp_path, model_factory, arch, padding):
    m = model_factory(arch)
    manifest = {"model": m, "adapter": None}
    ds = prepare_texts(tmp_path, m)
    sites = [s for s in SITES if not (arch.startswith("mixtral") and s == "mlp_act")]
    n = m["num_layers"]
    params = make_params({L: {"sites": sites, "positions": "all" if L % 2 else "last"} for L in range(n)},
                         padding_side=padding, parts=2)
    whole = capture_store(tmp_path, manifest, params, ds, name="whole")
    chained = capture_store(tmp_path, manifest, params, ds, name="chained", layers_per_job=1)
    a, b = store_files(whole), store_files(chained)
    assert len(a) >= n * len(sites) and a.keys() == b.keys()
    if arch.startswith("mixtral"):
        # Expert kernels group the tokens routed to each expert, padding included, and the padding
        # rows a boundary hands on are zeros, not what the layers below made of them: the same
        # values up to float rounding, not bit for bit.
        import zarr

        for L in range(n):
            for s in sites:
                x, y = (zarr.open_array(str(r / f"layer_{L:02d}" / s), mode="r")[:] for r in (whole, chained))
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    else:
        assert [k for k in a if a[k] != b[k]] == []
    # the chain really was used: a boundary per layer above the first, per part
    assert sorted(p.name for p in (tmp_path / "chained-chain").rglob("*.safetensors")) == sorted(
        boundary_path("", L, p).name for L in range(1, n) for p in range(2))


def test_layers_below_a_group_do_not_run(tmp_path, model_factory, monkeypatch):
    from transformers.models.llama import modeling_llama

    m = model_factory("llama-tiny")
    manifest = {"model": m, "adapter": None}
    ds = prepare_texts(tmp_path, m)
    params = make_params({1: {"sites": ["resid_post"], "positions": "all"},
                          3: {"sites": ["resid_post"], "positions": "all"}}, parts=1)
    ran: list[int] = []
    real = modeling_llama.LlamaDecoderLayer.forward

    def counting(self, *a, **k):
        ran.append(self.self_attn.layer_idx)
        return real(self, *a, **k)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", counting)
    capture_store(tmp_path, manifest, params, ds, layers_per_job=2)
    batches = -(-7 // 3)  # 7 examples, batch size 3
    # block 0-1 runs layers 0 and 1 (and hands on the stream at 2); block 2-3 runs 2 and 3 only
    assert sorted(ran) == sorted([0, 1, 2, 3] * batches)
    assert ran[:2 * batches] == [0, 1] * batches


def test_a_group_holds_only_its_weights(model_factory):
    m = model_factory("llama-512")
    manifest = {"model": m, "adapter": None}
    full, _ = load_block(manifest, "cpu", "float32", False, 0, 7)
    top, _ = load_block(manifest, "cpu", "float32", False, 4, 7)
    bottom, _ = load_block(manifest, "cpu", "float32", False, 0, 3)
    layer_bytes = sum(p.numel() * 4 for n, p in full.named_parameters() if ".layers." in n)
    # the top half: its four layers, no embeddings, no unembedding
    assert abs(weight_bytes(top) - layer_bytes / 2) < 0.02 * layer_bytes
    assert isinstance(top.model.layers[0], PassThrough) and not isinstance(top.model.layers[4], PassThrough)
    assert top.model.embed_tokens.weight.device.type == "meta" and top.lm_head.weight.device.type == "meta"
    # the bottom half also holds the token embeddings, where the chain starts
    emb = full.model.embed_tokens.weight.numel() * 4
    assert abs(weight_bytes(bottom) - layer_bytes / 2 - emb) < 0.02 * layer_bytes
    assert weight_bytes(full) < weight_bytes(top) + weight_bytes(bottom)  # no unembedding anywhere


def test_boundary_round_trip_and_refusals(tmp_path):
    import torch

    path = tmp_path / "b.safetensors"
    key = {"layer": 3, "examples": [2, 5], "tokens": [10, 17], "fingerprint": "abc"}
    w = BoundaryWriter(path, 7, 4, "bfloat16", key)
    rows = torch.randn(7, 4).to(torch.bfloat16)
    w.write(3, rows[3:])  # any order: rows land at their token offset
    w.write(0, rows[:3])
    assert not path.exists()  # only a complete boundary has its name
    w.close()
    b = Boundary(path)
    b.check(**key)
    assert torch.equal(b.rows(0, 7), rows) and b.rows(2, 4).dtype == torch.bfloat16
    from safetensors.torch import load_file  # any safetensors reader opens it

    assert torch.equal(load_file(path)["hidden"], rows)
    with pytest.raises(IncompleteRunError, match="examples"):
        b.check(**{**key, "examples": [2, 6]})
    path.write_bytes(b"junk")
    with pytest.raises(IncompleteRunError, match="not a readable LayerScope boundary"):
        Boundary(path)


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 64])
def test_part_examples_cover_every_layout(parts):
    rng = np.random.default_rng(parts)
    lengths = rng.integers(1, 300, size=50)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    store = {"chunk_mib": 0.01, "shard_mib": 0.05}
    got = [part_examples(offsets, {64, 172}, "float16", parts, store, p) for p in range(parts)]
    computed = lambda p: {e for a, b in got[p] for e in range(a, b)}  # noqa: E731
    needed: list[set[int]] = [set() for _ in range(parts)]
    for width in (64, 172):
        for rows in (50, int(offsets[-1])):
            lay = make_layout(rows, width, 2, parts, store["chunk_mib"], store["shard_mib"])
            for p in range(parts):
                r0, r1 = lay.part_range(p)
                if r0 >= r1:
                    continue
                if rows == 50:
                    need = set(range(r0, r1))
                else:  # every example with a token row in the part
                    need = {e for e in range(50) if offsets[e] < r1 and offsets[e + 1] > r0}
                assert need <= computed(p)
                needed[p] |= need
    for p in range(parts):
        assert computed(p) == needed[p]  # nothing beyond what some layout needs
        assert all(b0 < a1 for (_, b0), (a1, _) in zip(got[p], got[p][1:]))  # sorted, disjoint, not touching


def test_parts_without_examples_still_finish_the_chain(tmp_path, model_factory):
    """More parts than tokens: the empty parts run nothing, hand on empty boundaries and leave markers."""
    from layerscope.store.layout import marker_path

    m = model_factory("llama-tiny")
    ds = prepare_texts(tmp_path, m, texts=["A"])
    params = make_params({0: {"sites": ["resid_post"], "positions": "last"},
                          2: {"sites": ["resid_post"], "positions": "all"}}, parts=5)
    root = capture_store(tmp_path, {"model": m, "adapter": None}, params, ds, layers_per_job=1)
    assert all(marker_path(root, L, "resid_post", p, pos).is_file() for L, pos in ((0, "last"), (2, "all"))
               for p in range(5))
    assert Boundary(boundary_path(tmp_path / "store-chain", 2, 4)).rows(0, 0).shape == (0, 64)


def test_an_adapter_chain_equals_one_group_and_loads_only_its_layers(tmp_path, model_factory, lora_adapter):
    m = model_factory("llama-tiny")
    manifest = {"model": m, "adapter": lora_adapter}
    ds = prepare_texts(tmp_path, m)
    params = make_params({L: {"sites": SITES, "positions": "all"} for L in range(4)}, parts=2)
    whole = capture_store(tmp_path, manifest, params, ds, name="whole")
    chained = capture_store(tmp_path, manifest, params, ds, name="chained", layers_per_job=1)
    a, b = store_files(whole), store_files(chained)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    top, _ = load_block(manifest, "cpu", "float32", False, 2, 3)
    lora = [n for n, p in top.named_parameters() if "lora_" in n]
    assert lora and all(".layers.2." in n or ".layers.3." in n for n in lora)
    assert all(p.device.type != "meta" for n, p in top.named_parameters() if "lora_" in n)
