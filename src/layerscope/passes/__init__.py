"""Prompted passes (seed 004): questions rendered through a template per pass, the model's answer
distribution and optional generation, per-question metadata, and reports."""
