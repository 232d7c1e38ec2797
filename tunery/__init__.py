"""Tunery: adapt language models to a domain and align them with human feedback, on your own machine."""

from tunery import _imports

__version__ = "0.1.0"

_imports.install()  # bitsandbytes imported with the hub offline (see _imports.py)
