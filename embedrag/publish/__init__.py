"""What leaves a run: model cards, usage snippets, loss curves, merged models."""
