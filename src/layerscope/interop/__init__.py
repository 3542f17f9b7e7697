"""Interop: a finished run written in the layouts older tools read (``python -m layerscope export``)."""
