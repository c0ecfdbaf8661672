"""Pagoda: the whole large-language-model stack, storey by storey (see docs/architecture.md)."""

__version__ = "0.1.0"
