"""Evaluation: the paper's self-correction metrics, inference-compute scaling, ablations,
reports."""
