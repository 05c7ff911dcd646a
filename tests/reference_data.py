"""Today's (before Arrow) training set, kept as the reference the Arrow one must reproduce:
the same passage numbering, relevant sets, negatives and draws, hence the same batches."""

from __future__ import annotations

import random
from typing import Any

from embedrag.data.rows import DataError, Example
from embedrag.data.tokens import tokenize


class ListTrainingSet:
    """Rows with their texts tokenized once; item i is query i with this epoch's draw of one
    positive and `neg_nums` negatives, as indices into the table of distinct passages."""

    def __init__(self, examples: list[Example], tokenizer: Any, *, neg_nums: int,
                 query_max_len: int, passage_max_len: int, query_instruction: str,
                 append_eos: bool, seed: int, source: str = "data",
                 passage_instruction: str = ""):
        self.neg_nums = neg_nums
        self.seed = seed
        self.epoch = 0
        passage_index: dict[str, int] = {}
        for ex in examples:
            for text in ex.pos + ex.neg:
                passage_index.setdefault(text, len(passage_index))
        self.passages = list(passage_index)
        self.pos = [[passage_index[t] for t in dict.fromkeys(ex.pos)] for ex in examples]
        # Everything relevant to a query text, over all its rows: data with one row per
        # (query, positive) pair must not treat the query's other positives as negatives.
        relevant: dict[str, set[int]] = {}
        for ex, pos in zip(examples, self.pos, strict=True):
            relevant.setdefault(ex.query, set()).update(pos)
        self.relevant = [sorted(relevant[ex.query]) for ex in examples]
        # A "negative" that is also relevant to the query would teach the wrong thing.
        self.neg = [[passage_index[t] for t in dict.fromkeys(ex.neg)
                     if passage_index[t] not in relevant[ex.query]] for ex in examples]
        self.short_rows = sum(len(n) < neg_nums for n in self.neg)
        for ex, rel in zip(examples, self.relevant, strict=True):
            if len(self.passages) - len(rel) < neg_nums:
                raise DataError(f"{source}:{ex.line}: only {len(self.passages) - len(rel)} "
                                f"passages in the file are not positives of this query; "
                                f"--neg_nums {neg_nums} needs {neg_nums}")
        queries = [query_instruction + ex.query for ex in examples]
        self.query_ids = tokenize(tokenizer, queries, query_max_len, append_eos)
        self.passage_ids = tokenize(tokenizer, [passage_instruction + p for p in self.passages],
                                    passage_max_len, append_eos)

    def __len__(self) -> int:
        return len(self.pos)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, Any]:
        # One generator per (seed, epoch, row): the draw does not depend on batch order,
        # worker count or process count, so runs are reproducible and resumable.
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        pos = rng.choice(self.pos[i])
        own = self.neg[i]
        if len(own) >= self.neg_nums:
            negs = rng.sample(own, self.neg_nums)
        else:
            negs = list(own)
            banned = set(self.relevant[i]) | set(own)
            while len(negs) < self.neg_nums:
                cand = rng.randrange(len(self.passages))
                if cand not in banned:
                    negs.append(cand)
                    banned.add(cand)
        return {"row": i, "pos": pos, "negs": negs, "pos_set": self.relevant[i]}


