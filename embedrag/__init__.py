"""EmbedRAG: contrastive fine-tuning of text-embedding models for retrieval (RAG)."""

__version__ = "0.1.0"
