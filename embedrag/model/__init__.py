"""The embedding model: backbone, pooling and head; tokenizers; how a path becomes a model."""
