"""Steering: concept vectors added to the residual stream, and what they do downstream."""
