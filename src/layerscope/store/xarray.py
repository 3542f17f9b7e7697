"""A run as an xarray Dataset: lazy (dask), labelled by example id, split and token position.

One variable per stored array (``layer_03.resid_post``). Arrays captured at every token have a
``token`` dimension with coordinates ``token_example`` (index), ``token_example_id``,
``token_split``, ``position`` (within the example) and ``token_id``; last-position arrays have an
``example`` dimension with ``example_id`` and ``split``. Widths are ``hidden`` / ``neuron`` (the MLP's), or
``{site}.width`` for any other (LoRA ranks). Arrays captured at a span (``response``) have a
dimension of their own (``response_token``, see store/rows.row_dim) with the same coordinates
under its name: ``response_token_example``, ``response_token_example_id``, ``response_token_split``,
``response_token_position``, ``response_token_id``. A token's example is ``token_example``
(``token_example_id``, ``token_split``), so ``ds.isel(token=ds.token_split == "EM")`` selects a split. bfloat16 is widened to float32 exactly, so no user
sees raw 16-bit patterns; nothing is read until asked (``.sel(...).values`` reads those rows).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from layerscope.errors import LayerScopeError
from layerscope.store.rows import row_dim


class _Rows:
    """The slicing interface dask.array.from_array needs, over a reader view's rows."""

    def __init__(self, acts) -> None:
        self.acts = acts
        self.shape = acts.shape
        self.dtype = np.dtype(np.float32 if acts.dtype == "bfloat16" else acts.dtype)
        self.ndim = 2

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        r0, r1, step = rows.indices(self.shape[0])
        block = self.acts.rows(r0, r1)
        return block[::step][:, cols] if step != 1 else block[:, cols]


def to_xarray(run) -> Any:
    """The run's arrays as one lazy xarray.Dataset (needs xarray and dask: pip install xarray dask)."""
    try:
        import dask.array as da
        import xarray as xr
    except ImportError as e:
        raise LayerScopeError(f"to_xarray needs xarray and dask ({e}); pip install xarray dask") from e
    examples = run.examples
    ids = np.array([ex["id"] for ex in examples], dtype=object)
    splits = np.array([ex["split"] for ex in examples], dtype=object)
    hidden, neurons = run.metadata["hidden_dim"], run.metadata.get("intermediate_dim")
    data_vars, row_maps = {}, {}
    for layer, site in run.arrays:
        acts = run.activations(layer, site)
        rows = row_dim(acts.positions)
        row_maps.setdefault(rows, acts.map)
        width = "hidden" if acts.width == hidden else "neuron" if acts.width == neurons or site == "mlp_act" \
            else f"{site}.width"
        chunk = int(acts.attrs.get("layout", {}).get("shard_rows") or max(1, (64 << 20) // (acts.width * 4)))
        data_vars[f"layer_{layer:02d}.{site}"] = ((rows, width), da.from_array(_Rows(acts), chunks=(chunk, -1)))
    coords: dict[str, Any] = {"example_id": ("example", ids), "split": ("example", splits)}
    token_ids = None
    for dim, m in row_maps.items():
        if dim == "example":
            continue
        if token_ids is None:
            token_ids = np.asarray(run.group["tokens/ids"][:]) if "tokens/ids" in run.group else None
        owner = m.examples()
        # the token dimension keeps its historical names; a span's carry its dimension's name
        pre, pos, tid = ("token_", "position", "token_id") if dim == "token" else (f"{dim}_", f"{dim}_position",
                                                                                   f"{dim}_id")
        coords |= {f"{pre}example": (dim, owner), f"{pre}example_id": (dim, ids[owner]),
                   f"{pre}split": (dim, splits[owner]), pos: (dim, m.tokens - m.token_offsets[owner])}
        if token_ids is not None:
            coords[tid] = (dim, token_ids[m.tokens])
    return xr.Dataset(data_vars, coords=coords, attrs={"run": str(run.path), "model": run.metadata["model_name"],
                                                        "variant": run.variant})
