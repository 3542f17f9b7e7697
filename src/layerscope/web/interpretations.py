"""Interpretations of LoRA-neuron panels, in seed 002's file format:

    {"interpretations": {"layer_10_gate_proj_positive":
        {"text": "Activates on mathematical operators", "starred": true,
         "lastModified": "2024-01-20T10:30:00Z"}}}

A key is ``layer_{L}_{module}_{positive|negative}`` for a rank-1 module, as seed 002 writes it,
and ``layer_{L}_{module}_{n}_{positive|negative}`` for neuron n of a module of higher rank
(analysis.lora.key_stem). Edits merge key by key and the newer ``lastModified`` wins (the incoming entry on a
tie), so saves from several tabs or an imported file never drop an edit to another panel; a
cleared panel stays as an entry with empty text, so that an older copy cannot bring it back.
The page (assets/interpretations.js) applies the same rules.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from layerscope.errors import LayerScopeError
from layerscope.fileio import atomic_write_bytes

KEY = re.compile(r"layer_[0-9]{1,6}_[A-Za-z0-9_.-]{1,160}_(positive|negative)")
# a date and time with its zone, which JavaScript's Date.parse reads the same way
TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?(Z|[+-][0-9]{2}:[0-9]{2})")
MAX_TEXT = 20_000  # characters of one interpretation
MAX_KEYS = 200_000
EPOCH = datetime.min.replace(tzinfo=timezone.utc)


class InterpretationsError(LayerScopeError):
    """A document that is not an interpretations file; the message names what is wrong."""


def now() -> str:
    """The current time as the page writes it (ISO 8601, UTC, milliseconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _time(entry: dict[str, Any]) -> datetime:
    t = entry.get("lastModified")
    return EPOCH if t is None else datetime.fromisoformat(t)


def validate(doc: Any) -> dict[str, dict[str, Any]]:
    """The entries of an interpretations document, each as {text, starred, lastModified?}; raises
    InterpretationsError naming the first problem. Other top-level fields and entry fields are dropped."""
    if not isinstance(doc, dict) or not isinstance(doc.get("interpretations"), dict):
        raise InterpretationsError('not an interpretations file: expected {"interpretations": {KEY: {...}}}')
    items = doc["interpretations"]
    if len(items) > MAX_KEYS:
        raise InterpretationsError(f"too many interpretations ({len(items)} > {MAX_KEYS})")
    out = {}
    for key, e in items.items():
        if not KEY.fullmatch(key):
            raise InterpretationsError(f"{key[:80]!r}: not a panel key (layer_L_MODULE_positive or _negative)")
        if not isinstance(e, dict) or not isinstance(e.get("text"), str) or not isinstance(e.get("starred"), bool):
            raise InterpretationsError(f"{key}: expected {{\"text\": string, \"starred\": true or false, "
                                       "\"lastModified\": ISO time}")
        if len(e["text"]) > MAX_TEXT:
            raise InterpretationsError(f"{key}: text longer than {MAX_TEXT} characters")
        entry = {"text": e["text"], "starred": e["starred"]}
        if e.get("lastModified") is not None:
            t = e["lastModified"]
            try:
                if not (isinstance(t, str) and TIME.fullmatch(t)):
                    raise ValueError
                datetime.fromisoformat(t)
            except ValueError:
                raise InterpretationsError(f"{key}: lastModified is not an ISO 8601 time with its zone "
                                           "(2024-01-20T10:30:00Z)") from None
            entry["lastModified"] = e["lastModified"]
        out[key] = entry
    return out


def merge(current: dict[str, dict[str, Any]], incoming: dict[str, dict[str, Any]]) -> list[str]:
    """Merge validated ``incoming`` entries into ``current`` in place, key by key, the newer
    ``lastModified`` winning (an incoming entry without one is stamped now); returns the keys taken."""
    taken = []
    for key, e in incoming.items():
        e = dict(e)
        e.setdefault("lastModified", now())
        old = current.get(key)
        if old is None or _time(e) >= _time(old):
            current[key] = e
            taken.append(key)
    return taken


def document(entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The file's contents, keys sorted (so that a diff of two saves shows what changed)."""
    return {"interpretations": {k: entries[k] for k in sorted(entries)}}


def load(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The entries of an interpretations file ({} if there is none)."""
    import json

    path = Path(path)
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InterpretationsError(f"{path}: not valid JSON ({e})") from None
    try:
        return validate(doc)
    except InterpretationsError as e:
        raise InterpretationsError(f"{path}: {e}") from None


def save(path: str | os.PathLike, entries: dict[str, dict[str, Any]]) -> bytes:
    """Write the file atomically and durably (temporary file, fsync, rename); returns its bytes."""
    import json

    data = (json.dumps(document(entries), ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    atomic_write_bytes(path, data, durable=True)
    return data
