"""Training data: input formats, rows, tokens, the training set, mixtures and streaming."""
