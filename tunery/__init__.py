"""Tunery: adapt language models to a domain and align them with human feedback, on your own machine."""

__version__ = "0.1.0"
