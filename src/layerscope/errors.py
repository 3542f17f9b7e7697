"""Exceptions that carry one clear, user-facing message."""


class LayerScopeError(Exception):
    """Base class: the message names the problem and where it is."""


class ConfigError(LayerScopeError):
    """A configuration key has a bad value."""


class DataError(LayerScopeError):
    """A data set record is malformed."""


class ModelError(LayerScopeError):
    """A model or adapter cannot be resolved or loaded."""


class IncompleteRunError(LayerScopeError):
    """A run directory is missing outputs or is being rewritten."""
