"""Capture: hooks on model sites, chained per-block jobs, per-block model loads, GPU claiming."""
