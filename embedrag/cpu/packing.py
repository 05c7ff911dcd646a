"""How a batch of texts of different lengths meets the transformer without computing padding.

Two layouts, chosen by `EmbeddingModel`: every text of the batch in one packed row (its
attention keeps the texts apart: `kernels._packed`), or, for attention that cannot, length
buckets — groups of rows of similar length, each cut to its own longest text. Both keep the
batch, and so the in-batch negatives, as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# What one more forward+backward call costs, in token positions computed (padding included).
# On a CPU a position of all-MiniLM-L6-v2 costs ~0.3 ms against ~10 ms for a call's own
# overhead (benchmarks/profile_step.py); a GPU runs thousands of positions in a call's time.
BUCKET_OVERHEAD = {"cpu": 32, "default": 8192}


# Tokens packed into one row at most. Causal models get (T, T) masks from transformers for a
# packed row, built through T x T temporaries: at 4096 tokens 50-70 MB per mask type, ~300 MB
# for a bidirectional sliding window (EmbeddingGemma), ~0.5 s to build. A training batch of
# a few thousand tokens still goes in one call; longer batches go in several.
PACK_TOKENS = 4096


@dataclass
class Bucket:
    rows: list[int]              # rows of the batch, shortest first
    window: tuple[int, int]      # the columns holding all their real tokens


def cheapest_groups(sizes: Sequence[int], cost: Callable[[Any, int], Any]) -> list[list[int]]:
    """Indices of `sizes` in groups that minimise the sum of `cost(count, largest)` over the
    groups, each group in ascending size. `cost` takes a NumPy array of counts.

    Dynamic programming over the sizes sorted ascending: for any cost that grows with the
    count and the largest size, an optimal grouping is contiguous in that order."""
    import numpy as np

    a = np.asarray(sizes, dtype=np.int64)
    order = np.argsort(a, kind="stable")
    a = a[order]
    n = len(a)
    best = np.zeros(n + 1)
    start = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):  # best[j]: cheapest grouping of the j smallest
        total = best[:j] + cost(j - np.arange(j), int(a[j - 1]))
        start[j] = int(total.argmin())
        best[j] = total[start[j]]
    cuts, j = [], n
    while j > 0:
        cuts.append((int(start[j]), j))
        j = int(start[j])
    return [order[i:j].tolist() for i, j in reversed(cuts)]


def length_buckets(mask: torch.Tensor, overhead: int | None = None) -> list[Bucket]:
    """Split a padded batch (mask (N, L), 1 on real tokens) into groups of rows of similar
    length, each computed on its own columns only.

    The grouping minimises (positions computed, padding included) + `overhead` per group
    (`cheapest_groups`); `overhead` defaults to BUCKET_OVERHEAD for the mask's device. The
    transformer sees no padding beyond its bucket's, while the batch — and so the in-batch
    negatives — stays the same. Models that can take packed rows need no buckets at all
    (`EmbeddingModel.packs`)."""
    import numpy as np

    if overhead is None:
        overhead = BUCKET_OVERHEAD.get(mask.device.type, BUCKET_OVERHEAD["default"])
    m = mask.detach().to("cpu", torch.bool).numpy()                     # (N, L)
    n, width = m.shape
    if n == 0:
        return [Bucket([], (0, width))]
    real = m.any(1)
    first = np.where(real, m.argmax(1), 0)                               # (N,)
    last = np.where(real, width - 1 - m[:, ::-1].argmax(1), 0)           # (N,)
    span = last - first + 1
    groups = cheapest_groups(span.tolist(), lambda count, widest: count * widest + overhead)
    return [Bucket(g, (int(first[g].min()), int(last[g].max()) + 1)) for g in groups]


def pack_chunks(lengths: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive row ranges [a, b) of at most `limit` tokens each (a longer row alone)."""
    chunks, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if used and used + n > limit:
            chunks.append((start, i))
            start, used = i, 0
        used += n
    chunks.append((start, len(lengths)))
    return chunks
