"""Evaluation and benchmarking (``safefm-eval``, ``safefm-bench``): never imported by the per-frame path."""
