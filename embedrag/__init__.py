"""EmbedRAG: contrastive fine-tuning of text-embedding models for retrieval (RAG)."""

from embedrag import quiet

__version__ = "0.1.0"
quiet.install()  # before any script imports bitsandbytes (through PEFT or transformers)
