"""Fit a summary into the page-size budget (``dashboard.budget_mib``) by cutting what matters least
first, and say what was cut so that the page can tell the reader.

Cuts, in order: neuron cards beyond 8 per layer, the per-token top-neuron links, layer x example
columns beyond 32, token x layer examples beyond 2, LoRA-neuron examples beyond 2 per list, the
remaining cards. Each step halves; texts and docs no longer referenced are dropped after every
step. The neuron index and every LoRA neuron's statistics are never cut.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def _cards(layer: dict[str, Any]) -> int:
    return len(layer["cards"])


def keep_entries(table: dict[str, Any], keep: np.ndarray) -> None:
    """Keep the ``entries`` (and their ``ctx`` values) of a card table where ``keep`` is true."""
    e = table["entries"]
    lens = np.diff(np.append(e["ctx_off"], len(table["ctx"])))
    ctx = [table["ctx"][o:o + m] for o, m in zip(e["ctx_off"][keep], lens[keep])]
    table["entries"] = {k: v[keep] for k, v in e.items()}
    table["entries"]["ctx_off"] = np.concatenate([[0], np.cumsum([len(c) for c in ctx])[:-1]]).astype(np.int64) \
        if ctx else np.zeros(0, np.int64)
    table["ctx"] = np.concatenate(ctx) if ctx else np.zeros(0, np.float32)


def cut_cards(s: dict[str, Any], n: int) -> None:
    """Keep the first ``n`` cards (they are in rank order) of every layer."""
    for layer in (s.get("neurons") or {}).get("layers", {}).values():
        if _cards(layer) <= n:
            continue
        for k in ("cards", "hist_lo", "hist_hi", "hist", "out_up", "out_up_v", "out_down", "out_down_v"):
            if k in layer:
                layer[k] = layer[k][:n]
        keep_entries(layer, layer["entries"]["card"] < n)


def lora_tables(s: dict[str, Any]) -> list[dict[str, Any]]:
    """The LoRA modules' tables (one per layer and module), each with ``entries`` like a layer of cards."""
    return [L[m] for L in ((s.get("lora") or {}).get("layers") or {}).values() for m in L["modules"]]


def _rank_in_list(e: dict[str, np.ndarray]) -> np.ndarray:
    """Each entry's place in its list (same card and kind; entries are stored best first)."""
    key = e["card"] * 3 + e["kind"]  # kinds: top, bottom, activation-range samples
    rank = np.zeros(len(key), np.int64)
    seen: dict[int, int] = {}
    for i, k in enumerate(key.tolist()):
        rank[i] = seen.get(k, 0)
        seen[k] = rank[i] + 1
    return rank


def lora_per_list(s: dict[str, Any]) -> int:
    """The longest LoRA-neuron example list."""
    return max((int(_rank_in_list(t["entries"]).max()) + 1 for t in lora_tables(s) if len(t["entries"]["card"])),
               default=0)


def cut_lora(s: dict[str, Any], n: int) -> None:
    """Keep the first ``n`` examples of every LoRA neuron's positive and negative lists."""
    for t in lora_tables(s):
        keep_entries(t, _rank_in_list(t["entries"]) < n)


def cut_token_top(s: dict[str, Any]) -> None:
    if s.get("neurons"):
        s["neurons"]["token_top"] = {}


def cut_columns(s: dict[str, Any], n: int) -> None:
    s["norms"]["columns"] = s["norms"]["columns"][:n]
    for v in s["norms"]["sites"].values():
        v["last"] = v["last"][:, :n]


def cut_token_examples(s: dict[str, Any], n: int) -> None:
    norms = s["norms"]
    docs = s["docs"]
    lengths = [int(docs["offsets"][d + 1] - docs["offsets"][d]) for d in norms["token_docs"]]
    rows = sum(lengths[:n])
    norms["token_docs"] = norms["token_docs"][:n]
    for v in norms["sites"].values():
        if "tokens" in v:
            v["tokens"] = v["tokens"][:n]
    for t in ((s.get("neurons") or {}).get("token_top") or {}).values():
        t["ids"], t["values"] = t["ids"][:rows], t["values"][:rows]


def compact_tables(s: dict[str, Any]) -> None:
    """Drop docs, examples and texts nothing refers to any more, renumbering the references."""
    docs, ex = s["docs"], s["examples"]
    layers = list((s.get("neurons") or {}).get("layers", {}).values())
    tables = layers + lora_tables(s)  # everything with card entries
    used_docs = sorted(set(s["norms"]["token_docs"]) | {int(d) for L in tables for d in L["entries"]["doc"]})
    doc_map = {d: i for i, d in enumerate(used_docs)}
    used_ex = sorted({int(docs["example"][d]) for d in used_docs} | {int(c) for c in s["norms"]["columns"]})
    ex_map = np.full(len(ex["index"]), -1, np.int64)
    ex_map[used_ex] = np.arange(len(used_ex))
    toks = [docs["toks"][docs["offsets"][d]:docs["offsets"][d + 1]] for d in used_docs]
    out_ids = [L[k] for L in layers for k in ("out_up", "out_down") if k in L]
    used_txt = np.unique(np.concatenate([np.concatenate(toks) if toks else np.zeros(0, np.int64)]
                                        + [o.ravel() for o in out_ids])).astype(np.int64)
    txt_map = np.full(len(s["texts"]), -1, np.int64)
    txt_map[used_txt] = np.arange(len(used_txt))
    s["texts"] = [s["texts"][i] for i in used_txt]
    s["docs"] = {"example": ex_map[docs["example"][used_docs]] if used_docs else np.zeros(0, np.int64),
                 "start": docs["start"][used_docs] if used_docs else np.zeros(0, np.int64),
                 "offsets": np.concatenate([[0], np.cumsum([len(t) for t in toks])]).astype(np.int64),
                 "toks": txt_map[np.concatenate(toks)] if toks else np.zeros(0, np.int64)}
    s["examples"] = {"index": ex["index"][used_ex], "id": [ex["id"][i] for i in used_ex],
                     "split": ex["split"][used_ex], "n_tokens": ex["n_tokens"][used_ex]}
    s["norms"]["token_docs"] = [doc_map[d] for d in s["norms"]["token_docs"]]
    s["norms"]["columns"] = ex_map[s["norms"]["columns"]]
    for t in tables:
        t["entries"]["doc"] = np.array([doc_map[int(d)] for d in t["entries"]["doc"]], np.int64)
    for L in layers:
        for k in ("out_up", "out_down"):
            if k in L:
                L[k] = txt_map[L[k]]


def _steps(s: dict[str, Any]) -> list[tuple[str, Callable[[], bool]]]:
    """(description, cut) pairs; a cut returns False when it has nothing left to cut."""
    def halve_cards(floor: int) -> Callable[[], bool]:
        def cut() -> bool:
            most = max((_cards(L) for L in (s.get("neurons") or {}).get("layers", {}).values()), default=0)
            if most <= floor:
                return False
            cut_cards(s, max(floor, most // 2))
            return True
        return cut

    def drop_token_top() -> bool:
        if not (s.get("neurons") or {}).get("token_top"):
            return False
        cut_token_top(s)
        return True

    def halve_columns() -> bool:
        n = len(s["norms"]["columns"])
        if n <= 32:
            return False
        cut_columns(s, max(32, n // 2))
        return True

    def halve_token_examples() -> bool:
        n = len(s["norms"]["token_docs"])
        if n <= 2:
            return False
        cut_token_examples(s, max(2, n // 2))
        return True

    def halve_lora() -> bool:
        n = lora_per_list(s)
        if n <= 2:
            return False
        cut_lora(s, max(2, n // 2))
        return True

    return [("neuron cards", halve_cards(8)), ("layers with top-neuron links of heatmap cells", drop_token_top),
            ("layer x example columns", halve_columns), ("token x layer examples", halve_token_examples),
            ("LoRA-neuron examples per list", halve_lora), ("neuron cards", halve_cards(0))]


def counts(s: dict[str, Any]) -> dict[str, int]:
    """What a reader sees the page hold, for the message about cuts."""
    layers = (s.get("neurons") or {}).get("layers", {})
    return {"neuron cards": sum(_cards(L) for L in layers.values()),
            "layers with top-neuron links of heatmap cells": len((s.get("neurons") or {}).get("token_top") or {}),
            "layer x example columns": len(s["norms"]["columns"]),
            "token x layer examples": len(s["norms"]["token_docs"]),
            "LoRA-neuron examples per list": lora_per_list(s)}


def fit(s: dict[str, Any], size: Callable[[dict[str, Any]], int], budget_bytes: int) -> dict[str, Any]:
    """Cut ``s`` in place until ``size(s)`` is within budget; return {"budget", "size", "cut": [{what, before, after}],
    "over": bool} for the page to show."""
    before = counts(s)
    n = size(s)
    for what, step in _steps(s):
        while n > budget_bytes and step():
            compact_tables(s)
            n = size(s)
    after = counts(s)
    cut = [{"what": k, "before": before[k], "after": after[k]} for k in before if after[k] != before[k]]
    return {"budget": budget_bytes, "size": n, "cut": cut, "over": n > budget_bytes}
