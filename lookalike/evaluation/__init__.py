"""Retrieval quality measures."""

from lookalike.evaluation.metrics import average_precision, mean_average_precision

__all__ = ["average_precision", "mean_average_precision"]
