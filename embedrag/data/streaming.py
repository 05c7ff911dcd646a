"""`--streaming`: training rows read as they stream, for inputs too large even to convert.

The rows are never converted or held: datasets reads them lazily (a JSONL or Parquet file, or a
hub dataset), a shuffle buffer of `--shuffle_buffer` rows mixes them, and each row is tokenized
when it is drawn. What differs from the map-style training set, because it needs every row at
once:

- order: the shuffle buffer's (seeded, and re-seeded every pass), not a full permutation;
- passages are identified by a 64-bit hash of their text (duplicates inside a batch are still
  embedded once and masked as false negatives);
- a query's relevant passages are its own row's positives (rows sharing a query text are not
  grouped);
- a row with fewer negatives than `--neg_nums` is topped up from passages of the rows streamed
  just before it (never one of its own positives);
- `--max_steps` sets the length of the run, and there is no exact resume (`--save_steps` and
  `--resume_from_checkpoint` are refused): the shuffle buffer's contents are not checkpointed.
A bad row stops the run when it is reached, with exit code 2 and its `file:line` (or row);
the first 1,000 rows are checked before the model loads.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import torch

from embedrag.data.formats import hub_name, jsonl_objects, kind_of
from embedrag.data.passages import _encode_batch
from embedrag.data.rows import DataError, check_row

CHECK_AHEAD = 1000   # rows checked before anything loads
RECENT = 4096        # passages kept to top up short rows


def _checked(rows: Any, source: str, line_of: Any) -> Any:
    """The stream, each row checked as it passes; DataError names the first bad one."""
    def check(row: dict[str, Any], index: int) -> dict[str, Any]:
        problem = check_row({k: row.get(k) for k in ("query", "pos", "neg", "prompt")
                             if row.get(k) is not None})
        if problem:
            raise DataError(f"{source}{line_of(row, index)}: {problem}")
        return {"query": row["query"], "pos": list(row["pos"]),
                "neg": list(row.get("neg") or []), "prompt": row.get("prompt")}

    return rows.map(check, with_indices=True)


def stream_rows(spec: str) -> Any:
    """A datasets IterableDataset of checked rows (query, pos, neg, prompt) from any input format;
    the first CHECK_AHEAD rows are checked now."""
    import datasets

    kind = kind_of(spec)
    if kind == "hub":
        name, split = hub_name(spec)
        rows = datasets.load_dataset(name, split=split, streaming=True)
        stream = _checked(rows, spec, lambda row, i: f": row {i}")
    elif kind == "parquet":
        rows = datasets.load_dataset("parquet", data_files=spec, split="train", streaming=True)
        stream = _checked(rows, spec, lambda row, i: f": row {i}")
    else:
        rows = datasets.IterableDataset.from_generator(jsonl_objects, gen_kwargs={"path": spec})
        stream = _checked(rows, spec, lambda row, i: f":{row['line']}")
    checked = 0
    for _ in stream:
        checked += 1
        if checked >= CHECK_AHEAD:
            break
    if not checked:
        raise DataError(f"{spec}:1: the file holds no training rows")
    return stream


class StreamingSet(torch.utils.data.IterableDataset):
    """Items as TrainingSet makes them, from a stream; token ids travel with each item."""

    def __init__(self, stream: Any, tokenizer: Any, *, neg_nums: int, query_max_len: int,
                 passage_max_len: int, query_instruction: str, passage_instruction: str,
                 append_eos: bool, seed: int, buffer: int):
        self.stream, self.tokenizer = stream, tokenizer
        self.settings = (query_max_len, passage_max_len, query_instruction, passage_instruction,
                         append_eos)
        self.neg_nums, self.seed, self.buffer = neg_nums, seed, buffer
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        recent: deque[tuple[int, list[int]]] = deque(maxlen=RECENT)
        rows = self.stream.shuffle(seed=self.seed, buffer_size=self.buffer)
        rows.set_epoch(self.epoch)
        n = 0
        for batch in rows.iter(batch_size=64):
            encoded = _encode_batch(batch, self.tokenizer, self.settings)
            for i in range(len(batch["query"])):
                rng = random.Random(f"{self.seed}:{self.epoch}:stream:{n}")
                tokens = dict(zip(encoded["pos_h"][i] + encoded["neg_h"][i],
                                  encoded["pos_ids"][i] + encoded["neg_ids"][i], strict=True))
                positives = list(dict.fromkeys(encoded["pos_h"][i]))
                own = [h for h in dict.fromkeys(encoded["neg_h"][i]) if h not in positives]
                if len(own) >= self.neg_nums:
                    negs = rng.sample(own, self.neg_nums)
                else:
                    negs, banned = list(own), set(positives) | set(own)
                    pool = [(h, ids) for h, ids in recent if h not in banned]
                    for h, ids in rng.sample(pool, min(len(pool), self.neg_nums - len(negs))):
                        if h not in banned:
                            negs.append(h)
                            tokens[h] = ids
                            banned.add(h)
                    if len(negs) < self.neg_nums:
                        continue  # the very first rows of a stream may have nothing to add
                recent.extend(tokens.items())
                pos = rng.choice(positives)
                yield {"row": n, "pos": pos, "negs": negs, "pos_set": sorted(positives),
                       "query_tokens": encoded["query_ids"][i],
                       "tokens": {h: tokens[h] for h in [pos, *negs]}}
                n += 1
