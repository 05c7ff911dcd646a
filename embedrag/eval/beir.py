"""Evaluation on the BEIR layout that MTEB's retrieval tasks use, scored as BEIR scores it.

    folder/corpus.jsonl     {"_id", "title", "text"} per line
    folder/queries.jsonl    {"_id", "text"} per line
    folder/qrels/SPLIT.tsv  query-id, corpus-id, score (a header line first)

As BEIR does: a document's text is its title and text joined by a space; queries are those of
the split's qrels; graded relevance counts in nDCG (gain = grade), grades above 0 make a
document relevant for the other metrics, and qrels documents missing from the corpus still
count (they can never be retrieved); a document with the query's own id is left out of its
ranking (BEIR's ignore_identical_ids). The corpus is read into memory-mapped Arrow and
tokenized through `Dataset.map` (cached), and embedded from there: a million passages cost
their embeddings, not a million Python strings.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np
import torch

from embedrag.data.passages import tokenize_column
from embedrag.eval.metrics import METRICS, query_metrics, top_ranked, with_prefixes
from embedrag.model.embedding import EmbedSettings, encode_ids, encode_with


def is_beir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "corpus.jsonl")) and \
        os.path.isdir(os.path.join(path, "qrels"))


def read_qrels(path: str) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader, None)  # header
        for row in reader:
            if len(row) >= 3:
                qrels.setdefault(row[0], {})[row[1]] = int(float(row[2]))
    return qrels


def _corpus_rows(path: str):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                doc = json.loads(line)
                title = doc.get("title") or ""
                yield {"_id": str(doc["_id"]),
                       "doc": (title + " " + doc.get("text", "")).strip() if title
                       else doc.get("text", "").strip()}


def load_corpus(folder: str, tokenizer: Any, settings: EmbedSettings) -> Any:
    """corpus.jsonl as Arrow with ids (token ids) and n (their count); both steps cached."""
    import datasets
    from datasets.fingerprint import Hasher

    path = os.path.abspath(os.path.join(folder, "corpus.jsonl"))
    stat = os.stat(path)
    corpus = datasets.Dataset.from_generator(
        _corpus_rows, gen_kwargs={"path": path},
        features=datasets.Features({"_id": datasets.Value("string"),
                                    "doc": datasets.Value("string")}),
        fingerprint=Hasher.hash(("beir-corpus", path, stat.st_size, stat.st_mtime_ns)))
    return tokenize_column(corpus, "doc", tokenizer, max_len=settings.passage_max_len,
                           instruction=settings.passage_instruction,
                           append_eos=settings.append_eos)


@torch.no_grad()
def evaluate_beir(model: Any, tokenizer: Any, folder: str, settings: EmbedSettings, *,
                  split: str = "test", batch_size: int = 32, progress: bool = False,
                  dims: list[int] | None = None) -> dict[str, float]:
    """METRICS of `model` on a BEIR folder's split, averaged over the split's queries (and of
    each prefix in `dims`, as `embedrag.eval.evaluate.evaluate` reports them)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    qrels = read_qrels(os.path.join(folder, "qrels", f"{split}.tsv"))
    queries: dict[str, str] = {}
    with open(os.path.join(folder, "queries.jsonl"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if str(row["_id"]) in qrels:
                    queries[str(row["_id"])] = row["text"]
    qids = [qid for qid in qrels if qid in queries]
    corpus = load_corpus(folder, tokenizer, settings)
    ids = corpus.data.column("ids")
    p = encode_ids(model, tokenizer, lambda rows: ids.take(rows).to_pylist(),
                   corpus.data.column("n").to_numpy(), batch_size=batch_size,
                   progress="corpus" if progress else "")                     # (C, D)
    q = encode_with(model, tokenizer, [queries[qid] for qid in qids],
                    max_len=settings.query_max_len, append_eos=settings.append_eos,
                    batch_size=batch_size, instruction=settings.query_instruction,
                    progress="queries" if progress else "")                   # (Q, D)
    value_set = corpus.data.column("_id").combine_chunks()

    def index(values: list[str]) -> list[int]:                              # -1: not in corpus
        found = pc.index_in(pa.array(values, pa.string()), value_set=value_set)
        return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64).tolist()

    exclude, docs_at = index(qids), index([d for qid in qids for d in qrels[qid]])

    def score(q: torch.Tensor, p: torch.Tensor) -> dict[str, float]:
        ranked = top_ranked(q, p, 100, exclude)
        where = iter(docs_at)
        totals, missing = dict.fromkeys(METRICS, 0.0), 0
        for qid, ranking in zip(qids, ranked, strict=True):
            grades = {}
            for grade in qrels[qid].values():
                at = next(where)
                if at < 0:  # not in the corpus: still relevant, never retrievable
                    missing += 1
                    at = -missing
                grades[at] = grade
            if any(g > 0 for g in grades.values()):
                for m, v in query_metrics(ranking, grades).items():
                    totals[m] += v
        return {m: v / max(len(qids), 1) for m, v in totals.items()}

    return with_prefixes(q, p, dims, score)
