"""Reading a finished run back: metadata, examples, and lazy activation views.

    run = layerscope.open("results/demo")
    acts = run.activations(7, "resid_post", split="EM")   # lazy view, nothing read yet
    x = acts[0]            # example 0 of the split: [hidden] ("last") or [n_tokens, hidden] ("all")
    for rows, block in acts.iter_shards(): ...             # bounded memory, shard by shard

Which token each row holds (every token, one per example, or a span's tokens) is store/rows.py's
RowMap: ``acts.tokens`` and ``acts.row_examples`` say it for a view's rows.

Every read checks, after it, that the capture jobs the store was finalized with still own the
array (its ``parts/P-POSITIONS.json`` markers): a Run opened before a re-run refuses to return rows the
re-run is rewriting. Opening a run warns when its model or adapter files changed on disk.
"""

from __future__ import annotations

import builtins
import os
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from layerscope.errors import IncompleteRunError, LayerScopeError
from layerscope.fileio import read_json
from layerscope.store.rows import RowMap, array_rows, is_span, span_names, span_tokens
from layerscope.store.shards import ShardMap

STORE = "activations.zarr"


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bit patterns (uint16) to float32, exactly."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class PartMarkers:
    """The completion markers ``parts/P-POSITIONS.json`` of one array and the job ids the store was finalized with.

    ``check`` costs one ``os.stat`` per part while nothing changed: a marker is re-read only when
    its inode, size or mtime differs from the last time it was found good.
    """

    def __init__(self, root: Path, apath: str, jobs: list[str], positions: str) -> None:
        from layerscope.store.layout import marker_path

        self.root, self.apath, self.jobs = Path(root), apath, list(jobs)
        layer, site = apath.split("/")
        self.paths = [marker_path(self.root, int(layer.removeprefix("layer_")), site, p, positions)
                      for p in range(len(self.jobs))]
        self._good: list[tuple[int, int, int] | None] = [None] * len(self.jobs)

    def check(self) -> None:
        """Raise IncompleteRunError if a part's marker is gone or names another job than at finalize."""
        for p, path in enumerate(self.paths):
            try:
                st = os.stat(path)
            except OSError:
                self._fail(p)
            sig = (st.st_ino, st.st_size, st.st_mtime_ns)
            if sig == self._good[p]:
                continue
            # stat before reading: a marker replaced after the stat shows a new signature next time
            try:
                ok = read_json(path)["job"] == self.jobs[p]
            except (OSError, ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                self._fail(p)
            self._good[p] = sig

    def _fail(self, part: int) -> None:
        raise IncompleteRunError(f"{self.root}: {self.apath} part {part} was removed or is being rewritten since "
                                 "this run was opened; wait for the workflow to finish, then open the run again")


def _shard_map(array, attrs: dict[str, Any], array_dir: Path | None) -> ShardMap | None:
    """A direct reader for arrays LayerScope wrote uncompressed; None where zarr must decode."""
    layout = attrs.get("layout")
    if array_dir is None or layout is None or array.compressors or array.filters:
        return None
    fill = array.metadata.fill_value
    return ShardMap(array_dir, layout["rows"], layout["width"], layout["chunk_rows"], layout["shard_rows"],
                    array.dtype, fill)


class Activations:
    """A lazy view of one layer x site array, optionally restricted to a range of examples;
    ``rows`` says which token each of the array's rows holds (store/rows.py)."""

    def __init__(self, array, rows: RowMap, e0: int, e1: int, array_dir: Path | None = None,
                 direct: ShardMap | None = None, markers: PartMarkers | None = None) -> None:
        self._a = array
        self.attrs: dict[str, Any] = dict(array.attrs)
        self.positions: str = self.attrs["positions"]
        self.dtype: str = self.attrs["dtype"]
        if rows.positions != self.positions or rows.n_rows != array.shape[0]:
            raise LayerScopeError(f"layer_{self.attrs.get('layer', 0):02d}/{self.attrs.get('site')}: "
                                  f"{array.shape[0]} rows at {self.positions} positions, and the examples give "
                                  f"{rows.n_rows} at {rows.positions}; the store and its data set disagree")
        self.map = rows
        self.e0, self.e1 = e0, e1
        self._direct = direct if direct is not None else _shard_map(array, self.attrs, array_dir)
        self._markers = markers

    def __len__(self) -> int:
        return self.e1 - self.e0

    @property
    def width(self) -> int:
        return int(self._a.shape[1])

    @property
    def name(self) -> str:
        return f"layer_{self.attrs['layer']:02d}/{self.attrs['site']}"

    @property
    def per_token(self) -> bool:
        """Whether examples have a row per token (``all``) or per token of a span, not one row each."""
        return self.map.per_token

    @property
    def row_range(self) -> tuple[int, int]:
        """The rows of the underlying array this view covers."""
        return int(self.map.offsets[self.e0]), int(self.map.offsets[self.e1])

    @property
    def tokens(self) -> np.ndarray:
        """The token each row of the view holds (an index into the run's flat tokens)."""
        r0, r1 = self.row_range
        return self.map.tokens[r0:r1]

    @property
    def row_examples(self) -> np.ndarray:
        """The example each row of the view belongs to (its index in the run)."""
        return self.map.examples(*self.row_range)

    def rows_at(self, tokens: np.ndarray, what: str = "") -> np.ndarray:
        """The view-relative rows holding ``tokens`` (flat token indices); refuses a token the array
        does not hold (``what``: what the tokens are, for the message)."""
        rows = self.map.rows_of(tokens)
        r0, r1 = self.row_range
        bad = np.flatnonzero((rows < r0) | (rows >= r1))
        if bad.size:
            t = int(np.asarray(tokens)[bad[0]])
            e = int(np.searchsorted(self.map.token_offsets, t, side="right")) - 1
            raise LayerScopeError(f"{self.name} holds {self.positions} positions, which leave out {what or 'the token'}"
                                  f" {t - int(self.map.token_offsets[e])} of example {e}; capture it at positions "
                                  "that hold it (all)")
        return rows - r0

    @property
    def shape(self) -> tuple[int, int]:
        r0, r1 = self.row_range
        return (r1 - r0, self.width)

    def _convert(self, raw: np.ndarray, raw_bits: bool) -> np.ndarray:
        return bf16_to_float32(raw) if self.dtype == "bfloat16" and not raw_bits else raw

    def _checked(self, read) -> np.ndarray:
        """``read()``, refused if the array's capture jobs changed. Checking after the read suffices:
        Snakemake deletes a capture job's markers (its outputs) before the job touches a shard, and
        the job writes new ones, with new ids, last."""
        if self._markers is None:
            return read()
        try:
            out = read()
        except Exception:
            self._markers.check()  # a re-run in progress explains a failed read better than the error itself
            raise
        self._markers.check()
        return out

    def _read(self, r0: int, r1: int) -> np.ndarray:
        """Absolute rows [r0, r1) of the array: straight from the shard files when uncompressed."""
        if self._direct is not None:
            return self._checked(lambda: self._direct.read(r0, r1))
        return self._checked(lambda: self._a[r0:r1])

    def rows(self, r0: int, r1: int, raw: bool = False) -> np.ndarray:
        """Rows [r0, r1) of this view (view-relative)."""
        base = self.row_range[0]
        return self._convert(self._read(base + r0, base + r1), raw)

    def take(self, indices, raw: bool = False) -> np.ndarray:
        """Rows at arbitrary view-relative indices (e.g. random examples of a ``last`` array), in order."""
        idx = np.asarray(indices, dtype=np.int64) + self.row_range[0]
        if self._direct is not None:
            return self._convert(self._checked(lambda: self._direct.take(idx)), raw)
        return self._convert(self._checked(lambda: self._a.get_orthogonal_selection((idx, slice(None)))), raw)

    def example(self, i: int, raw: bool = False) -> np.ndarray:
        """Example i of this view: [width] for ``last``/``answer`` arrays, [rows, width] for the others
        (every token for ``all``, the span's tokens for a span: possibly none)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} out of range for a view of {n} examples")
        e = self.e0 + (i % n)
        r0, r1 = int(self.map.offsets[e]), int(self.map.offsets[e + 1])
        x = self._convert(self._read(r0, r1), raw)
        return x if self.per_token else x[0]

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return Activations(self._a, self.map, self.e0 + start, self.e0 + max(start, stop),
                                   direct=self._direct, markers=self._markers)
            return [self.example(k) for k in range(start, stop, step)]
        return self.example(int(i))

    def numpy(self, raw: bool = False) -> np.ndarray:
        """All rows of the view in memory ([examples, width] or [tokens, width])."""
        r0, r1 = self.row_range
        return self._convert(self._read(r0, r1), raw)

    def torch(self):
        """All rows as a torch tensor in the stored dtype (bfloat16 included)."""
        import torch

        raw = self.numpy(raw=True)
        if self.dtype == "bfloat16":
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(raw)

    def iter_shards(self, raw: bool = False) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """Yield ((row start, row end), rows) one shard at a time, like the seed guide's load_activations."""
        r0, r1 = self.row_range
        sr = self._a.shards[0] if self._a.shards else self._a.chunks[0]
        s = r0
        while s < r1:
            e = min((s // sr + 1) * sr, r1)
            yield (s - r0, e - r0), self._convert(self._read(s, e), raw)
            s = e


class Run:
    """A finished LayerScope run directory (``results/{run}``)."""

    def __init__(self, path: str | os.PathLike, variant: str | None = None) -> None:
        """``variant``: which forward pass to read where the run captured several (``base`` beside
        an adapter); None reads the main store."""
        import zarr

        self.path = Path(path)
        meta = self.path / "metadata.json"
        if not meta.is_file():
            raise IncompleteRunError(f"{self.path}: no metadata.json; the workflow has not finished this run "
                                     "(run snakemake) or this is not a LayerScope run directory")
        md = read_json(meta)
        # A prompted pass's metadata.json is seed 004's list of questions; its run-level metadata is beside it.
        self.questions: list[dict[str, Any]] | None = md if isinstance(md, list) else None
        if self.questions is not None:
            md = read_json(self.path / "run_metadata.json")
        self.metadata: dict[str, Any] = md
        stores = self.variants
        if variant is not None and variant.startswith("steer-") and (self.path / f"activations.{variant}.zarr").is_dir():
            stores = {**stores, variant: f"activations.{variant}.zarr"}  # a steered run (steering.runs)
        if variant is not None and variant not in stores:
            raise LayerScopeError(f"{self.path}: no variant {variant!r}; it has {', '.join(stores)} "
                                  "(capture.variants)")
        self.variant = variant or next(iter(stores))
        self.store_path = self.path / stores[self.variant]
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
                self.group = zarr.open_group(str(self.store_path), mode="r", zarr_format=3, use_consolidated=True)
        except Exception as e:
            raise IncompleteRunError(f"{self.store_path}: store is missing or unfinished ({e})") from e
        from layerscope.store.layout import check_complete

        check_complete(self.store_path, dict(self.group.attrs))
        self._info = dict(self.group.attrs)["layerscope"]
        # metadata.json is written beside the store's finalization: either may be the older one
        if self.variant == next(iter(self.variants)) and sorted(md["arrays"]) != self._info["arrays"]:
            raise IncompleteRunError(f"{self.path}: metadata.json and {stores[self.variant]} list different "
                                     "arrays; the workflow has not finished this run (run snakemake)")
        self._markers: dict[str, PartMarkers] = {}
        self._rows: dict[str, RowMap] = {}
        self.offsets: np.ndarray = self.group["tokens/offsets"][:]
        for msg in model_changes(self.path):
            warnings.warn(msg, UserWarning, stacklevel=3)

    @property
    def variants(self) -> dict[str, str]:
        """Variant -> store directory name, the main store first (one entry for a run of one pass)."""
        return self.metadata.get("variants") or {"main": STORE}

    def to_xarray(self):
        """Every array as one lazy (dask) xarray.Dataset with example, split and token coordinates
        (see store/xarray.py; needs xarray and dask)."""
        from layerscope.store.xarray import to_xarray

        return to_xarray(self)

    def __repr__(self) -> str:
        return (f"Run({str(self.path)!r}: {self.metadata.get('model_name')}, {len(self)} examples, "
                f"layers {self.layers}, sites {self.sites})")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @cached_property
    def arrays(self) -> list[tuple[int, str]]:
        """(layer, site) of every stored array."""
        out = []
        for p in self._info["arrays"]:
            layer, site = p.split("/")
            out.append((int(layer.split("_")[1]), site))
        return sorted(out)

    @property
    def layers(self) -> list[int]:
        return sorted({L for L, _ in self.arrays})

    @property
    def sites(self) -> list[str]:
        return sorted({s for _, s in self.arrays})

    @cached_property
    def examples(self) -> list[dict[str, Any]]:
        from layerscope.data.dataset import load_examples

        return load_examples(self.path / "dataset" / "examples.jsonl")

    @cached_property
    def splits(self) -> dict[str, tuple[int, int]]:
        """Split name -> (first example, end example): splits are contiguous in the store."""
        out: dict[str, list[int]] = {}
        for ex in self.examples:
            r = out.setdefault(ex["split"], [ex["index"], ex["index"] + 1])
            r[1] = ex["index"] + 1
        return {k: (v[0], v[1]) for k, v in out.items()}

    def tokens(self, i: int) -> np.ndarray:
        """Token ids of example i."""
        return self.group["tokens/ids"][int(self.offsets[i]):int(self.offsets[i + 1])]

    def layer_index(self, layer: int) -> int:
        """A layer number as stored: negative numbers count from the end of the model's layers (-1: the last)."""
        n = int(self.metadata["num_layers"])
        if layer < 0:
            if layer < -n:
                raise LayerScopeError(f"{self.path}: layer {layer} is out of range for a model with {n} layers")
            return n + layer
        return layer

    def activations(self, layer: int, site: str = "resid_post", split: str | None = None) -> Activations:
        """Lazy view of one layer x site (layer -1 is the model's last), for one split or for all examples."""
        layer = self.layer_index(layer)
        key = f"layer_{layer:02d}/{site}"
        if (layer, site) not in self.arrays:
            raise LayerScopeError(f"{self.path}: no array {key} (stored: "
                                  + ", ".join(f"layer_{L:02d}/{s}" for L, s in self.arrays) + ")")
        e0, e1 = 0, len(self)
        if split is not None:
            if split not in self.splits:
                raise LayerScopeError(f"{self.path}: no split {split!r} (splits: {', '.join(self.splits)})")
            e0, e1 = self.splits[split]
        markers = self._markers.get(key)
        if markers is None and key in self._info["jobs"]:
            markers = self._markers[key] = PartMarkers(self.store_path, key, self._info["jobs"][key],
                                                                self._info["positions"][key])
        if markers is not None:
            markers.check()
        array = self.group[key]
        return Activations(array, self.rows(array.attrs["positions"]), e0, e1, array_dir=self.store_path / key,
                           markers=markers)

    def rows(self, positions: str) -> RowMap:
        """Which token each row of an array at ``positions`` holds (store/rows.py), from this run's
        offsets, its examples' spans and answer positions."""
        if positions not in self._rows:
            from layerscope.data.dataset import load_answer_index

            spans = [ex.get("spans") for ex in self.examples] if is_span(positions) else None
            answer = load_answer_index(self.path / "dataset", self.offsets) if positions == "answer" else None
            self._rows[positions] = array_rows(positions, self.offsets, spans, answer, where=f"{self.path}: ")
        return self._rows[positions]

    def capture_jobs(self, layer: int, site: str) -> list[str]:
        """Ids of the capture jobs that wrote one array, a part each: new ones whenever it is captured again."""
        return list(self._info["jobs"].get(f"layer_{self.layer_index(layer):02d}/{site}", []))

    def iter_shards(self, layer: int, site: str = "resid_post", split: str | None = None):
        return self.activations(layer, site, split).iter_shards()

    def token_mask(self, positions: str) -> np.ndarray:
        """True for every stored token inside ``positions`` of its example: a span the data set
        records (``prompt``, ``response``, ``role:NAME`` for chat records; ``prompt``/``response``
        of a prompted pass's prompt and reply)."""
        spans = [ex.get("spans") for ex in self.examples]
        _, tokens = span_tokens(positions, self.offsets, spans, where=f"{self.path}: ")  # refuses no spans at all
        names = span_names(spans)
        if positions not in names:
            raise LayerScopeError(f"{self.path}: no span {positions!r} in its examples (spans: {', '.join(sorted(names))})")
        mask = np.zeros(int(self.offsets[-1]), dtype=bool)
        mask[tokens] = True
        return mask

    def select(self, layer: int, site: str, positions: str, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The rows of an array at the tokens of a span (see ``token_mask``), and each row's example
        index: e.g. only the assistant's tokens, ``run.select(10, "resid_post", "response")``. The
        array must hold every token of the span: an ``all`` array, or one captured at that span
        (or a wider one: ``response`` holds ``role:assistant``)."""
        acts = self.activations(layer, site, split)
        if not acts.per_token:
            raise LayerScopeError(f"{self.path}: layer_{self.layer_index(layer):02d}/{site} holds {acts.positions} "
                                  "positions; selecting a span needs its tokens (capture.positions: all, or the span)")
        e0, e1 = acts.e0, acts.e1
        t0 = int(self.offsets[e0])
        tokens = np.flatnonzero(self.token_mask(positions)[t0:int(self.offsets[e1])]) + t0
        rows = acts.rows_at(tokens, f"{positions} token")
        owner = np.searchsorted(self.offsets, tokens, side="right") - 1
        return acts.take(rows), owner

    def bytes_on_disk(self, layer: int | None = None, site: str | None = None) -> int:
        root = self.store_path
        if layer is not None:
            root = root / f"layer_{self.layer_index(layer):02d}" / (site or "")
        return builtins.sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def _file_changes(directory: Path, recorded: list[dict[str, Any]]) -> list[str]:
    """How the files of ``directory`` differ from the manifest's entries, by path: size and mtime only,
    never a hash (models are large). Entries of older manifests have no mtime_ns; only sizes count there."""
    from layerscope.models.loading import _file_entries

    if not directory.is_dir():
        return [f"directory {directory} is missing"]
    was = {e["path"]: e for e in recorded}
    now = {e["path"]: e for e in _file_entries(directory, digest=False)}
    out = []
    for path in sorted(was.keys() | now.keys()):
        a, b = was.get(path), now.get(path)
        if b is None:
            out.append(f"{path} is missing")
        elif a is None:
            out.append(f"{path} is new")
        elif a["bytes"] != b["bytes"]:
            out.append(f"{path} changed size ({a['bytes']} -> {b['bytes']} bytes)")
        elif "mtime_ns" in a and a["mtime_ns"] != b["mtime_ns"]:
            out.append(f"{path} was modified")
    return out


def model_dir(run_dir: str | os.PathLike) -> Path:
    """The run's ``model/`` directory (manifests): its own, or for a prompted pass its run's."""
    run_dir = Path(run_dir)
    own = run_dir / "model"
    return own if own.is_dir() or not (run_dir.parent / "model").is_dir() else run_dir.parent / "model"


def model_changes(run_dir: str | os.PathLike) -> list[str]:
    """One message per model or adapter directory whose files no longer match ``model/manifest.json``
    (the adapter's entry may live alone in ``model/adapter.json``, which then wins); [] if all match."""
    run_dir = Path(run_dir)
    mdir = model_dir(run_dir)
    if not (mdir / "manifest.json").is_file():
        return []
    manifest = read_json(mdir / "manifest.json")
    adapter = ((read_json(mdir / "adapter.json") or {}).get("adapter") if (mdir / "adapter.json").is_file()
               else manifest.get("adapter"))
    out = []
    for what, m in (("model", manifest.get("model")), ("adapter", adapter)):
        if not m or "files" not in m:
            continue
        changes = _file_changes(Path(m["path"]), m["files"])
        if changes:
            more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
            out.append(f"{run_dir}: {what} {m.get('id', m['path'])} changed on disk since this run was captured: "
                       f"{changes[0]}{more}; the activations may not match the files now in {m['path']}")
    return out


def open(path: str | os.PathLike, variant: str | None = None) -> Run:  # noqa: A001 - mirrors zarr.open
    """Open a finished run directory (``results/{run}``); ``variant`` picks a store of capture.variants."""
    return Run(path, variant)
