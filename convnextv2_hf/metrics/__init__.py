"""Metric scripts for ``evaluate`` that ship with the package (the Hub's metric scripts cannot be downloaded
offline). ``evaluate.load(TOP_K_ACCURACY)`` loads the top-1 / top-k accuracy metric."""

from pathlib import Path

TOP_K_ACCURACY = str(Path(__file__).with_name("top_k_accuracy.py"))


def load_top_k_accuracy():
    import evaluate

    return evaluate.load(TOP_K_ACCURACY)


__all__ = ["TOP_K_ACCURACY", "load_top_k_accuracy"]
