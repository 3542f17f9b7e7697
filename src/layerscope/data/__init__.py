"""Data sets: reading records, tokenizing, per-example metadata."""
