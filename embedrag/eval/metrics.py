"""Retrieval metrics, as BEIR and pytrec_eval (trec_eval) define them.

For a query with relevance grades g(d) (a set of relevant documents means grade 1 each), its
relevant set R = {d : g(d) > 0}, and ranking d_1, d_2, ... (best first):
    ndcg@k    = sum_{r<=k} g(d_r)/log2(r+1)  /  sum_{r<=k} g*_r/log2(r+1),  g* = grades sorted
    mrr@k     = 1 / (rank of the first relevant document), 0 if none in the top k
    recall@k  = |R in top k| / |R|
    map@k     = sum_{r<=k, d_r in R} precision@r  /  |R|
Each is averaged over queries. Ties in score are broken by corpus order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100", "map@100")


def rankings(scores: torch.Tensor, depth: int) -> torch.Tensor:
    """Top `depth` corpus indices of each query, best first. scores (Q, C) -> (Q, min(depth, C))."""
    depth = min(depth, scores.shape[1])
    # A stable sort keeps corpus order among equal scores, so results do not depend on hardware.
    return torch.sort(scores.float(), dim=1, descending=True, stable=True).indices[:, :depth]


def top_ranked(q: torch.Tensor, p: torch.Tensor, depth: int = 100,
               exclude: list[int] | None = None, block: int = 64) -> list[list[int]]:
    """The top `depth` corpus indices of each query by cosine (best first, ties in corpus
    order, as `rankings`), a block of queries at a time: memory holds one (block, C) slice of
    scores, never the whole (Q, C) matrix. exclude[i] >= 0 is left out of query i's ranking.
    q (Q, D), p (C, D)."""
    ranked = []
    for start in range(0, q.shape[0], block):
        scores = q[start:start + block] @ p.T                                # (b, C)
        for row, doc in enumerate((exclude or [])[start:start + block]):
            if doc >= 0:
                scores[row, doc] = float("-inf")
        ranked += rankings(scores, depth).tolist()
    return ranked


def query_metrics(ranked: list[int], relevant: set[int] | Mapping[int, float],
                  ) -> dict[str, float]:
    """All METRICS for one query from its ranked corpus indices and its relevant documents
    (a set, or grades by document: graded nDCG, the rest counts grades > 0)."""
    grades = relevant if isinstance(relevant, Mapping) else dict.fromkeys(relevant, 1.0)
    positive = {doc: g for doc, g in grades.items() if g > 0}
    hits = [doc in positive for doc in ranked]
    n_rel = len(positive)

    def dcg(gains: list[float]) -> float:
        return sum(g / math.log2(r + 2) for r, g in enumerate(gains))

    ideal = sorted(positive.values(), reverse=True)[:10]
    first = next((r for r, hit in enumerate(hits[:10]) if hit), None)
    ap, found = 0.0, 0
    for r, hit in enumerate(hits[:100]):
        if hit:
            found += 1
            ap += found / (r + 1)
    return {
        "ndcg@10": dcg([positive.get(doc, 0.0) for doc in ranked[:10]]) / dcg(ideal),
        "mrr@10": 0.0 if first is None else 1.0 / (first + 1),
        "recall@1": sum(hits[:1]) / n_rel,
        "recall@10": sum(hits[:10]) / n_rel,
        "recall@100": sum(hits[:100]) / n_rel,
        "map@100": ap / n_rel,
    }


def retrieval_metrics(scores: torch.Tensor, relevant: list) -> dict[str, float]:
    """Mean METRICS over queries.

    scores: (Q, C); relevant[i]: the corpus indices relevant to query i (a set, or grades).
    """
    if scores.shape[0] != len(relevant):
        raise ValueError(f"{scores.shape[0]} score rows for {len(relevant)} queries")
    return ranked_metrics(rankings(scores, 100).tolist(), relevant)


def ranked_metrics(ranked: list[list[int]], relevant: list) -> dict[str, float]:
    """Mean METRICS over queries from their top-100 rankings (corpus indices, best first)."""
    if any(not any(g > 0 for g in (rel.values() if isinstance(rel, Mapping) else [1] * len(rel)))
           for rel in relevant):
        raise ValueError("every query needs at least one relevant document")
    per_query = [query_metrics(r, rel) for r, rel in zip(ranked, relevant, strict=True)]
    return {m: sum(q[m] for q in per_query) / len(per_query) for m in METRICS}


def with_prefixes(q: torch.Tensor, p: torch.Tensor, dims: list[int] | None,
                  score: Callable[[torch.Tensor, torch.Tensor], dict[str, float]],
                  ) -> dict[str, float]:
    """score(q, p), and for each dimension in `dims` below the embeddings' own the score of
    that prefix, re-normalised (Matryoshka), as 'dim64/ndcg@10'."""
    metrics = score(q, p)
    for dim in dims or []:
        if dim < q.shape[-1]:
            prefix = [F.normalize(x[:, :dim], dim=-1) for x in (q, p)]
            metrics.update({f"dim{dim}/{k}": v for k, v in score(*prefix).items()})
    return metrics
