"""Retrieval metrics with binary relevance, as BEIR and pytrec_eval define them.

For a query with relevant set R and ranking d_1, d_2, ... (best first):
    ndcg@k    = sum_{r<=k, d_r in R} 1/log2(r+1)  /  sum_{r<=min(|R|,k)} 1/log2(r+1)
    mrr@k     = 1 / (rank of the first relevant document), 0 if none in the top k
    recall@k  = |R in top k| / |R|
    map@k     = sum_{r<=k, d_r in R} precision@r  /  |R|
Each is averaged over queries. Ties in score are broken by corpus order.
"""

from __future__ import annotations

import math

import torch

METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100", "map@100")


def rankings(scores: torch.Tensor, depth: int) -> torch.Tensor:
    """Top `depth` corpus indices of each query, best first. scores (Q, C) -> (Q, min(depth, C))."""
    depth = min(depth, scores.shape[1])
    # A stable sort keeps corpus order among equal scores, so results do not depend on hardware.
    return torch.sort(scores.float(), dim=1, descending=True, stable=True).indices[:, :depth]


def query_metrics(ranked: list[int], relevant: set[int]) -> dict[str, float]:
    """All METRICS for one query from its ranked corpus indices."""
    hits = [doc in relevant for doc in ranked]
    n_rel = len(relevant)

    def dcg(flags: list[bool]) -> float:
        return sum(1.0 / math.log2(r + 2) for r, hit in enumerate(flags) if hit)

    first = next((r for r, hit in enumerate(hits[:10]) if hit), None)
    ap, found = 0.0, 0
    for r, hit in enumerate(hits[:100]):
        if hit:
            found += 1
            ap += found / (r + 1)
    return {
        "ndcg@10": dcg(hits[:10]) / dcg([True] * min(n_rel, 10)),
        "mrr@10": 0.0 if first is None else 1.0 / (first + 1),
        "recall@1": sum(hits[:1]) / n_rel,
        "recall@10": sum(hits[:10]) / n_rel,
        "recall@100": sum(hits[:100]) / n_rel,
        "map@100": ap / n_rel,
    }


def retrieval_metrics(scores: torch.Tensor, relevant: list[set[int]]) -> dict[str, float]:
    """Mean METRICS over queries.

    scores: (Q, C); relevant[i]: the corpus indices relevant to query i.
    """
    if scores.shape[0] != len(relevant):
        raise ValueError(f"{scores.shape[0]} score rows for {len(relevant)} queries")
    if any(not rel for rel in relevant):
        raise ValueError("every query needs at least one relevant document")
    ranked = rankings(scores, 100).tolist()
    per_query = [query_metrics(r, rel) for r, rel in zip(ranked, relevant, strict=True)]
    return {m: sum(q[m] for q in per_query) / len(per_query) for m in METRICS}
