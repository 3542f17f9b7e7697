"""LayerScope: capture per-layer activations of causal language models into sharded Zarr v3 stores."""

from layerscope.errors import LayerScopeError, ConfigError, DataError, ModelError

__all__ = ["__version__", "open", "Run", "LayerScopeError", "ConfigError", "DataError", "ModelError"]


def __getattr__(name: str):
    # Loaded on first use: every workflow job imports this package, and the jobs that hand their
    # step to the warm worker need neither numpy (the reader) nor importlib.metadata (the version,
    # 15 ms of such a job's 0.1 s) themselves.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("layerscope")
        except PackageNotFoundError:  # running from a source tree without installation
            value = "0.0.0+unknown"
        globals()["__version__"] = value
        return value
    if name in ("Run", "open"):
        from layerscope.store import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'layerscope' has no attribute {name!r}")
