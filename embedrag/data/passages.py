"""The passages of a training set, numbered, and kept in Arrow, not in Python.

`hash_texts` adds 64-bit text hashes to every row through `Dataset.map` (batched, in several
processes for large sets, cached by a fingerprint of the rows, so a second run with the same
data starts from the cache); `encode` (evaluation sets) adds token ids too. `PassageTable` numbers
the distinct passages by first appearance — row by row, each row's positives, then its
negatives, as a list of every text would — and keeps, in numpy arrays, each row's positives
and negatives by number and, for each query text, every passage relevant to it over all its
rows. Texts stay in the memory-mapped Arrow file and are read when a batch needs them.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from embedrag.data.tokens import tokenize


def text_hash(text: str) -> int:
    """64-bit identity of a text (collisions: ~1 in 10^10 for a million distinct texts)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little",
                          signed=True)


def _tokenizer_identity(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.blake2b(backend.to_str().encode(), digest_size=16).hexdigest()
    from datasets.fingerprint import Hasher

    return Hasher.hash(tokenizer)


def encode(ds: Any, tokenizer: Any, *, query_max_len: int, passage_max_len: int,
           query_instruction: str, passage_instruction: str, append_eos: bool,
           num_proc: int | None = None) -> Any:
    """The rows with query_ids, pos_ids, neg_ids (token ids, EOS appended as in `tokenize`)
    and query_h, pos_h, neg_h (text hashes) added; cached by fingerprint."""
    import datasets
    from datasets.fingerprint import Hasher

    settings = (query_max_len, passage_max_len, query_instruction, passage_instruction,
                append_eos, tokenizer.eos_token_id, _tokenizer_identity(tokenizer))
    fingerprint = Hasher.hash((ds._fingerprint, "embedrag-encode-3", settings))
    ids, h = datasets.Value("int32"), datasets.Value("int64")  # token ids fit in 32 bits
    features = datasets.Features({
        **ds.features, "query_ids": datasets.Sequence(ids), "query_h": h,
        "pos_ids": datasets.Sequence(datasets.Sequence(ids)), "pos_h": datasets.Sequence(h),
        "neg_ids": datasets.Sequence(datasets.Sequence(ids)), "neg_h": datasets.Sequence(h)})
    return ds.map(_encode_batch, batched=True, num_proc=num_proc, new_fingerprint=fingerprint,
                  fn_kwargs={"tokenizer": tokenizer, "settings": settings[:5]},
                  features=features, desc="tokenizing")


def hash_texts(ds: Any, num_proc: int | None = None) -> Any:
    """The rows with query_h, pos_h and neg_h (text hashes) added, through a cached
    `Dataset.map` in `num_proc` processes (default: every core for large sets). Training
    tokenizes per batch (`TrainingSet`), so preparing a set costs one hashing pass."""
    import datasets
    from datasets.fingerprint import Hasher

    h = datasets.Value("int64")
    features = datasets.Features({**ds.features, "query_h": h, "pos_h": datasets.Sequence(h),
                                  "neg_h": datasets.Sequence(h)})
    return ds.map(_hash_batch, batched=True, num_proc=num_proc or default_processes(len(ds)),
                  new_fingerprint=Hasher.hash((ds._fingerprint, "embedrag-hash-1")),
                  features=features, desc="hashing")


def default_processes(rows: int) -> int | None:
    """Processes for a pass over `rows` rows: every core this process may use, one per
    ROWS_PER_PROCESS rows at least (starting one costs about what hashing that many does)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = min(cores or 1, rows // ROWS_PER_PROCESS)
    return n if n > 1 else None


ROWS_PER_PROCESS = 20_000


def _hash_batch(batch: dict[str, list]) -> dict[str, list]:
    return {"query_h": [text_hash(q) for q in batch["query"]],
            **{f"{kind}_h": [[text_hash(t) for t in row] for row in batch[kind]]
               for kind in ("pos", "neg")}}


def tokenize_column(ds: Any, column: str, tokenizer: Any, *, max_len: int, instruction: str,
                    append_eos: bool) -> Any:
    """`ds` with `ids` (token ids of `column`, tokenized as `tokenize` does) and `n` (their
    count) added, through a cached `Dataset.map`: a corpus to embed, read from Arrow."""
    from datasets.fingerprint import Hasher

    knobs = (column, max_len, instruction, append_eos)
    return ds.map(_tokenize_batch, batched=True,
                  fn_kwargs={"tokenizer": tokenizer, "knobs": knobs},
                  new_fingerprint=Hasher.hash((ds._fingerprint, "embedrag-tokenize-1", knobs,
                                               _tokenizer_identity(tokenizer))),
                  desc="tokenizing")


def _tokenize_batch(batch: dict[str, list], tokenizer: Any, knobs: tuple) -> dict[str, list]:
    column, max_len, instruction, eos = knobs
    ids = tokenize(tokenizer, [instruction + t for t in batch[column]], max_len, eos)
    return {"ids": ids, "n": [len(i) for i in ids]}


def query_texts(queries: list[str], prompts: list[str | None] | None,
                instruction: str) -> list[str]:
    """Each query after its row's own prompt, or after the common instruction where the row
    has none (`prompts` None: no row has one)."""
    prompts = prompts or [None] * len(queries)
    return [(instruction if p is None else p) + q for q, p in zip(queries, prompts, strict=True)]


def _encode_batch(batch: dict[str, list], tokenizer: Any, settings: tuple) -> dict[str, list]:
    q_len, p_len, q_inst, p_inst, eos = settings
    queries = query_texts(batch["query"], batch.get("prompt"), q_inst)
    out = {"query_ids": tokenize(tokenizer, queries, q_len, eos)}
    for kind in ("pos", "neg"):
        texts = [t for row in batch[kind] for t in row]
        ids = iter(tokenize(tokenizer, [p_inst + t for t in texts], p_len, eos))
        out[f"{kind}_ids"] = [[next(ids) for _ in row] for row in batch[kind]]
    return {**out, **_hash_batch(batch)}


def _flat(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """A list<int64> Arrow column as (values, offsets): row r holds values[off[r]:off[r+1]]."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.values.to_numpy(zero_copy_only=False).astype(np.int64)
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


class PassageTable:
    """Distinct passages numbered by first appearance, and each row's view of them."""

    def __init__(self, ds: Any):
        table = ds.data
        self._columns = {name: table.column(name) for name in ("pos", "neg", "pos_ids",
                                                               "neg_ids")
                         if name in table.column_names}  # token ids: `encode`d sets only
        pos_h, self.pos_off = _flat(table.column("pos_h"))
        neg_h, self.neg_off = _flat(table.column("neg_h"))
        rows = len(ds)
        pos_row = np.repeat(np.arange(rows), np.diff(self.pos_off))
        neg_row = np.repeat(np.arange(rows), np.diff(self.neg_off))
        # Row-major order of every occurrence: row r's positives, then its negatives.
        hashes = np.concatenate([pos_h, neg_h])
        key = np.concatenate([pos_row * 2, neg_row * 2 + 1])
        order = np.argsort(key, kind="stable")
        uniq, first = np.unique(hashes[order], return_index=True)
        number = np.empty(len(uniq), dtype=np.int64)
        number[np.argsort(first, kind="stable")] = np.arange(len(uniq))   # by first appearance
        self.size = len(uniq)
        ids = number[np.searchsorted(uniq, hashes)]                        # every occurrence
        self.pos_ids, self.neg_ids = ids[:len(pos_h)], ids[len(pos_h):]
        # Where each passage first appears, to read its tokens: (positive or negative, row, slot).
        occurrence_row = np.concatenate([pos_row, neg_row])
        occurrence_slot = np.concatenate([np.arange(len(pos_h)) - self.pos_off[pos_row],
                                          np.arange(len(neg_h)) - self.neg_off[neg_row]])
        at = order[first[np.argsort(number)]]                             # by passage number
        self.first_row, self.first_slot = occurrence_row[at], occurrence_slot[at]
        self.first_is_neg = at >= len(pos_h)
        self._first_at = at
        # Every positive of each query text, over all its rows (CSR by query group).
        query_h = table.column("query_h").to_numpy()
        groups, self.group_of = np.unique(query_h, return_inverse=True)
        pairs = np.unique(self.group_of[pos_row] * self.size + self.pos_ids)
        self.rel_ids = pairs % self.size
        self.rel_off = np.searchsorted(pairs // self.size, np.arange(len(groups) + 1))

    def positives(self, row: int) -> list[int]:
        """The row's positives by number, each once, in the row's order."""
        return list(dict.fromkeys(self.pos_ids[self.pos_off[row]:self.pos_off[row + 1]].tolist()))

    def relevant(self, row: int) -> list[int]:
        """Every passage relevant to the row's query text (sorted)."""
        g = self.group_of[row]
        return self.rel_ids[self.rel_off[g]:self.rel_off[g + 1]].tolist()

    def negatives(self, row: int) -> list[int]:
        """The row's negatives, each once, in order, without any relevant to its query."""
        relevant = set(self.relevant(row))
        negs = self.neg_ids[self.neg_off[row]:self.neg_off[row + 1]].tolist()
        return [n for n in dict.fromkeys(negs) if n not in relevant]

    def own_negative_counts(self) -> np.ndarray:
        """len(negatives(row)) for every row, computed for all rows at once."""
        rows = len(self.group_of)
        neg_row = np.repeat(np.arange(rows), np.diff(self.neg_off))
        pairs = np.unique(neg_row * self.size + self.neg_ids)                # distinct (row, n)
        row, n = pairs // self.size, pairs % self.size
        rel_keys = np.repeat(np.arange(len(self.rel_off) - 1), np.diff(self.rel_off)) \
            * self.size + self.rel_ids
        relevant = np.isin(self.group_of[row] * self.size + n, rel_keys)
        return np.bincount(row[~relevant], minlength=rows)

    def relevant_counts(self) -> np.ndarray:
        return np.diff(self.rel_off)[self.group_of]

    def _first(self, number: int, suffix: str) -> Any:
        kind = "neg" if self.first_is_neg[number] else "pos"
        cell = self._columns[kind + suffix][int(self.first_row[number])]
        return cell.values[int(self.first_slot[number])].as_py()

    def lengths(self) -> np.ndarray:
        """Token count of every passage, by number (from the Arrow offsets, no copy of ids)."""
        import pyarrow.compute as pc

        per_occurrence = np.concatenate([
            pc.list_value_length(pc.list_flatten(self._columns[c])).to_numpy()
            for c in ("pos_ids", "neg_ids")])
        return per_occurrence[self._first_at]

    def tokens(self, number: int) -> list[int]:
        """Token ids of passage `number` (read from the Arrow file)."""
        return self._first(number, "_ids")

    def text(self, number: int) -> str:
        return self._first(number, "")
