"""Retrieval metrics against hand-computed values and scikit-learn's ndcg_score."""

import math

import pytest
import torch

from embedrag.eval.metrics import query_metrics, retrieval_metrics


def _scores_for(rankings, n_docs):
    """A score matrix whose descending order is exactly each given ranking."""
    scores = torch.zeros(len(rankings), n_docs)
    for i, ranking in enumerate(rankings):
        for r, doc in enumerate(ranking):
            scores[i, doc] = float(n_docs - r)
    return scores


def test_perfect_ranking_scores_one():
    scores = _scores_for([[0, 1, 2, 3], [2, 0, 1, 3]], 4)
    got = retrieval_metrics(scores, [{0, 1}, {2}])
    # recall@1 can reach only 1/2 for a query with two relevant documents
    assert got == {**{k: pytest.approx(1.0) for k in got}, "recall@1": pytest.approx(0.75)}


def test_known_permutation_by_hand():
    # relevant {1, 3}; ranking 0, 1, 2, 3: hits at ranks 2 and 4
    got = query_metrics([0, 1, 2, 3], {1, 3})
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3)
    assert got["ndcg@10"] == pytest.approx(dcg / idcg)
    assert got["mrr@10"] == pytest.approx(0.5)
    assert got["recall@1"] == 0 and got["recall@10"] == 1
    assert got["map@100"] == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_beyond_cutoffs():
    ranking = list(range(150))
    got = query_metrics(ranking, {11, 120})  # rank 12 and rank 121
    assert got["ndcg@10"] == 0 and got["mrr@10"] == 0 and got["recall@10"] == 0
    assert got["recall@100"] == 0.5
    assert got["map@100"] == pytest.approx((1 / 12) / 2)


def test_ndcg_matches_sklearn_on_random_scores():
    from sklearn.metrics import ndcg_score

    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(20, 40, generator=gen)
    relevant = [set(torch.randperm(40, generator=gen)[: 1 + i % 4].tolist()) for i in range(20)]
    truth = torch.zeros(20, 40)
    for i, rel in enumerate(relevant):
        truth[i, list(rel)] = 1
    want = ndcg_score(truth.numpy(), scores.numpy(), k=10)
    assert retrieval_metrics(scores, relevant)["ndcg@10"] == pytest.approx(want, abs=1e-9)


def test_ties_are_broken_by_corpus_order():
    got = retrieval_metrics(torch.zeros(1, 5), [{2}])
    assert got["mrr@10"] == pytest.approx(1 / 3)
