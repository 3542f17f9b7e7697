"""The CUDA path: runs only where a GPU is present (never in CI, which has none)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from layerscope.models.loading import resolve_device
from tests.helpers import capture_store, make_params, prepare_texts, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# "prompt" of a plain-text example is every token: the span path (row indices built on the device) against "all"
@pytest.mark.parametrize("positions", ["all", "last", "prompt"])
def test_cuda_capture_matches_cpu_reference(tmp_path, model_factory, positions):
    assert resolve_device("auto") == "cuda"
    m = model_factory("llama-tiny")
    manifest = {"model": m, "adapter": None}
    ds = prepare_texts(tmp_path, m)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    sites = ["resid_post", "attn_out", "mlp_out", "mlp_act"]
    params = make_params({L: {"sites": sites, "positions": positions} for L in range(4)}, parts=1)
    capture_store(tmp_path, manifest, params, ds, name="s", layers_per_job=2, device="auto")
    ref = reference(manifest, ds)
    for L in range(4):
        for s in sites:
            got = zarr.open_array(str(tmp_path / "s.zarr" / f"layer_{L:02d}" / s), mode="r")[:]
            want = np.concatenate(ref[(L, s)]) if positions != "last" else np.stack([r[-1] for r in ref[(L, s)]])
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3, err_msg=f"{L} {s}")
