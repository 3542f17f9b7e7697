"""Captured activations equal what the model itself computes, in every position mode and padding side."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from layerscope.store.reader import bf16_to_float32
from layerscope.store.layout import marker_path
from tests.helpers import capture_store, make_params, prepare_texts, reference

SITES = ["resid_post", "attn_out", "mlp_out", "mlp_act"]
# mlp_act has no single meaning for a sparse mixture-of-experts MLP (each expert has its own neurons).
ARCH_SITES = {"mixtral-tiny": ["resid_post", "attn_out", "mlp_out"]}


def read(root, layer, site):
    a = zarr.open_array(str(root / f"layer_{layer:02d}" / site), mode="r")
    return a[:], dict(a.attrs)


@pytest.mark.parametrize("arch", ["llama-tiny", "gpt2-tiny", "qwen2-tiny", "opt-tiny", "mixtral-tiny"])
@pytest.mark.parametrize("positions", ["all", "last"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_sites_match_model(tmp_path, model_factory, arch, positions, padding):
    m = model_factory(arch)
    manifest = {"model": m, "adapter": None}
    ds = prepare_texts(tmp_path, m)
    n = m["num_layers"]
    sites = ARCH_SITES.get(arch, SITES)
    params = make_params({L: {"sites": sites, "positions": positions} for L in range(n)}, padding_side=padding)
    root = capture_store(tmp_path, manifest, params, ds)
    ref = reference(manifest, ds)
    offsets = np.load(ds / "offsets.npy")
    for L in range(n):
        for s in sites:
            got, attrs = read(root, L, s)
            assert attrs["positions"] == positions and attrs["site"] == s
            want = np.concatenate(ref[(L, s)]) if positions == "all" else np.stack([r[-1] for r in ref[(L, s)]])
            rows = offsets[-1] if positions == "all" else len(offsets) - 1
            assert got.shape == (rows, want.shape[1])
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"layer {L} {s}")


def test_adapter_changes_and_matches(tmp_path, model_factory, lora_adapter):
    m = model_factory("llama-tiny")
    ds = prepare_texts(tmp_path, m)
    params = make_params({L: {"sites": ["resid_post", "mlp_act"], "positions": "all"} for L in range(4)})
    with_adapter = {"model": m, "adapter": lora_adapter}
    root = capture_store(tmp_path, with_adapter, params, ds, name="lora")
    base = capture_store(tmp_path, {"model": m, "adapter": None}, params, ds, name="base")
    ref = reference(with_adapter, ds)
    for L in range(4):
        got, _ = read(root, L, "resid_post")
        np.testing.assert_allclose(got, np.concatenate(ref[(L, "resid_post")]), rtol=1e-4, atol=1e-4)
        # The random LoRA really is applied: the adapted residual stream differs from the base model's.
        assert not np.allclose(got, read(base, L, "resid_post")[0], atol=1e-3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage_is_lossless_cast(tmp_path, model_factory, dtype):
    import torch

    m = model_factory("llama-tiny")
    manifest = {"model": m, "adapter": None}
    ds = prepare_texts(tmp_path, m)
    params = make_params({1: {"sites": ["resid_post"], "positions": "all"}}, dtype=dtype)
    root = capture_store(tmp_path, manifest, params, ds)
    got, attrs = read(root, 1, "resid_post")
    assert attrs["dtype"] == dtype
    want = torch.from_numpy(np.concatenate(reference(manifest, ds)[(1, "resid_post")]))
    if dtype == "bfloat16":
        assert got.dtype == np.uint16  # raw bit patterns, no lossy conversion on the way to disk
        got32 = bf16_to_float32(got)
        want32 = want.to(torch.bfloat16).float().numpy()
        np.testing.assert_allclose(got32, want32, rtol=2e-2, atol=2e-2)
        # the exact values the model produced in bfloat16 round-trip bit for bit
        bits = torch.from_numpy(got.view(np.int16)).view(torch.bfloat16)
        assert torch.equal(bits.float(), torch.from_numpy(got32))
    else:
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), want.half().float().numpy(), rtol=2e-3, atol=2e-3)


def test_forward_stops_after_highest_needed_layer(tmp_path, model_factory, monkeypatch):
    import layerscope.capture.run as cap
    from layerscope.capture import sites
    m = model_factory("llama-tiny")
    ds = prepare_texts(tmp_path, m)
    calls = []
    orig = sites.decoder_layers

    def spy(model, n):
        layers = orig(model, n)
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda mod, a, i=i: calls.append(i))
        return layers

    monkeypatch.setattr(cap.S, "decoder_layers", spy)
    params = make_params({1: {"sites": ["resid_post"], "positions": "last"}}, parts=1)
    capture_store(tmp_path, {"model": m, "adapter": None}, params, ds)
    assert calls and set(calls) == {0, 1}  # layers 2 and 3 never ran


def test_more_parts_than_examples(tmp_path, model_factory):
    m = model_factory("llama-tiny")
    manifest = {"model": m, "adapter": None}
    ds = prepare_texts(tmp_path, m, texts=["one two", "three", "four five six"])
    params = make_params({0: {"sites": ["resid_post"], "positions": "last"},
                          1: {"sites": ["mlp_act"], "positions": "all"}}, parts=5)
    root = capture_store(tmp_path, manifest, params, ds)
    ref = reference(manifest, ds)
    got, _ = read(root, 0, "resid_post")
    np.testing.assert_allclose(got, np.stack([r[-1] for r in ref[(0, "resid_post")]]), rtol=1e-4, atol=1e-4)
    got, _ = read(root, 1, "mlp_act")
    np.testing.assert_allclose(got, np.concatenate(ref[(1, "mlp_act")]), rtol=1e-4, atol=1e-4)
    for p in range(5):  # every part, empty or not, leaves its completion marker
        assert marker_path(root, 0, "resid_post", p, "last").is_file()


def test_moe_mlp_act_refused_at_capture_time(tmp_path, model_factory):
    # The config check refuses this first; a model it cannot recognise (remote code) stops here.
    from layerscope.errors import ModelError

    m = model_factory("mixtral-tiny")
    ds = prepare_texts(tmp_path, m)
    params = make_params({0: {"sites": ["mlp_act"], "positions": "last"}}, parts=1)
    with pytest.raises(ModelError, match=r"^layer 0: mlp_act is not defined for MixtralSparseMoeBlock \(a sparse "
                                         r"mixture-of-experts MLP: each expert has its own neurons\); use mlp_out"):
        capture_store(tmp_path, {"model": m, "adapter": None}, params, ds)


def test_opt_mlp_hooks_leave_no_trace(model_factory):
    # OPT's MLP sites hook fc2 and the layer itself (for the [batch, seq] shape); removal takes both.
    from layerscope.models.loading import load_model
    from layerscope.capture.sites import attach, decoder_layers

    m = model_factory("opt-tiny")
    model, _ = load_model({"model": m, "adapter": None})
    layer = decoder_layers(model, m["num_layers"])[1]
    handles = [attach(layer, 1, s, lambda x: None) for s in ("mlp_out", "mlp_act")]
    assert layer._forward_pre_hooks and layer.fc2._forward_hooks and layer.fc2._forward_pre_hooks
    for h in handles:
        h.remove()
    assert not (layer._forward_pre_hooks or layer.fc2._forward_hooks or layer.fc2._forward_pre_hooks)
