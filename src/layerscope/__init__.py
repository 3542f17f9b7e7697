"""LayerScope: capture per-layer activations of causal language models into sharded Zarr v3 stores."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("layerscope")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from layerscope.errors import LayerScopeError, ConfigError, DataError, ModelError  # noqa: E402
from layerscope.store.reader import Run, open  # noqa: E402,A004

__all__ = ["__version__", "open", "Run", "LayerScopeError", "ConfigError", "DataError", "ModelError"]
