"""Logging set-up shared by the workflow steps: one log file per job, plus stderr."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def setup_logging(log_path: str | os.PathLike | None = None, level: int = logging.INFO,
                  mode: str = "w") -> logging.Logger:
    """Route the ``layerscope`` logger to ``log_path`` (truncated; ``mode="a"`` appends, as a job's
    own process does beside the warm worker's process writing the same log) and to stderr."""
    logger = logging.getLogger("layerscope")
    logger.setLevel(level)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_path, mode=mode, encoding="utf-8")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    logger.addHandler(sh)
    logger.propagate = False
    return logger
