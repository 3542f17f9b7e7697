"""LayerScope: capture per-layer activations of causal language models into sharded Zarr v3 stores."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("layerscope")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from layerscope.errors import LayerScopeError, ConfigError, DataError, ModelError  # noqa: E402

__all__ = ["__version__", "open", "Run", "LayerScopeError", "ConfigError", "DataError", "ModelError"]


def __getattr__(name: str):
    # The reader (numpy) loads on first use: every workflow job imports this package, and the
    # jobs that hand their step to the warm worker need nothing of numpy themselves.
    if name in ("Run", "open"):
        from layerscope.store import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'layerscope' has no attribute {name!r}")
