"""Packed texts on a GPU: variable-length attention, registered with transformers.

On a GPU, `EmbeddingModel` packs a batch's texts into one row with no padding, as it does on
the CPU: each text with its own positions from 0, its boundaries handed to every attention
layer as flash-attention's `cu_seq_lens_q/k` and `max_length_q/k`. The attention here computes
each text against itself alone through a variable-length kernel:

- PyTorch's FlashAttention varlen (`torch.nn.attention.varlen.varlen_attn`, CUDA, fp16/bf16):
  causal, bidirectional and sliding-window layers through its `window_size`, grouped key and
  value heads through `enable_gqa`;
- flash-attn's `flash_attn_varlen_func` when that package is installed and the layer has
  attention dropout, which PyTorch's kernel does not draw;
- otherwise (fp32, a GPU before Ampere, dropout without flash-attn, a soft cap) the texts are
  gathered into groups of similar length, each a padded SDPA call: the padding costs
  attention only, never the linear layers (the boundaries come from the host, where
  `EmbeddingModel` attaches them to the tensor it passes).

No attention mask is built for this attention (none is registered with transformers'
`AttentionMaskInterface`): transformers would otherwise scan the position ids for packed
texts on every forward pass, which waits for the device, and build a (T, T) mask no kernel
here reads. So a call without boundaries is taken as rows without padding, which is how
`EmbeddingModel` calls it (it packs every batch, and switches a model back to SDPA if the
boundaries do not reach its attention).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from embedrag.cpu.kernels import PACKED_CALLS
from embedrag.cpu.packing import cheapest_groups

VARLEN = "embedrag_varlen"

try:  # PyTorch 2.10 and later
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older PyTorch
    varlen_attn = None

# Grouped fallback: what one more attention call costs, as the (positions x positions) entries
# it could compute instead (as `embedrag.cpu.kernels.GROUP_OVERHEAD`, for a GPU's launch cost).
GROUP_OVERHEAD = 512 * 512


def flash_attn_varlen() -> Any:
    """flash-attn's varlen function, when the package is installed (it draws dropout)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def supports(query: torch.Tensor) -> bool:
    """Whether the FlashAttention kernels run this query: CUDA, half precision, Ampere+."""
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(query.device)[0] >= 8)


def causal_of(module: nn.Module, is_causal: bool | None) -> bool:
    """A layer's causality: the call's `is_causal` if given, else the layer's flag, unless its
    config says bidirectional (`is_causal = False`, which transformers reads only when
    building masks — and none is built for this attention)."""
    if is_causal is not None:
        return bool(is_causal)
    config = getattr(module, "config", None)
    return bool(getattr(module, "is_causal", True)) and getattr(config, "is_causal", True) \
        is not False


def window_of(causal: bool, sliding_window: int | None) -> tuple[int, int]:
    """flash-attention's (left, right) window, inclusive, -1 unbounded. transformers' sliding
    layers let a query see keys less than `sliding_window` positions away: behind it when
    causal, on both sides when bidirectional (Gemma 3's `use_bidirectional_attention`)."""
    reach = sliding_window - 1 if sliding_window else -1
    return (reach, 0) if causal else (reach, reach)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0,
              scaling: float | None = None, sliding_window: int | None = None,
              is_causal: bool | None = None, cu_seq_lens_q: torch.Tensor | None = None,
              max_length_q: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature. query: (B, H, L, d); key, value: (B, Hkv, L, d).
    Packed (cu_seq_lens_q given): B = 1 and the texts fill the row. Otherwise each of the B
    rows is one text with no padding. Returns (B, L, H, d)."""
    b, heads, length, d = query.shape
    kv_heads = key.shape[1]
    PACKED_CALLS["attention"] += 1
    if cu_seq_lens_q is None:
        bounds = torch.arange(0, (b + 1) * length, length, dtype=torch.int32,
                              device=query.device)                         # (B + 1,)
        longest = length
    else:
        PACKED_CALLS["segments"] += 1
        bounds, longest = cu_seq_lens_q, int(max_length_q)
    window = window_of(causal_of(module, is_causal), sliding_window)
    q = query.transpose(1, 2).reshape(b * length, heads, d)               # (T, H, d)
    k = key.transpose(1, 2).reshape(b * length, kv_heads, d)              # (T, Hkv, d)
    v = value.transpose(1, 2).reshape(b * length, kv_heads, d)
    plain = all(kwargs.get(name) is None for name in ("softcap", "s_aux", "sinks"))
    flash = flash_attn_varlen() if dropout else None
    if plain and supports(q) and varlen_attn is not None and not dropout:
        out = varlen_attn(q, k, v, bounds, bounds, longest, longest, scale=scaling,
                          window_size=window, enable_gqa=kv_heads != heads)
    elif plain and supports(q) and flash is not None:
        out = flash(q, k, v, bounds, bounds, longest, longest, dropout_p=dropout,
                    softmax_scale=scaling, causal=window[1] == 0, window_size=window)
    else:
        out = grouped(q, k, v, bounds, window, scaling, dropout)
    return out.reshape(b, length, heads, d), None


def grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor,
            window: tuple[int, int], scaling: float | None, dropout: float) -> torch.Tensor:
    """Each text against itself, texts of similar length in one padded SDPA call (a group's
    padding is masked out, and costs attention only). q: (T, H, d); k, v: (T, Hkv, d);
    bounds: (S + 1,) text starts. Returns (T, H, d)."""
    from torch.nn.utils.rnn import pad_sequence

    starts = getattr(bounds, "host_starts", None) or bounds.tolist()  # EmbeddingModel's
    lengths = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    texts = [t.split(lengths) for t in (q, k, v)]                         # (l, H|Hkv, d) each
    pieces: dict[int, torch.Tensor] = {}
    left, right = window
    for group in cheapest_groups(lengths, lambda n, w: n * w ** 2 + GROUP_OVERHEAD):
        group = [i for i in group if lengths[i] > 0]
        if not group:
            continue
        length = torch.tensor([lengths[i] for i in group], device=q.device)  # (n,)
        col = torch.arange(int(max(lengths[i] for i in group)), device=q.device)
        distance = col[:, None] - col[None, :]                            # (W, W) query - key
        allowed = torch.ones_like(distance, dtype=torch.bool)
        if left >= 0:
            allowed &= distance <= left
        if right >= 0:
            allowed &= -distance <= right
        allowed = allowed & (col < length[:, None])[:, None, :]             # (n, W, W)
        qq, kk, vv = (pad_sequence([t[i] for i in group], batch_first=True).transpose(1, 2)
                      for t in texts)                                      # (n, H|Hkv, W, d)
        out = nn.functional.scaled_dot_product_attention(
            qq, kk, vv, attn_mask=allowed[:, None], dropout_p=dropout, scale=scaling,
            enable_gqa=kk.shape[1] != qq.shape[1])                         # (n, H, W, d)
        for i, row in zip(group, out.transpose(1, 2).unbind(0), strict=True):
            pieces[i] = row[:lengths[i]]                                  # (l, H, d)
    return torch.cat([pieces[i] for i in sorted(pieces)])


def available() -> bool:
    """Whether a variable-length kernel is at hand on this machine's GPUs."""
    return torch.cuda.is_available() and (varlen_attn is not None
                                          or flash_attn_varlen() is not None)


def use(model: nn.Module) -> bool:
    """Switch `model` (or the model under its PEFT wrapper) from SDPA to this attention;
    returns whether it did (a model on another attention, or one that cannot switch, stays)."""
    from transformers import AttentionInterface

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if (config is None or getattr(config, "_attn_implementation", None) != "sdpa"
            or not getattr(base, "_can_set_attn_implementation", lambda: False)()):
        return False
    AttentionInterface.register(VARLEN, attention)
    base.set_attn_implementation(VARLEN)
    return True


def install(model: nn.Module, device: torch.device) -> dict[str, Any]:
    """On a CUDA device with a variable-length kernel, train `model` on packed rows; returns
    what was changed, for training_config.json's record of the run."""
    if device.type != "cuda" or not available():
        return {}
    return {"varlen_attention": True} if use(model) else {}


def stop_using(model: nn.Module) -> None:
    """Back to SDPA (with transformers' masks), for a model whose forward does not pass the
    texts' boundaries through to its attention."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation("sdpa")
