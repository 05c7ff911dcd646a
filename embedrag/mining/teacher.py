"""Teacher scores for distillation: a stronger model's score of every positive and negative.

Rows gain `pos_scores` and `neg_scores` (one number per passage, FlagEmbedding's format), which
`--kd_weight` trains towards. Two kinds of teacher:

- an embedding model (anything train.py accepts: a base model, an adapter folder, a merged or
  full fine-tune), embedding as it was trained; the score is the cosine similarity, so train
  with a small --kd_temperature (e.g. the teacher's own training temperature, 0.02);
- a cross-encoder (`AutoModelForSequenceClassification`, a reranker), reading (query, passage)
  pairs; the score is its relevance logit (the one logit, or log-odds of the last class over
  the first), so --kd_temperature 1 is the natural start.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from embedrag.io import read_json
from embedrag.model.loading import check_remote_code, load_embedder

KINDS = ("auto", "embedding", "cross-encoder")


def teacher_kind(path: str) -> str:
    """'cross-encoder' when the model is a sequence classifier, else 'embedding'."""

    config = read_json(os.path.join(path, "config.json")) or {}
    archs = config.get("architectures") or []
    return "cross-encoder" if any(a.endswith("ForSequenceClassification") for a in archs) \
        else "embedding"


class EmbeddingTeacher:
    def __init__(self, path: str, batch_size: int, trust_remote_code: bool = False,
                 dtype: torch.dtype = torch.float32):
        self.model, self.tokenizer, self.settings = load_embedder(
            path, dtype=dtype, trust_remote_code=trust_remote_code, device=_device())
        self.batch_size = batch_size

    def score(self, queries: list[str], passages: list[list[str]],
              prompts: list[str | None] | None = None) -> list[list[float]]:
        """Cosine of each query (with its row's own prompt, else the teacher's query
        instruction) with each of its passages."""
        s = self.settings
        prompts = prompts or [None] * len(queries)
        texts = [(s.query_instruction if p is None else p) + q
                 for p, q in zip(prompts, queries, strict=True)]
        q = self.model.encode(self.tokenizer, texts, max_len=s.query_max_len,
                              append_eos=s.append_eos, batch_size=self.batch_size)  # (B, D)
        flat = [t for row in passages for t in row]
        p = self.model.encode(self.tokenizer, flat, max_len=s.passage_max_len,
                              append_eos=s.append_eos, batch_size=self.batch_size,
                              instruction=s.passage_instruction)                 # (N, D)
        owner = torch.repeat_interleave(torch.arange(len(queries)),
                                        torch.tensor([len(r) for r in passages]))
        cos = (q.double()[owner] * p.double()).sum(-1).tolist()                  # (N,)
        return _split(cos, passages)


class CrossEncoderTeacher:
    def __init__(self, path: str, batch_size: int, max_len: int = 512,
                 trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_remote_code(path, trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code).to(_device()).eval()
        if self.tokenizer.pad_token is None:  # decoder rerankers
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.max_len = batch_size, max_len

    @torch.no_grad()
    def score(self, queries: list[str], passages: list[list[str]],
              prompts: list[str | None] | None = None) -> list[list[float]]:
        """The relevance logit of each (query, passage) pair (a reranker reads the bare
        query: row prompts are embedding instructions)."""
        pairs = [(q, t) for q, row in zip(queries, passages, strict=True) for t in row]
        out: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            enc = self.tokenizer([q for q, _ in chunk], [t for _, t in chunk], padding=True,
                                 truncation="longest_first", max_length=self.max_len,
                                 return_tensors="pt").to(self.model.device)
            logits = self.model(**enc).logits.double()                          # (n, labels)
            out += (logits[:, 0] if logits.shape[1] == 1
                    else logits[:, -1] - logits[:, 0]).tolist()
        return _split(out, passages)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _split(flat: list[float], like: list[list[str]]) -> list[list[float]]:
    out, at = [], 0
    for row in like:
        out.append(flat[at:at + len(row)])
        at += len(row)
    return out


def score_file(teacher: Any, source: str, target: str, rows_per_batch: int = 64) -> int:
    """Write `source`'s rows to `target` with pos_scores and neg_scores (other fields kept);
    returns the row count. The rows must have been checked (embedrag.data.formats.load_rows)."""
    count = 0
    with open(source, encoding="utf-8-sig") as f, open(target, "w", encoding="utf-8") as out:
        batch: list[dict[str, Any]] = []

        def flush() -> None:
            scores = teacher.score([r["query"] for r in batch],
                                   [r["pos"] + (r.get("neg") or []) for r in batch],
                                   [r.get("prompt") for r in batch])
            for row, s in zip(batch, scores, strict=True):
                row["pos_scores"], row["neg_scores"] = s[:len(row["pos"])], s[len(row["pos"]):]
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            batch.clear()

        for line in f:
            if line.strip():
                batch.append(json.loads(line))
                count += 1
                if len(batch) == rows_per_batch:
                    flush()
        if batch:
            flush()
    return count
