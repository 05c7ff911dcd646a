"""Faster CPU versions of three operations a training step spends its time in.

- Dropout masks: `torch.bernoulli_` draws every element from the Mersenne Twister, and BERT
  draws one (B, H, L, L) mask per layer. Here masks come from NumPy's SFC64 generator, 64
  bits per draw cut into four 16-bit lanes, seeded from torch's own generator, so
  `torch.manual_seed`, checkpointed RNG state and GradCache's dropout replay keep working;
  the keep probability is exact to 1/65536.
- bf16 attention: PyTorch's CPU flash-attention backward is slow in bf16. Under bf16
  autocast the attention here runs in fp32 and casts back, which is also more accurate.
- RMSNorm (Gemma, Qwen2, Llama, Mistral): transformers' version makes many fp32 passes and
  keeps two fp32 copies of its input for the backward pass. Here one autograd function
  makes fewer passes and keeps the input and one scale per row. A class is swapped only
  after a probe shows it computes what the module's own forward does.

All apply on CPU only: GPUs have fused kernels and fast bf16 attention, so `install` leaves
a model on any other device as it is. The RMSNorm forward is transformers' arithmetic to the
bit; its backward and the attention are the same formulas with sums in another order; the
random stream behind dropout masks differs from torch's. The price: attention with dropout
keeps its (B, H, L, L) tensors in fp32 for the backward pass, which matters only for long
sequences with attention dropout. Timings are in docs/benchmarks.md.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from embedrag.cpu.packing import cheapest_groups

ATTENTION = "embedrag_cpu"


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bernoulli(1 - p) mask of `shape` as 1s and 0s in `dtype`, drawn as described above
    (a 0/1 float mask multiplies faster than `torch.where` selects on a bool mask)."""
    n = shape.numel()
    seed = int(torch.empty((), dtype=torch.int64).random_())  # advances torch's generator
    words = np.random.Generator(np.random.SFC64(seed)).bit_generator.random_raw((n + 3) // 4)
    lanes = torch.from_numpy(words.view(np.int16)[:n])  # (n,) uniform on [-2**15, 2**15)
    mask = torch.empty(n, dtype=dtype)
    torch.ge(lanes, round(p * 65536) - 32768, out=mask)
    return mask.view(shape)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`nn.functional.dropout`, with the mask from `keep_mask` on CPU."""
    if not training or p == 0.0 or x.device.type != "cpu":
        return nn.functional.dropout(x, p, training)
    if p == 1.0:
        return x * 0.0
    # The scale stays a Python float: 1/(1-p) is not exact in half precision.
    return (x * keep_mask(x.shape, p, x.dtype)).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """Drop-in for `nn.Dropout` (same `p`, same module type for code that checks it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0,
              scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention for transformers' AttentionInterface: `_packed` when the model forwards packed
    texts' boundaries (cu_seq_lens_q), else `_attend`. Shapes as `_attend`."""
    segments = kwargs.pop("cu_seq_lens_q", None)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    PACKED_CALLS["attention"] += 1
    if segments is not None:
        PACKED_CALLS["segments"] += 1
        return _packed(module, query, key, value, attention_mask, segments, dropout, scaling,
                       **kwargs)
    return _attend(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def _attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: torch.Tensor | None, dropout: float = 0.0,
            scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA without dropout (fp32 when the inputs are half precision), else softmax attention
    with the fast dropout mask. query: (B, H, Lq, d); key, value: (B, Hkv, Lk, d); mask: bool
    (B|1, 1, Lq, Lk), True where attention is allowed. Returns (B, Lq, H, d)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    plain = all(kwargs.get(k) is None for k in ("softcap", "position_bias", "s_aux", "sinks"))
    if dropout == 0.0 or not plain:
        # Grouped-query heads (Gemma, Qwen2, Llama) go to SDPA as they are (enable_gqa): the
        # key and value heads are not copied out per query head, which transformers does on
        # a CPU whenever there is a mask (benchmarks/attention_kernels.py times both), and
        # those copies are not kept for the backward pass.
        # Equal lengths (no KV cache): transformers' one extra step, cutting a longer key
        # and value to a causal query's length, cannot apply.
        same = query.shape[2] == key.shape[2]
        sdpa = _sdpa_gqa if plain and same else sdpa_attention_forward
        dtype = query.dtype
        if dtype in (torch.bfloat16, torch.float16):  # with or without grad: same numbers
            query, key, value = query.float(), key.float(), value.float()
            if attention_mask is not None and attention_mask.is_floating_point():
                attention_mask = attention_mask.float()
            with torch.autocast(query.device.type, enabled=False):  # it would cast back
                out, _ = sdpa(module, query, key, value, attention_mask,
                              dropout=dropout, scaling=scaling, **kwargs)
            return out.to(dtype), None
        return sdpa(module, query, key, value, attention_mask, dropout=dropout,
                    scaling=scaling, **kwargs)

    # Everything (B, H, Lq, Lk)-sized is made in fp32 (or float64) once: no half-precision
    # copies of it.
    dtype, lq, lk = query.dtype, query.shape[2], key.shape[2]
    wide = torch.promote_types(dtype, torch.float32)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)          # (B, H, Lk, d)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    bias = torch.zeros((), dtype=wide, device=query.device)
    if attention_mask is not None:
        # finfo.min, not -inf: a fully masked row (a left-padding query) stays finite
        bias = (torch.full_like(attention_mask, torch.finfo(wide).min, dtype=wide)
                .masked_fill_(attention_mask, 0.0)
                if attention_mask.dtype == torch.bool else attention_mask.to(wide))
    elif lq > 1 and _causal(module, kwargs):
        # No mask: causality was left to SDPA's flag, top-left aligned as torch's is_causal
        bias = torch.full((lq, lk), torch.finfo(wide).min, dtype=wide,
                          device=query.device).triu(1)
    with torch.autocast(query.device.type, enabled=False):
        scores = torch.matmul(query.to(wide) * scale, key.to(wide).transpose(2, 3))
        probs = scores.add_(bias).softmax(-1)                               # (B, H, Lq, Lk)
        kept = probs * keep_mask(probs.shape, dropout, wide)
        out = torch.matmul(kept, value.to(wide))                            # (B, H, Lq, d)
        out = out.mul_(1.0 / (1.0 - dropout))  # the dropout scale, on the small side
    return out.transpose(1, 2).to(dtype).contiguous(), None


# Packed attention calls seen, and how many of them carried the segments (see `_packed`):
# how `EmbeddingModel` checks that a model passes them through to every layer.
PACKED_CALLS = {"attention": 0, "segments": 0}

# What one more attention call costs, as the (positions x positions) entries it could compute
# instead: segments are grouped so that sum(count * longest**2) + this per group is least.
GROUP_OVERHEAD = 128 * 128


def _packed(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: torch.Tensor | None, segments: torch.Tensor, dropout: float,
            scaling: float | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention over packed texts: the row holds S texts one after another with no padding,
    text i at positions segments[i]:segments[i + 1] (flash-attention's cu_seqlens), and no
    text attends to another.

    query: (1, H, T, d); key, value: (1, Hkv, T, d); attention_mask: None (each text sees
    all of itself, or its past if the layer is causal) or bool (1, 1, T, T), the
    block-diagonal mask transformers builds from packed position ids (causal, sliding window,
    bidirectional: whatever the layer has). Texts of similar length are gathered into padded
    groups and each group goes through `attention`; the padding costs attention only, the
    small part of a layer, and never the linear layers. Returns (1, T, H, d)."""
    from torch.nn.utils.rnn import pad_sequence

    bounds = segments.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    assert bounds[0] == 0 and bounds[-1] == query.shape[2], "the texts must fill the row"
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0  # additive: 0 where allowed
    causal = _causal(module, kwargs)
    # Texts as views (l, H, d): split, padding and slicing have backward passes that copy
    # slices, where gathering by index would scatter-add.
    texts = [t[0].transpose(0, 1).split(lengths) for t in (query, key, value)]
    pieces: dict[int, torch.Tensor] = {}
    groups = cheapest_groups(lengths, lambda count, widest: count * widest ** 2 + GROUP_OVERHEAD)
    for group in groups:
        group = [i for i in group if lengths[i] > 0]
        if not group:
            continue
        length = torch.tensor([lengths[i] for i in group], device=query.device)  # (n,)
        width = int(length.max())
        col = torch.arange(width, device=query.device)                   # (W,)
        real = col < length[:, None]                                     # (n, W)
        if attention_mask is not None:
            # a padding row reads the text's last row of the mask, which is never empty
            start = segments[group].to(query.device, torch.long)          # (n,)
            at = start[:, None] + torch.minimum(col, length[:, None] - 1)  # (n, W)
            allowed = attention_mask[0, 0][at[:, :, None], at[:, None, :]]  # (n, W, W)
        elif causal:
            allowed = torch.ones(width, width, dtype=torch.bool, device=query.device).tril()
        else:
            allowed = torch.ones((), dtype=torch.bool, device=query.device)
        allowed = (allowed & real[:, None, :]).unsqueeze(1)              # (n, 1, W, W)
        q, k, v = (pad_sequence([t[i] for i in group], batch_first=True).transpose(1, 2)
                   for t in texts)                                       # (n, H, W, d)
        out, _ = _attend(module, q, k, v, allowed, dropout, scaling, **kwargs)  # (n, W, H, d)
        for i, row in zip(group, out.unbind(0), strict=True):
            pieces[i] = row[:lengths[i]]                                 # (l, H, d)
    return torch.cat([pieces[i] for i in sorted(pieces)]).unsqueeze(0), None  # (1, T, H, d)


def _causal(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether a layer given no mask is causal, read as transformers' SDPA path reads it: an
    `is_causal` argument wins, else the module's flag, else causal."""
    causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if causal is None else causal)


def _sdpa_gqa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0,
              scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' `sdpa_attention_forward` (same arguments) for equal query and key
    lengths, with grouped-query heads passed through. Shapes as `attention`.

    transformers has a switch for the same (TRANSFORMERS_SDPA_FORCE_GQA=1), but it is an
    environment variable for the whole process, GPUs included, where masked grouped-query
    attention would fall back to the slow math kernel."""
    out = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=query.shape[2] > 1 and attention_mask is None and _causal(module, kwargs),
        enable_gqa=query.shape[1] != key.shape[1])                      # (B, H, Lq, d)
    return out.transpose(1, 2).contiguous(), None


class _RMSNorm(torch.autograd.Function):
    """y = w' * x / sqrt(mean(x^2) + eps) over the last dim, computed in fp32 (or wider).

    `offset` is Gemma's form: the weight is stored as w - 1, and the product is rounded to
    the input dtype after the weight multiply. Otherwise (Llama, Qwen2, Mistral) the
    normalised input is rounded first, then multiplied by the weight in the weight's dtype.
    The forward pass is transformers' own arithmetic, operation for operation, so its output
    is bit-equal to the module's in every dtype. The backward pass keeps only x and the
    per-row scale r and rebuilds x * r: with g' = dL/d(x r),
    dL/dx = r * (g' - x r * mean(g' * x r)) — the same derivative autograd takes of
    transformers' norm, with its sums over D taken in another order (equal to rounding)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float,
                offset: bool) -> torch.Tensor:
        wide = torch.promote_types(x.dtype, torch.float32)
        widened = x.to(wide)                                                    # (..., D)
        r = torch.rsqrt(widened.pow(2).mean(-1, keepdim=True) + eps)           # (..., 1)
        normed = widened.mul_(r) if widened is not x else x * r                 # (..., D)
        ctx.save_for_backward(x, r, weight)
        ctx.offset = offset
        if offset:
            return normed.mul_(weight.to(wide) + 1.0).to(x.dtype)
        return weight * normed.to(x.dtype)

    @staticmethod
    @once_differentiable  # the backward works in place: no second derivative
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, r, weight = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):  # vecdot would run in bf16
            return _rms_backward(grad, x, r, weight, ctx.offset, ctx.needs_input_grad[1])


def _rms_backward(grad: torch.Tensor, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor,
                  offset: bool, weight_grad: bool) -> tuple[torch.Tensor | None, ...]:
    """dL/dx (and dL/dw when `weight_grad`) of `_RMSNorm`, from what its forward kept."""
    wide = r.dtype
    normed = _times(x, r, wide)                                             # (..., D)
    scale = weight.to(wide) + 1.0 if offset else weight.to(wide)            # (D,)
    g = _times(grad, scale, wide)                                           # (..., D)
    dot = torch.linalg.vecdot(g, normed, dim=-1).unsqueeze(-1)              # (..., 1)
    dx = g.addcmul_(normed, dot, value=-1.0 / x.shape[-1]).mul_(r).to(x.dtype)
    dw = None
    if weight_grad:
        seen = normed if offset else normed.to(x.dtype).to(wide)  # what w multiplied
        dw = (grad.to(wide) * seen).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx, dw, None, None


def _times(x: torch.Tensor, scale: torch.Tensor, wide: torch.dtype) -> torch.Tensor:
    """x * scale as a new `wide` tensor; a half-precision x is widened first, since mixed-dtype
    multiplies take a slow unvectorised path on CPUs."""
    widened = x.to(wide)
    return widened.mul_(scale) if widened is not x else x * scale


# RMSNorm classes by name -> Gemma's form (1 + w, rounded after the multiply) or not
RMS_NORMS = {"GemmaRMSNorm": True, "Gemma2RMSNorm": True, "Gemma3RMSNorm": True,
             "LlamaRMSNorm": False, "MistralRMSNorm": False, "Qwen2RMSNorm": False,
             "Qwen3RMSNorm": False}


def _rms_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A swapped norm's forward: the function above on CPU tensors, the class's own elsewhere
    (a trained model moved to a GPU gets the GPU's kernels)."""
    if x.device.type != "cpu":
        return type(module).forward(module, x)
    return _RMSNorm.apply(x, module.weight, _eps(module), RMS_NORMS[type(module).__name__])


def _eps(module: nn.Module) -> Any:
    return getattr(module, "eps", getattr(module, "variance_epsilon", None))


def _agrees(module: nn.Module) -> bool:
    """Whether `_rms_forward` gives what the module's own forward gives, values and input
    gradients in fp32 and bf16: this transformers version (or a model's shipped code under a
    known class name) might compute the class differently. Half the probe rows are at the
    scale of eps, so a different eps shows. The probe is drawn from a private generator: the
    global random stream, which the dropout masks read, is left alone."""
    weight, eps = getattr(module, "weight", None), _eps(module)
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 1 and isinstance(eps, float)):
        return False
    generator = torch.Generator().manual_seed(0)
    if weight.is_meta:  # a process that reads no weights (model/meta.py): a copy with values
        module = copy.deepcopy(module).to_empty(device="cpu")
        weight = module.weight
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=generator))
    scale = torch.tensor([[1.0], [1.0], [eps ** 0.5], [eps ** 0.5]])                # (4, 1)
    probe = torch.randn(4, weight.shape[0], generator=generator) * scale          # (4, D)
    upstream = torch.randn(4, weight.shape[0], generator=generator)
    try:
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            results = []
            for forward in (module, functools.partial(_rms_forward, module)):
                x = probe.to(dtype=dtype, device=weight.device).requires_grad_()
                with torch.enable_grad():
                    out = forward(x)
                    (dx,) = torch.autograd.grad((out.float() * upstream).sum(), x)
                results.append((out, dx))
            (theirs, dtheirs), (ours, dours) = results
            if theirs.dtype != ours.dtype or theirs.shape != ours.shape:
                return False
            for a, b in ((ours, theirs), (dours, dtheirs)):  # per row, relative to the row
                a, b = a.float(), b.float()
                if not ((a - b).abs().amax(-1) <= tolerance * b.abs().amax(-1)).all():
                    return False
    except Exception:  # another signature or return type: not the norm we know
        return False
    return True


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def install(model: nn.Module, device: torch.device) -> dict[str, Any]:
    """Swap in the CPU dropout, RMSNorm and attention when `model` will train on `device` = CPU;
    returns what was changed, for training_config.json's record of the run."""
    if device.type != "cpu":
        return {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "use_kernels", False):
        # With the `kernels` package installed, transformers re-kernelizes its hub-decorated
        # layers (RMSNorm among them) at every train()/eval() switch, which puts the class's
        # forward back over the one swapped in below. On the CPU these kernels take that role.
        base.use_kernels = False
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                fast = Dropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped += 1
    verdict: dict[type, bool] = {}
    norms = 0
    for module in model.modules():
        kind = type(module)
        if kind.__name__ in RMS_NORMS:
            if kind not in verdict:
                verdict[kind] = _agrees(module)
            if verdict[kind]:
                module.forward = functools.partial(_rms_forward, module)  # pickles
                norms += 1
    done: dict[str, Any] = {"cpu_dropout_modules": swapped, "cpu_rms_norm_modules": norms}
    config = getattr(base, "config", None)
    if (config is not None and getattr(config, "_attn_implementation", None) == "sdpa"
            and getattr(base, "_can_set_attn_implementation", lambda: False)()):
        _register()
        base.set_attn_implementation(ATTENTION)
        done["cpu_attention"] = True
    return done
