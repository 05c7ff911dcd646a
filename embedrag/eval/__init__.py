"""Retrieval evaluation: metrics, evaluating a model on held-out rows, BEIR."""
