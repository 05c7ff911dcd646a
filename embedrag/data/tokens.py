"""Token ids: tokenizing texts to a length (EOS kept) and padding them into a batch."""

from __future__ import annotations

from typing import Any

import torch


def tokenize(tokenizer: Any, texts: list[str], max_len: int, append_eos: bool) -> list[list[int]]:
    """Token ids for each text, truncated to max_len; with append_eos the EOS id is the last
    token even after truncation (truncate to max_len - 1, then append), as gte-Qwen2 does."""
    if not texts:
        return []
    budget = max_len - 1 if append_eos else max_len
    ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=budget,
                    return_attention_mask=False)["input_ids"]
    if append_eos:
        ids = [seq + [tokenizer.eos_token_id] for seq in ids]
    return ids


def pad(seqs: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence of this batch only. Returns input_ids, attention_mask (N, L)."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "left":
            ids[i, longest - len(s):] = torch.tensor(s)
            mask[i, longest - len(s):] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids, mask
