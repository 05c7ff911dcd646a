"""What the packing tests share: a batch of texts of many lengths, the backbone as stock
transformers computes it (float64), and the padded batch's embeddings and gradients to compare
packed ones with."""

from __future__ import annotations

import torch
from transformers import AutoModel

from embedrag.data.tokens import pad, tokenize
from embedrag.model.embedding import mean_pool
from embedrag.model.tokens import load_tokenizer
from tests.float64 import float64_norms

TEXTS = ["apple", "banana cherry delta eagle", "tiger lion", "the river near the zebra x y",
         "z", "apple banana", "eagle tiger river zebra apple banana cherry"]


def batch(path: str, pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
    tok = load_tokenizer(path)
    return pad(tokenize(tok, TEXTS, 32, pooling == "last"), tok.pad_token_id, tok.padding_side)


def stock(path: str, **config) -> torch.nn.Module:
    """The backbone as transformers computes it: its own SDPA attention, nothing swapped."""
    return AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float64,
                                     **config)


def reference_model(path: str, **config) -> torch.nn.Module:
    """`stock`, with RMSNorms in float64 by hand (transformers' compute in float32)."""
    return float64_norms(stock(path, **config))


def padded_reference(backbone, ids, mask, pooling, positions=False) -> torch.Tensor:
    """One padded call, pooled by hand: the last real token, or the mean of the real ones;
    normalised in float32 or wider, as EmbeddingModel's embeddings are. With `positions`,
    every text's positions count from 0 at its first real token, as in a packed row."""
    extra = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if positions else {}
    hidden = backbone(input_ids=ids, attention_mask=mask, **extra).last_hidden_state  # (N, L, H)
    if pooling == "mean":
        pooled = mean_pool(hidden, mask)
    else:
        last = (mask * torch.arange(mask.shape[1])).argmax(1)
        pooled = hidden[torch.arange(len(ids)), last]
    return torch.nn.functional.normalize(
        pooled.to(torch.promote_types(pooled.dtype, torch.float32)), dim=-1)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Gradients agree to 1e-10 of their largest element: far above float64 rounding, far
    below a wrong attention (1e-2 and more)."""
    return bool((a - b).abs().max() <= 1e-10 * b.abs().max() + 1e-14)  # key biases: 0 + noise


def outputs_and_grads(fn, params, target):
    for p in params:
        p.grad = None
    out = fn()
    (out * target).sum().backward()
    return out.detach(), [None if p.grad is None else p.grad.clone() for p in params]


CALLS: list[dict] = []


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                     window_size=(-1, -1), enable_gqa=False, **unused):
    """torch.nn.attention.varlen.varlen_attn's contract, computed plainly: query (T, H, d),
    key/value (T, Hkv, d); text i at cu_seq[i]:cu_seq[i+1]; query j sees key k of its own
    text when j - k <= left and k - j <= right (-1: unbounded)."""
    assert torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    assert not unused or set(unused) <= {"return_aux"}
    bounds = cu_seq_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == query.shape[0]
    assert max_q == max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    heads, kv_heads = query.shape[1], key.shape[1]
    assert enable_gqa == (heads != kv_heads)
    CALLS.append({"window": window_size, "texts": len(bounds) - 1})
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    left, right = window_size
    out = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        q = query[a:b].transpose(0, 1)                                       # (H, l, d)
        k = key[a:b].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        v = value[a:b].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        at = torch.arange(b - a)
        gap = at[:, None] - at[None, :]                                      # query - key
        allowed = ((gap <= left) | (left < 0)) & ((-gap <= right) | (right < 0))
        scores = (q @ k.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))
        out.append((scores.softmax(-1) @ v).transpose(0, 1))                 # (l, H, d)
    return torch.cat(out)
