"""Retrieval evaluation of an embedding model on a JSONL file in the training format.

The corpus is every distinct `pos` and `neg` passage of the file; a query's relevant documents
are its `pos`. Queries and passages are embedded exactly as training embeds them.
"""

from __future__ import annotations

from typing import Any

import torch

from embedrag.data import Example
from embedrag.metrics import METRICS, retrieval_metrics
from embedrag.modeling import EmbedSettings, encode_with


def corpus_of(examples: list[Example]) -> tuple[list[str], list[set[int]]]:
    """(distinct passages in first-seen order, relevant corpus indices of each query)."""
    index: dict[str, int] = {}
    for ex in examples:
        for text in ex.pos + ex.neg:
            index.setdefault(text, len(index))
    return list(index), [{index[t] for t in ex.pos} for ex in examples]


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, examples: list[Example], settings: EmbedSettings,
             batch_size: int = 32, progress: bool = False, accelerator: Any = None,
             ) -> dict[str, float]:
    """ndcg@10, mrr@10, recall@1/10/100 and map@100 of `model` (an EmbeddingModel, possibly
    wrapped by Accelerate). With an `accelerator` of several processes each embeds its share of
    the texts (see `encode_with`) and every process returns the same metrics as one would."""
    was_training = model.training
    model.eval()
    corpus, relevant = corpus_of(examples)
    q = encode_with(model, tokenizer, [ex.query for ex in examples],
                    max_len=settings.query_max_len, append_eos=settings.append_eos,
                    batch_size=batch_size, instruction=settings.query_instruction,
                    progress="queries" if progress else "", accelerator=accelerator)  # (Q, D)
    p = encode_with(model, tokenizer, corpus, max_len=settings.passage_max_len,
                    append_eos=settings.append_eos, batch_size=batch_size,
                    instruction=settings.passage_instruction,
                    progress="passages" if progress else "", accelerator=accelerator)  # (C, D)
    model.train(was_training)
    return retrieval_metrics(q @ p.T, relevant)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Metrics as a text table, one row per named result."""
    width = max(len(name) for name in rows) + 2
    lines = [" " * width + "".join(f"{m:>12}" for m in METRICS)]
    for name, metrics in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{metrics[m]:>12.4f}" for m in METRICS))
    return "\n".join(lines)
