"""Retrieval evaluation of an embedding model on rows in the training format.

The corpus is every distinct `pos` and `neg` passage of the rows; a query's relevant documents
are its `pos`. Queries and passages are embedded exactly as training embeds them. (The BEIR
layout is in embedrag/eval/beir.py.)
"""

from __future__ import annotations

from typing import Any

import torch

from embedrag.data.dataset import rows_dataset
from embedrag.data.passages import PassageTable, encode
from embedrag.eval.metrics import METRICS, ranked_metrics, top_ranked, with_prefixes
from embedrag.model.embedding import EmbedSettings, encode_ids


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, rows: Any, settings: EmbedSettings,
             batch_size: int = 32, progress: bool = False, accelerator: Any = None,
             dims: list[int] | None = None) -> dict[str, float]:
    """ndcg@10, mrr@10, recall@1/10/100 and map@100 of `model` (an EmbeddingModel, possibly
    wrapped by Accelerate) on `rows` (embedrag.data.formats.load_rows, or a list of Examples).

    The rows are tokenized into Arrow (cached) and the distinct passages numbered as training
    numbers them; queries and passages are embedded from there, and each query ranked against
    the corpus a block of queries at a time, so a large file costs its embeddings, not Python
    strings. With an `accelerator` of several processes each embeds its share of the texts
    (see `encode_ids`) and every process returns the same metrics as one would. `dims`: also
    the metrics of each listed prefix of the embeddings (re-normalised), as 'dim64/ndcg@10'."""

    was_training = model.training
    model.eval()
    ds = encode(rows_dataset(rows), tokenizer, query_max_len=settings.query_max_len,
                passage_max_len=settings.passage_max_len,
                query_instruction=settings.query_instruction,
                passage_instruction=settings.passage_instruction,
                append_eos=settings.append_eos)
    table = PassageTable(ds)
    queries = ds.data.column("query_ids")
    q = encode_ids(model, tokenizer, lambda rows: queries.take(rows).to_pylist(),
                   pc_lengths(queries), batch_size=batch_size, accelerator=accelerator,
                   progress="queries" if progress else "")                    # (Q, D)
    p = encode_ids(model, tokenizer, lambda numbers: [table.tokens(n) for n in numbers],
                   table.lengths(), batch_size=batch_size, accelerator=accelerator,
                   progress="passages" if progress else "")                   # (C, D)
    model.train(was_training)
    relevant = [set(table.positives(i)) for i in range(len(ds))]
    return with_prefixes(q, p, dims, lambda q, p: ranked_metrics(top_ranked(q, p, 100),
                                                                 relevant))


def pc_lengths(column: Any) -> Any:
    """Lengths of the lists of an Arrow list column, as numpy."""
    import pyarrow.compute as pc

    return pc.list_value_length(column).to_numpy()


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Metrics as a text table, one row per named result."""
    width = max(len(name) for name in rows) + 2
    lines = [" " * width + "".join(f"{m:>12}" for m in METRICS)]
    for name, metrics in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{metrics[m]:>12.4f}" for m in METRICS))
        for dim in sorted({int(k[3:].split("/")[0]) for k in metrics if k.startswith("dim")},
                          reverse=True):  # Matryoshka prefixes
            lines.append(f"{'  ' + str(dim) + ' dims':<{width}}"
                         + "".join(f"{metrics[f'dim{dim}/{m}']:>12.4f}" for m in METRICS))
    return "\n".join(lines)
