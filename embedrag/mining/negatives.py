"""Hard-negative mining with false-negative filtering.

For each query, rank a corpus with an embedding model (any model train.py accepts, or a
training output) or with BM25, take the candidates in a rank window (skipping the very top,
where unlabeled positives live), drop false negatives, and draw the negatives from what is left.

False negatives are what make mined negatives hurt: a passage that does answer the query, but
is not labeled, pushed away as if it did not. Two filters:
- text: never a passage equal to one of the query's positives, after folding case and
  whitespace;
- score: never a passage scoring within a margin of the query's best positive — above
  `relative_margin` x that score, or above that score minus `absolute_margin`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from embedrag.data.formats import TextColumn
from embedrag.data.passages import text_hash, tokenize_column
from embedrag.data.rows import Example
from embedrag.model.embedding import encode_ids
from embedrag.model.loading import load_embedder


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


@dataclass
class MiningReport:
    rows: int = 0
    dropped_equal: int = 0      # candidates equal to a positive once case/space are folded
    dropped_margin: int = 0     # candidates within the score margin of the positive
    short_rows: int = 0         # rows that got fewer than neg_nums negatives
    lines: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.rows} rows; false-negative filter dropped {self.dropped_equal} "
                f"candidates equal to a positive and {self.dropped_margin} within the score "
                f"margin; {self.short_rows} rows got fewer negatives than asked")


def bm25_tokens(text: str) -> list[str]:
    """Lower-case words, plus character bigrams of CJK runs (which have no spaces)."""
    tokens = []
    for piece in re.findall(r"[\u3400-\u9fff\uf900-\ufaff]+|\w+", text.casefold()):
        if re.match(r"[\u3400-\u9fff\uf900-\ufaff]", piece):
            tokens += [piece[i:i + 2] for i in range(max(len(piece) - 1, 1))]
        else:
            tokens.append(piece)
    return tokens


def bm25_scores(queries: list[str], corpus: list[str]) -> torch.Tensor:
    """(Q, C) BM25 scores (rank_bm25's Okapi BM25)."""
    from rank_bm25 import BM25Okapi

    index = BM25Okapi([bm25_tokens(t) or ["<empty>"] for t in corpus])
    import numpy as np

    return torch.from_numpy(np.stack([index.get_scores(bm25_tokens(q)) for q in queries])
                            ).float()


def embedding_ranker(model_path: str, pooling: str | None, batch_size: int,
                     trust_remote_code: bool = False) -> Any:
    """A function (queries, corpus) -> (Q, C) cosine scores with the model, embedding as
    training does (its pooling, instruction, lengths and EOS)."""

    model, tokenizer, settings = load_embedder(model_path, trust_remote_code=trust_remote_code,
                                               overrides={"pooling": pooling})

    def scores(queries: list[str], corpus: Sequence[str]) -> ChunkedScores:
        if isinstance(corpus, TextColumn):  # from Arrow: tokenized (cached), read by batch

            table = tokenize_column(corpus.dataset, "text", tokenizer,
                                    max_len=settings.passage_max_len,
                                    instruction=settings.passage_instruction,
                                    append_eos=settings.append_eos)
            ids = table.data.column("ids")
            p = encode_ids(model, tokenizer, lambda rows: ids.take(corpus.rows[rows]).to_pylist(),
                           table.data.column("n").to_numpy()[corpus.rows],
                           batch_size=batch_size, progress="corpus")               # (C, D)
        else:
            p = model.encode(tokenizer, list(corpus), max_len=settings.passage_max_len,
                             append_eos=settings.append_eos, batch_size=batch_size,
                             instruction=settings.passage_instruction, progress="corpus")
        q = model.encode(tokenizer, queries, max_len=settings.query_max_len,
                         append_eos=settings.append_eos, batch_size=batch_size,
                         instruction=settings.query_instruction, progress="queries")
        return ChunkedScores(q, p)

    return scores


class ChunkedScores:
    """Cosine scores q @ p.T computed a block of queries at a time, so that memory holds one
    (block, C) slice, never the whole (Q, C) matrix."""

    def __init__(self, q: torch.Tensor, p: torch.Tensor):
        self.q, self.p = q, p
        self.shape = (q.shape[0], p.shape[0])

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.q[rows] @ self.p.T


def mine(examples: list[Example], corpus: Sequence[str], scores: Any, *, neg_nums: int,
         rank_start: int, rank_end: int, relative_margin: float, absolute_margin: float,
         keep_existing: bool, seed: int) -> tuple[list[dict[str, Any]], MiningReport]:
    """Rows in the training format with `neg` filled. `scores` is (Q, C) for examples x
    corpus: a tensor, or anything sliced by rows like ChunkedScores; it is read 1,024 queries
    at a time.

    Ranks are 1-based and inclusive: rank_start 10, rank_end 100 draws from the 10th to the
    100th best candidate (positives included when counting ranks, as a searcher sees them).
    """
    index = CorpusIndex(corpus)
    depth = min(rank_end, len(corpus))
    report = MiningReport(rows=len(examples))
    rows: list[dict[str, Any]] = []
    for start in range(0, len(examples), 1024):
        block = scores[start:start + 1024]                                     # (n, C)
        top_scores, top_ids = torch.topk(block, depth, dim=1)                  # (n, depth)
        for j, ex in enumerate(examples[start:start + 1024]):
            rows.append(_mine_row(start + j, ex, corpus, index, block[j], top_ids[j].tolist(),
                                  top_scores[j].tolist(), report, neg_nums=neg_nums,
                                  rank_start=rank_start, relative_margin=relative_margin,
                                  absolute_margin=absolute_margin,
                                  keep_existing=keep_existing, seed=seed))
    return rows, report


class CorpusIndex:
    """Where a text (case and white space folded) sits in the corpus, by 64-bit hashes in a
    sorted numpy array: no dictionary of a million Python strings."""

    def __init__(self, corpus: Sequence[str]):
        hashes = np.fromiter((text_hash(normalise(t)) for t in corpus), dtype=np.int64,
                             count=len(corpus))
        self.order = np.argsort(hashes, kind="stable")
        self.sorted = hashes[self.order]

    def get(self, text: str) -> int | None:
        h = text_hash(text)
        at = int(np.searchsorted(self.sorted, h))
        return int(self.order[at]) if at < len(self.sorted) and self.sorted[at] == h else None


def _mine_row(qi: int, ex: Example, corpus: Sequence[str], index: CorpusIndex,
              row_scores: torch.Tensor, ranked: list[int], ranked_scores: list[float],
              report: MiningReport, *, neg_nums: int, rank_start: int, relative_margin: float,
              absolute_margin: float, keep_existing: bool, seed: int) -> dict[str, Any]:
    positives = {normalise(p) for p in ex.pos}
    pos_ids = [i for i in (index.get(n) for n in positives) if i is not None]
    best_pos = max((row_scores[i].item() for i in pos_ids), default=None)
    pool = []
    for rank, (ci, score) in enumerate(zip(ranked, ranked_scores, strict=True), start=1):
        if normalise(corpus[ci]) in positives:
            if rank >= rank_start and corpus[ci] not in ex.pos:  # a re-typed positive
                report.dropped_equal += 1
            continue
        if rank < rank_start:
            continue
        if best_pos is not None and (score > best_pos - absolute_margin
                                     or score > relative_margin * best_pos):
            report.dropped_margin += 1
            continue
        pool.append(corpus[ci])
    rng = random.Random(f"{seed}:{qi}:{ex.query}")
    kept = [n for n in ex.neg if normalise(n) not in positives] if keep_existing else []
    fresh = [p for p in pool if p not in kept]
    negs = kept + rng.sample(fresh, min(neg_nums, len(fresh)))
    if len(negs) - len(kept) < neg_nums:
        report.short_rows += 1
    return {"query": ex.query, "pos": ex.pos, "neg": negs}
