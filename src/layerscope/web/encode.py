"""The page's data: the summary with numpy arrays as base64 typed arrays (layerscope.packed), as
compact JSON that is safe inside a <script> element."""

from __future__ import annotations

import json
from typing import Any

from layerscope.packed import pack

# Nothing in the text may close the <script> element, open a comment, or end a JS line.
_ESCAPES = (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def embed_json(obj: Any) -> str:
    """``obj`` (numpy arrays allowed) as JSON safe inside <script type="application/json">."""
    text = json.dumps(pack(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for a, b in _ESCAPES:
        text = text.replace(a, b)
    return text
