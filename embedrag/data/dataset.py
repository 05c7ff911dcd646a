"""Training data: the rows as a dataset, sampling negatives, tokenizing a batch, padding.

Nothing here knows about models beyond a tokenizer. Building the training set numbers its
distinct passages (one hashing pass, no tokenization, so a large set starts training at once);
an epoch re-draws which positive and negatives each query gets, by numbers, and a batch's texts
are tokenized when the batch is collated (in the loader's workers with --num_workers), to the
same ids every time.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from embedrag.data.passages import PassageTable, hash_texts, query_texts
from embedrag.data.rows import (
    DataError,
    row_features,
)
from embedrag.data.tokens import pad, tokenize


@dataclass(frozen=True)
class TextSettings:
    """How each row's texts are drawn and tokenized."""

    neg_nums: int               # hard negatives per query
    query_max_len: int
    passage_max_len: int
    query_instruction: str
    passage_instruction: str
    append_eos: bool
    seed: int                   # with the epoch, which positive and negatives a row draws


class TrainingSet(torch.utils.data.Dataset):
    """Rows in Arrow, their passages numbered; item i is query i with this epoch's draw of one
    positive and `neg_nums` negatives, as numbers of the distinct passages (`PassageTable`).

    `rows` is what `embedrag.data.formats.load_rows` returns (memory-mapped Arrow), or a list of
    Examples (small sets, tests). Hashing runs through `Dataset.map` in `num_proc` processes
    and is cached; `query_token_lists` and `passage_token_lists` tokenize on demand."""

    def __init__(self, rows: Any, tokenizer: Any, *, neg_nums: int, query_max_len: int,
                 passage_max_len: int, query_instruction: str, append_eos: bool, seed: int,
                 source: str = "data", passage_instruction: str = "",
                 num_proc: int | None = None):
        self.neg_nums = neg_nums
        self.seed = seed
        self.epoch = 0
        self.tokenizer = tokenizer
        self.lengths = (query_max_len, passage_max_len)
        self.instructions = (query_instruction, passage_instruction)
        self.append_eos = append_eos
        self.rows = hash_texts(rows_dataset(rows), num_proc=num_proc)
        self.table = PassageTable(self.rows)
        self.short_rows = int((self.table.own_negative_counts() < neg_nums).sum())
        room = self.table.size - self.table.relevant_counts()
        if (short := np.flatnonzero(room < neg_nums)).size:
            row = int(short[0])
            raise DataError(f"{source}:{self.rows[row]['line']}: only {int(room[row])} "
                            f"passages in the file are not positives of this query; "
                            f"--neg_nums {neg_nums} needs {neg_nums}")
        self._queries = self.rows.data.column("query")
        self._prompts = self.rows.data.column("prompt")  # a row's own query instruction
        self.teacher = False  # set to hand each item its candidates' teacher scores

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def query_token_lists(self, rows: list[int]) -> list[list[int]]:
        """Token ids of these rows' queries, each with its row's prompt or the common
        instruction before it (`tokenize`: truncated, EOS kept)."""
        texts = query_texts([self._queries[r].as_py() for r in rows],
                            [self._prompts[r].as_py() for r in rows], self.instructions[0])
        return tokenize(self.tokenizer, texts, self.lengths[0], self.append_eos)

    def passage_token_lists(self, numbers: list[int]) -> list[list[int]]:
        """Token ids of these passages (by number), after the passage instruction."""
        texts = [self.instructions[1] + self.table.text(n) for n in numbers]
        return tokenize(self.tokenizer, texts, self.lengths[1], self.append_eos)

    def query_tokens(self, row: int) -> list[int]:
        return self.query_token_lists([row])[0]

    def passage_tokens(self, number: int) -> list[int]:
        return self.passage_token_lists([number])[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        # One generator per (seed, epoch, row): the draw does not depend on batch order,
        # worker count or process count, so runs are reproducible and resumable.
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        pos = rng.choice(self.table.positives(i))
        own = self.table.negatives(i)
        relevant = self.table.relevant(i)
        if len(own) >= self.neg_nums:
            negs = rng.sample(own, self.neg_nums)
        else:
            negs = list(own)
            banned = set(relevant) | set(own)
            while len(negs) < self.neg_nums:
                cand = rng.randrange(self.table.size)
                if cand not in banned:
                    negs.append(cand)
                    banned.add(cand)
        item = {"row": i, "pos": pos, "negs": negs, "pos_set": relevant}
        if self.teacher:
            item["scores"] = self.teacher_scores(i, [pos, *negs])
        return item

    def teacher_scores(self, row: int, numbers: list[int]) -> list[float]:
        """The row's teacher score of each passage number; NaN where it has none (a row
        without scores, or a negative topped up from another row)."""
        score: dict[int, float] = {}
        table = self.table
        for kind, ids, off in (("pos", table.pos_ids, table.pos_off),
                               ("neg", table.neg_ids, table.neg_off)):
            values = self.rows.data.column(f"{kind}_scores")[row].as_py()
            for number, value in zip(ids[off[row]:off[row + 1]].tolist(), values or [],
                                     strict=False):
                score.setdefault(number, value)
        return [score.get(n, math.nan) for n in numbers]


def rows_dataset(rows: Any) -> Any:
    """A datasets.Dataset of rows (query, pos, neg, line), from Examples if need be."""
    import datasets

    if not isinstance(rows, list):
        return rows
    features = row_features()
    return datasets.Dataset.from_dict(
        {name: [getattr(ex, name) for ex in rows] for name in features}, features=features)


class EpochShuffle(torch.utils.data.Sampler):
    """Row order of an epoch, a function of (seed, epoch) alone.

    A sampler that keeps drawing from one generator gives epoch 3 the generator's third draw;
    a run resumed in epoch 3 starts a fresh generator and would replay epoch 1's order. Deriving
    each epoch's permutation from the seed and the epoch number makes the order of any epoch
    reproducible from nothing but the flags, on every process alike (so Accelerate has no
    generator state to broadcast between them)."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        seed = random.Random(f"{self.seed}:order:{self.epoch}").getrandbits(63)
        yield from torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()


class Collator:
    """Pads queries and passages separately, each to its own longest member. Distinct passages
    are embedded once; `passage_index` lays them out row-major (query i's positive at slot i*G,
    then its G-1 negatives); `relevant_ids` lists every positive of each query's text (over
    all rows), for the loss's false-negative mask; `*_lengths` are the texts' token counts."""

    def __init__(self, data: TrainingSet | None, pad_id: int, padding_side: str):
        self.data = data
        self.pad_id = pad_id
        self.padding_side = padding_side

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        passages = [p for it in items for p in [it["pos"], *it["negs"]]]  # row-major
        # Token ids come with the items (streamed rows) or are made now (Arrow texts).
        queries = ([it["query_tokens"] for it in items] if "query_tokens" in items[0]
                   else self.data.query_token_lists([it["row"] for it in items]))
        q_ids, q_mask = pad(queries, self.pad_id, self.padding_side)
        tokens = {p: ids for it in items for p, ids in it.get("tokens", {}).items()}
        # A passage drawn twice in a batch (one query's negative is another's positive) is
        # embedded once: `passage_index` maps each of the B*G slots to its distinct passage.
        distinct = list(dict.fromkeys(passages))
        slot = {p: i for i, p in enumerate(distinct)}
        needed = [p for p in distinct if p not in tokens]
        if needed:
            tokens.update(zip(needed, self.data.passage_token_lists(needed), strict=True))
        p_ids, p_mask = pad([tokens[p] for p in distinct], self.pad_id, self.padding_side)
        # Passage ids and each query's relevant ids travel with the batch, so the mask can be
        # built against the passages of every process when negatives are shared across them.
        width = max(len(it["pos_set"]) for it in items)
        relevant = torch.full((len(items), width), -1, dtype=torch.long)     # (B, R)
        for i, it in enumerate(items):
            relevant[i, : len(it["pos_set"])] = torch.tensor(it["pos_set"])
        return {
            "query_input_ids": q_ids, "query_attention_mask": q_mask,
            "passage_input_ids": p_ids, "passage_attention_mask": p_mask,
            # Python lists stay on the host when Accelerate moves the batch to the device:
            # packing reads the lengths from there without waiting for the device.
            "query_lengths": q_mask.sum(1).tolist(), "passage_lengths": p_mask.sum(1).tolist(),
            "passage_index": torch.tensor([slot[p] for p in passages]),          # (B*G,)
            "passage_ids": torch.tensor(passages), "relevant_ids": relevant,
            "rows": torch.tensor([it["row"] for it in items]),
            **({"teacher_scores": torch.tensor([it["scores"] for it in items],
                                               dtype=torch.float32)}            # (B, G)
               if "scores" in items[0] else {}),
        }
