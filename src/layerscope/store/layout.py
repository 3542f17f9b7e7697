"""The Zarr v3 store of a run: array layout, metadata, shard writing and completion markers.

Layout of ``activations.zarr``::

    zarr.json                     root group, consolidated metadata (written last, by finalize)
    tokens/ids, tokens/offsets    the ragged token ids of every example
    tokens/example                each token's example (index)
    examples/id, examples/split   each example's id and split (strings)
    layer_07/zarr.json            a group per layer
    layer_07/resid_post/          an array per layer x site: [example, hidden], [token, hidden], or a
                                  span's [response_token, hidden] (rows.py says which token a row is)
        zarr.json, c/<shard>/0    Zarr metadata and shards
        parts/<p>-<positions>.json  completion marker of the capture job that wrote part p

Rows are split into ``parts`` contiguous ranges aligned to whole shards, so no two jobs ever
write the same shard, and every shard is written whole, once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.errors import IncompleteRunError
from layerscope.fileio import atomic_write_bytes, read_json, write_json

log = logging.getLogger("layerscope.store.layout")

MIB = 1 << 20
BF16_NAN = 0x7FC0
STORAGE_DTYPES = {"float16": np.dtype("float16"), "float32": np.dtype("float32"), "bfloat16": np.dtype("uint16")}


@dataclass(frozen=True)
class Layout:
    """How the rows of one array are chunked, sharded and split into parts."""

    rows: int
    width: int
    chunk_rows: int
    shard_rows: int
    part_rows: int
    parts: int

    def part_range(self, part: int) -> tuple[int, int]:
        return min(part * self.part_rows, self.rows), min((part + 1) * self.part_rows, self.rows)

    def shard_range(self, part: int) -> range:
        r0, r1 = self.part_range(part)
        if r0 >= r1:
            return range(0)
        return range(r0 // self.shard_rows, math.ceil(r1 / self.shard_rows))

    @property
    def num_shards(self) -> int:
        return math.ceil(self.rows / self.shard_rows)


def make_layout(rows: int, width: int, itemsize: int, parts: int, chunk_mib: float, shard_mib: float) -> Layout:
    """Chunks of about ``chunk_mib``, shards of about ``shard_mib``, parts that are whole shards."""
    per_part = max(1, math.ceil(rows / parts))
    row_bytes = width * itemsize
    chunk = max(1, int(chunk_mib * MIB // row_bytes))
    # Whole 4 KiB blocks per chunk where the size allows, so chunks can go to disk with O_DIRECT.
    step = 4096 // math.gcd(row_bytes, 4096)
    if chunk >= step:
        chunk -= chunk % step
    chunk = min(chunk, per_part)
    shard_chunks = max(1, min(int(shard_mib * MIB // row_bytes) // chunk, math.ceil(per_part / chunk)))
    shard = shard_chunks * chunk
    part_rows = math.ceil(per_part / shard) * shard
    return Layout(rows, width, chunk, shard, part_rows, parts)


def array_path(layer: int, site: str) -> str:
    return f"layer_{layer:02d}/{site}"


def marker_path(root: str | os.PathLike, layer: int, site: str, part: int | str, positions: str) -> Path:
    """A capture job's completion marker for one part of one array.

    The position mode is part of the name: a job's outputs then say everything it captures,
    so a changed mode re-runs the job through a missing output, and the job's params can stay
    the same for every block (see config.Plan.job_params).
    """
    return Path(root) / array_path(layer, site) / "parts" / f"{part}-{positions}.json"


def _codecs(store_cfg: dict[str, Any]):
    from zarr.codecs import BloscCodec, ZstdCodec

    c = store_cfg.get("compression", "none")
    level = store_cfg.get("compression_level", 3)
    if c == "zstd":
        return [ZstdCodec(level=level)]
    if c == "blosc":
        return [BloscCodec(cname="zstd", clevel=min(level, 9), shuffle="bitshuffle")]
    return None


def array_metadata(layout: Layout, dtype: str, store_cfg: dict[str, Any], attrs: dict[str, Any],
                   dims: tuple[str, str]) -> bytes:
    """The zarr.json of an array, rendered in memory so that every job writes identical bytes."""
    import zarr
    from zarr.storage import MemoryStore

    storage = STORAGE_DTYPES[dtype]
    fill = BF16_NAN if dtype == "bfloat16" else np.nan
    mem = MemoryStore()
    zarr.create_array(mem, shape=(layout.rows, layout.width), dtype=storage,
                      chunks=(layout.chunk_rows, layout.width), shards=(layout.shard_rows, layout.width),
                      fill_value=fill, compressors=_codecs(store_cfg), filters=None, dimension_names=dims,
                      attributes={**attrs, "dtype": dtype, "storage_dtype": str(storage), "layout": asdict(layout)},
                      zarr_format=3)
    return bytes(mem._store_dict["zarr.json"].to_bytes())


def group_metadata(attrs: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs or {}}, indent=2).encode()


def prepare_array(root: Path, layer: int, site: str, part: int, layout: Layout, meta: bytes,
                  keep: set[int] = frozenset()) -> None:
    """Write the array's metadata and remove this part's old shards except ``keep`` (and, for the
    last part, any beyond the end)."""
    apath = root / array_path(layer, site)
    # The part's marker goes first: a reader that opened the run before this re-run then refuses
    # the array instead of reading shards that are about to change.
    for old in (apath / "parts").glob(f"{part}-*.json"):
        old.unlink()
    atomic_write_bytes(root / f"layer_{layer:02d}" / "zarr.json", group_metadata({"layer": layer}))
    atomic_write_bytes(apath / "zarr.json", meta)
    cdir = apath / "c"
    if cdir.is_dir():
        mine = set(layout.shard_range(part))
        last = part == layout.parts - 1
        for d in cdir.iterdir():
            if d.name.isdigit() and int(d.name) not in keep and (int(d.name) in mine or
                                                                 (last and int(d.name) >= layout.num_shards)):
                shutil.rmtree(d, ignore_errors=True)


def parse_marker(path: str | os.PathLike) -> tuple[int, str, str]:
    """(layer, site, positions) of the array a marker path belongs to."""
    p = Path(path)
    positions = p.stem.split("-", 1)[1]
    return int(p.parents[2].name.removeprefix("layer_")), p.parents[1].name, positions


def write_marker(root: Path, layer: int, site: str, part: int, positions: str, info: dict[str, Any]) -> str:
    """Record that ``part`` of an array is complete; returns the marker's unique job id."""
    job = uuid.uuid4().hex
    write_json(marker_path(root, layer, site, part, positions), {"part": part, "job": job, "positions": positions,
                                                                 **info})
    return job


def marker_counts(markers: list[dict[str, Any]]) -> dict[str, int]:
    """An array's values stored as NaN/inf and those out of the storage dtype's range, summed over
    its parts' markers."""
    return {k: sum(m.get(k, 0) for m in markers) for k in ("nonfinite", "clipped")}


def array_records(root: str | os.PathLike, markers: list[str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """Each array's record in metadata.json, from its parts' completion markers and the zarr.json
    its capture jobs wrote: what finalize rolls up, read without waiting for it."""
    root = Path(root)
    found: dict[str, list[dict[str, Any]]] = {}
    for m in markers:
        layer, site, _ = parse_marker(m)
        found.setdefault(array_path(layer, site), []).append(read_json(m))
    records = {}
    for apath in sorted(found):
        meta = read_json(root / apath / "zarr.json")
        at = meta["attributes"]
        records[apath] = {"layer": at["layer"], "site": at["site"], "positions": at["positions"],
                          "shape": meta["shape"], "dimension_names": meta["dimension_names"], "dtype": at["dtype"],
                          "storage_dtype": at["storage_dtype"], "layout": at["layout"],
                          **marker_counts(found[apath])}
    return records


def finalize(root: str | os.PathLike, arrays: list[tuple[int, str, str]], parts: int, token_ids: np.ndarray,
             offsets: np.ndarray, attrs: dict[str, Any], examples: list[dict[str, Any]] | None = None
             ) -> dict[str, Any]:
    """Check every part of every array ((layer, site, positions) triples) is complete, add the
    tokens (and, given ``examples``, each example's id and split and each token's example, so
    that any Zarr or xarray reader can select a split), drop arrays and markers no longer
    planned, and write the consolidated root metadata (the store's 'finished' flag)."""
    import zarr

    root = Path(root)
    jobs: dict[str, list[str]] = {}
    markers: dict[str, list[dict[str, Any]]] = {}
    missing = []
    for layer, site, pos in arrays:
        apath = array_path(layer, site)
        found = []
        for p in range(parts):
            m = marker_path(root, layer, site, p, pos)
            if not m.is_file():
                missing.append(f"{apath} part {p} ({pos} positions)")
                continue
            found.append(read_json(m))
        jobs[apath] = [m["job"] for m in found]
        markers[apath] = found
        if not missing:
            keep = {marker_path(root, layer, site, p, pos).name for p in range(parts)}
            for old in (root / apath / "parts").glob("*.json"):
                if old.name not in keep:  # another position mode or part count, captured earlier
                    old.unlink()
    if missing:
        raise IncompleteRunError(f"{root}: capture incomplete, missing: {', '.join(missing[:10])}")
    planned = {array_path(L, s) for L, s, _ in arrays}
    for d in sorted(root.glob("layer_*")):
        for a in sorted(p for p in d.iterdir() if p.is_dir()):
            if f"{d.name}/{a.name}" not in planned:
                log.info("removing %s/%s: no longer in the config", d.name, a.name)
                shutil.rmtree(a)
        if d.is_dir() and not any(p.is_dir() for p in d.iterdir()):
            shutil.rmtree(d)
    counts = {}
    for apath, found in markers.items():
        c = marker_counts(found)
        counts[apath] = c
        if c["nonfinite"]:
            log.warning("%s: %d values stored as NaN or inf (%d out of the storage dtype's range)", apath,
                        c["nonfinite"], c["clipped"])
    g = zarr.open_group(str(root), mode="a", zarr_format=3)
    chunk = max(1, min(len(token_ids), 1 << 20))
    t = g.create_array("tokens/ids", shape=token_ids.shape, dtype="int32", chunks=(chunk,), overwrite=True,
                       dimension_names=["token"], compressors=None, fill_value=-1)
    t[:] = token_ids
    o = g.create_array("tokens/offsets", shape=offsets.shape, dtype="int64", chunks=(len(offsets),),
                       overwrite=True, dimension_names=["example_edge"], compressors=None, fill_value=-1)
    o[:] = offsets
    if examples is not None:
        n = len(offsets) - 1
        for key in ("id", "split"):
            a = g.create_array(f"examples/{key}", shape=(n,), dtype=str, chunks=(max(n, 1),), overwrite=True,
                               dimension_names=["example"])
            a[:] = np.array([str(ex[key]) for ex in examples], dtype=object)
        e = g.create_array("tokens/example", shape=token_ids.shape, dtype="int32", chunks=(chunk,), overwrite=True,
                           dimension_names=["token"], compressors=None, fill_value=-1)
        e[:] = np.repeat(np.arange(n, dtype=np.int32), np.diff(offsets))
    g.attrs.update({"layerscope": {**attrs, "arrays": sorted(planned), "parts": parts, "jobs": jobs,
                                   "positions": {array_path(L, s): pos for L, s, pos in arrays},
                                   "nonfinite": counts}})
    with warnings.catch_warnings():
        # Consolidated metadata is a zarr-python extension to v3; we rely on it knowingly.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(root), zarr_format=3)
    return jobs


def check_complete(root: str | os.PathLike, group_attrs: dict[str, Any]) -> None:
    """Raise IncompleteRunError if a capture job re-ran (or is running) since the store was finalized."""
    root = Path(root)
    info = group_attrs.get("layerscope")
    if not info:
        raise IncompleteRunError(f"{root}: not a finished LayerScope store (no 'layerscope' attributes)")
    for apath, ids in info["jobs"].items():
        pos = info["positions"][apath]
        for p, job in enumerate(ids):
            m = root / apath / "parts" / f"{p}-{pos}.json"
            try:
                ok = read_json(m)["job"] == job
            except (OSError, ValueError, KeyError):
                ok = False
            if not ok:
                raise IncompleteRunError(f"{root}: {apath} part {p} was removed or is being rewritten since the "
                                         "store was finalized; re-run the workflow")
