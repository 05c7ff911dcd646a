"""Retrieval evaluation of an embedding model on a JSONL file in the training format.

The corpus is every distinct `pos` and `neg` passage of the file; a query's relevant documents
are its `pos`. Queries and passages are embedded exactly as training embeds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from embedrag.data import Example
from embedrag.metrics import retrieval_metrics


@dataclass
class EmbedSettings:
    """How texts become vectors; training_config.json records these for a trained model."""

    pooling: str = "last"
    query_instruction: str = ""
    query_max_len: int = 256
    passage_max_len: int = 1024
    append_eos: bool = False

    @classmethod
    def from_training_config(cls, config: dict[str, Any]) -> EmbedSettings:
        return cls(**{k: config[k] for k in cls.__dataclass_fields__ if k in config})


def corpus_of(examples: list[Example]) -> tuple[list[str], list[set[int]]]:
    """(distinct passages in first-seen order, relevant corpus indices of each query)."""
    index: dict[str, int] = {}
    for ex in examples:
        for text in ex.pos + ex.neg:
            index.setdefault(text, len(index))
    return list(index), [{index[t] for t in ex.pos} for ex in examples]


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, examples: list[Example], settings: EmbedSettings,
             batch_size: int = 32) -> dict[str, float]:
    """ndcg@10, mrr@10, recall@1/10/100 and map@100 of `model` (an EmbeddingModel)."""
    was_training = model.training
    model.eval()
    corpus, relevant = corpus_of(examples)
    q = model.encode(tokenizer, [ex.query for ex in examples], max_len=settings.query_max_len,
                     append_eos=settings.append_eos, batch_size=batch_size,
                     instruction=settings.query_instruction)                   # (Q, D)
    p = model.encode(tokenizer, corpus, max_len=settings.passage_max_len,
                     append_eos=settings.append_eos, batch_size=batch_size)    # (C, D)
    model.train(was_training)
    return retrieval_metrics(q @ p.T, relevant)
