"""The lookalike command line: ``main`` is its entry point."""

from lookalike.cli.main import main

__all__ = ["main"]
