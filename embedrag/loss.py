"""InfoNCE over in-batch and hard negatives.

Inputs are L2-normalised embeddings:
    q: (B, D)      one row per query
    p: (B*G, D)    G = 1 + neg_nums passages per query, row-major: query i's positive is row
                   i*G, followed by its G-1 hard negatives.
Every query is scored against every passage of the batch, so each query sees its own hard
negatives, the other queries' positives and their hard negatives (B*G - 1 negatives in all).

    loss = mean_i  -log( exp(s(i, i*G)) / sum_j exp(s(i, j)) ),   s(i, j) = q_i . p_j / temperature

A candidate whose text is one of query i's own positives (the same passage drawn for another
query, or a second positive of the row) is a false negative: it is masked out of the sum rather
than pushed away. Use it for any retrieval data with (query, positive[, negatives]) rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float,
             false_negative_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean InfoNCE loss of the batch (a scalar).

    false_negative_mask: (B, B*G) bool, True where a candidate is left out of query i's sum.
    """
    group = p.shape[0] // q.shape[0]
    scores = (q.float() @ p.float().T) / temperature                      # (B, B*G)
    if false_negative_mask is not None:
        scores = scores.masked_fill(false_negative_mask, float("-inf"))
    targets = torch.arange(q.shape[0], device=q.device) * group           # (B,)
    return F.cross_entropy(scores, targets)
