"""Held-out evaluation: loss, perplexity and each objective's own metrics."""

from ssltrain.evaluation.heldout import evaluate, reduce_metrics

__all__ = ["evaluate", "reduce_metrics"]
