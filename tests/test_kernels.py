"""The CPU dropout and attention compute what torch's do, checked against float64 references
that replay the same dropout masks; whole models with every kernel swapped in (RMSNorm too,
tested on its own in test_kernels_rms_norm.py) compute what they computed before."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from embedrag.cpu import kernels
from tests.float64 import float64_norms


class Layer(torch.nn.Module):
    """Stands in for an attention module: the interface reads `is_causal` from it."""

    def __init__(self, causal: bool = False, groups: int = 1):
        super().__init__()
        self.is_causal = causal
        self.num_key_value_groups = groups


def replayed_mask(seed: int, shape: tuple, p: float) -> torch.Tensor:
    """keep_mask's draw rebuilt independently: torch's next int64 seeds SFC64, whose words are
    cut into 16-bit lanes; a lane is kept when, read as a signed number plus 2**15 (the same
    as flipping its top bit of the unsigned one), it is >= p * 2**16."""
    torch.manual_seed(seed)
    sfc_seed = int(torch.empty((), dtype=torch.int64).random_())
    n = int(np.prod(shape))
    words = np.random.Generator(np.random.SFC64(sfc_seed)).bit_generator.random_raw((n + 3) // 4)
    lanes = (words.view(np.uint16)[:n] ^ 0x8000).astype(np.int64)
    return torch.from_numpy(lanes >= round(p * 65536)).reshape(shape).double()


def test_keep_mask_is_the_replayed_draw_and_keeps_one_minus_p():
    torch.manual_seed(7)
    mask = kernels.keep_mask(torch.Size((1000, 1001)), 0.1)
    assert mask.dtype == torch.float32
    assert torch.equal(mask.double(), replayed_mask(7, (1000, 1001), 0.1))
    # 1,001,000 Bernoulli(0.9) draws: sd 3e-4, so 5 sd is 1.5e-3
    assert abs(mask.mean().item() - 0.9) < 1.5e-3
    torch.manual_seed(8)
    assert not torch.equal(mask, kernels.keep_mask(torch.Size((1000, 1001)), 0.1))


def test_keep_mask_takes_exactly_one_draw_from_torch():
    """So checkpointed RNG state and GradCache's replay see the same masks again."""
    torch.manual_seed(3)
    kernels.keep_mask(torch.Size((5, 7)), 0.3)
    after = torch.rand(4)
    torch.manual_seed(3)
    torch.empty((), dtype=torch.int64).random_()
    assert torch.equal(after, torch.rand(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_output_and_gradient(dtype):
    x = torch.randn(6, 50, 32, dtype=torch.float64)
    xin = x.to(dtype).requires_grad_()
    torch.manual_seed(11)
    y = kernels.fast_dropout(xin, 0.2, True)
    y.backward(torch.ones_like(y))
    mask = replayed_mask(11, (6, 50, 32), 0.2)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.double(), xin.detach().double() * mask / 0.8, rtol=tol, atol=tol)
    torch.testing.assert_close(xin.grad.double(), mask / 0.8, rtol=tol, atol=tol)
    assert kernels.fast_dropout(xin, 0.2, False) is xin
    layer = kernels.Dropout(0.2).eval()
    assert isinstance(layer, torch.nn.Dropout) and layer(xin) is xin


def reference_attention(q, k, v, allowed, p, seed):
    """Softmax attention in float64 with the replayed dropout mask. q: (B, H, L, d);
    k, v: (B, Hkv, L, d); allowed: bool (B, 1, L, L). Returns (B, L, H, d)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(2, 3) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1)
    if p:
        probs = probs * replayed_mask(seed, tuple(probs.shape), p) / (1 - p)
    return (probs @ v).transpose(1, 2)


def padding_mask(lengths: list[int], length: int) -> torch.Tensor:
    keys = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]        # (B, L)
    return keys[:, None, None, :].expand(len(lengths), 1, length, length)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_matches_float64_reference(p, kv_heads):
    torch.manual_seed(0)
    q64 = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    k64, v64 = (torch.randn(3, kv_heads, 9, 8, dtype=torch.float64) for _ in range(2))
    allowed = padding_mask([9, 5, 2], 9)
    q, k, v = (t.float().requires_grad_() for t in (q64, k64, v64))
    torch.manual_seed(5)
    out, _ = kernels.attention(Layer(groups=4 // kv_heads), q, k, v, allowed, dropout=p,
                               scaling=8 ** -0.5)
    ref_in = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    ref = reference_attention(*ref_in, allowed, p, 5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(ref)
    (out.double() * weights).sum().backward()
    (ref * weights).sum().backward()
    for got, want in zip((q, k, v), ref_in, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)


def test_attention_without_dropout_is_sdpa_and_fp32_under_bf16_autocast():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    allowed = padding_mask([16, 11], 16)
    ours, _ = kernels.attention(Layer(), q, k, v, allowed, dropout=0.0)
    theirs, _ = sdpa_attention_forward(Layer(), q, k, v, allowed, dropout=0.0)
    assert torch.equal(ours, theirs)
    # bf16 inputs that will be backpropagated: computed in fp32, so closer to float64 than
    # bf16 SDPA itself
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = kernels.attention(Layer(), qb, kb, vb, allowed, dropout=0.0)
    assert out.dtype == torch.bfloat16
    exact = reference_attention(*(t.detach().double() for t in (qb, kb, vb)), allowed, 0, 0)
    fp32 = reference_attention(*(t.detach().float() for t in (qb, kb, vb)), allowed, 0, 0)
    torch.testing.assert_close(out.float(), fp32.bfloat16().float(), rtol=0, atol=0)
    assert (out.double() - exact).abs().max() <= 8e-3


@pytest.mark.parametrize("mask", ["bool", "float", "none"])
@pytest.mark.parametrize("causal", [True, False])
def test_grouped_query_heads_are_transformers_sdpa_without_the_copies(mask, causal):
    """Gemma/Qwen2-style heads (4 query heads per key head) without dropout: the same output
    and gradients as transformers' SDPA, which copies each key/value head out per query head
    first whenever there is a mask, and less kept for the backward pass (those copies)."""
    torch.manual_seed(7)
    q = torch.randn(3, 8, 10, 16, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 10, 16, dtype=torch.float64) for _ in range(2))
    allowed = padding_mask([10, 6, 3], 10) & torch.ones(10, 10, dtype=torch.bool).tril()
    masks = {"bool": allowed, "none": None,
             "float": torch.where(allowed, 0.0, torch.finfo(torch.float32).min)}
    weights = torch.randn(3, 10, 8, 16, dtype=torch.float64)
    results = []
    for attend in (kernels.attention, sdpa_attention_forward):
        inputs = [t.float().requires_grad_() for t in (q, k, v)]
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, _ = attend(Layer(causal=causal, groups=4), *inputs, masks[mask], dropout=0.0)
        (out.double() * weights).sum().backward()
        results.append(([out, *(t.grad for t in inputs)], sum(saved)))
    (ours, ours_saved), (theirs, theirs_saved) = results
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # without a mask transformers passes the grouped heads through itself
    assert ours_saved < theirs_saved if mask != "none" else ours_saved == theirs_saved


def test_causal_without_mask_and_fully_masked_rows():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    torch.manual_seed(9)
    out, _ = kernels.attention(Layer(causal=True), q.float(), k.float(), v.float(), None,
                               dropout=0.5)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, causal, 0.5, 9),
                               rtol=1e-5, atol=1e-6)
    # A left-padding query that may attend to nothing stays finite (SDPA gives NaN for -inf).
    allowed = causal.clone()
    allowed[..., 0, :] = False
    out, _ = kernels.attention(Layer(), q.float(), k.float(), v.float(), allowed, dropout=0.5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dropout", [1e-9, 0.0])
def test_without_a_mask_causality_is_read_as_sdpa_reads_it(dropout):
    """A module without `is_causal` counts as causal, an `is_causal` argument wins; on the
    dropout path (p = 1e-9 keeps every element) and the SDPA path."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))

    class Bare(torch.nn.Module):
        pass

    for module, kwargs in ((Bare(), {}), (Layer(causal=True), {"is_causal": False}),
                           (Layer(causal=False), {"is_causal": True}),
                           (Layer(causal=False), {})):
        ours, _ = kernels.attention(module, q, k, v, None, dropout=dropout, **kwargs)
        theirs, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.0, **kwargs)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_half_precision_attention_is_the_same_with_and_without_grad():
    """GradCache embeds under no_grad, then again with grad: both must see the same numbers."""
    torch.manual_seed(6)
    q, k, v = (torch.randn(2, 4, 16, 8).bfloat16() for _ in range(3))
    allowed = padding_mask([16, 9], 16)
    with torch.no_grad():
        plain, _ = kernels.attention(Layer(), q, k, v, allowed, dropout=0.0)
    graded, _ = kernels.attention(Layer(), *(t.requires_grad_() for t in (q, k, v)), allowed,
                                  dropout=0.0)
    assert torch.equal(plain, graded.detach())


def test_install_on_a_model(tiny_encoder, tmp_path):
    from transformers import AutoModel

    plain = AutoModel.from_pretrained(tiny_encoder).eval()
    fast = AutoModel.from_pretrained(tiny_encoder)
    assert kernels.install(fast, torch.device("cuda")) == {}  # nothing changes off the CPU
    assert fast.config._attn_implementation == "sdpa"
    done = kernels.install(fast, torch.device("cpu"))
    n_dropout = sum(type(m) is torch.nn.Dropout for m in plain.modules())
    assert done == {"cpu_dropout_modules": n_dropout, "cpu_rms_norm_modules": 0,
                    "cpu_attention": True}
    assert fast.config._attn_implementation == kernels.ATTENTION
    ids = torch.randint(5, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, mask).last_hidden_state,
                                   plain(ids, mask).last_hidden_state, rtol=1e-5, atol=1e-6)
    # Saved weights and config load anywhere: the attention name is not written.
    fast.save_pretrained(tmp_path / "saved")
    with open(os.path.join(tmp_path, "saved", "config.json"), encoding="utf-8") as f:
        assert kernels.ATTENTION not in json.dumps(json.load(f))
    reloaded = AutoModel.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, mask).last_hidden_state,
                                   plain(ids, mask).last_hidden_state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixture, attention", [
    ("tiny_encoder", "model"), ("tiny_decoder", "model"), ("tiny_decoder_left", "model"),
    ("tiny_decoder", "bidirectional"), ("tiny_gemma3", "model"),
    ("tiny_gemma3", "bidirectional")])
@pytest.mark.parametrize("attention_dropout", [1e-17, 0.0])
def test_training_mode_path_through_real_models(fixture, attention, attention_dropout, request):
    """Attention dropout 1e-17 sends every layer down the dropout path while keeping every
    element (its scale 1/(1-p) is 1 in float64), 0 down the SDPA path (grouped-query heads
    passed through for Qwen2 and Gemma 3), and the decoders' RMSNorms are swapped: in training
    mode the model must then give what the plain one gives in eval — values and
    gradients — for BERT, Qwen2 and Gemma 3 (a sliding-window layer of 4 tokens, shorter than
    the texts), causal and bidirectional.

    In float64, where the two models' summation orders agree to ~1e-16 of the terms; the plain
    model's norms compute by hand in float64 (transformers' cast to float32 whatever comes in;
    their float32 numbers are compared in test_kernels_rms_norm.py). 1e-10 is far above that
    rounding and far below what a wrong mask, scale or norm does (1e-3 and more)."""
    from transformers import AutoModel

    from embedrag.model.loading import model_config

    path = request.getfixturevalue(fixture)
    plain = AutoModel.from_pretrained(path, config=model_config(path, attention=attention),
                                      dtype=torch.float64).eval()
    config = plain.config.to_dict()
    off = {k: (attention_dropout if "attention" in k else 0.0) for k in config if "dropout" in k
           and isinstance(config[k], float)}
    fast_config = model_config(path, attention=attention)
    for key, value in off.items():
        setattr(fast_config, key, value)
    float64_norms(plain)
    fast = AutoModel.from_pretrained(path, config=fast_config, dtype=torch.float64)
    done = kernels.install(fast, torch.device("cpu"))
    assert done["cpu_attention"]
    norms = sum(type(m).__name__ in kernels.RMS_NORMS for m in fast.modules())
    assert done["cpu_rms_norm_modules"] == norms and (norms > 0) == (fixture != "tiny_encoder")
    fast.train()
    ids = torch.randint(5, 100, (3, 12))
    mask = torch.ones_like(ids)
    if plain.config.model_type == "bert" or "left" not in fixture:
        mask[1, 7:] = 0
    else:
        mask[1, :5] = 0
    real = mask.bool()
    outputs = [m(ids, mask).last_hidden_state[real] for m in (fast, plain)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-10)
    weights = torch.randn_like(outputs[0])
    grads = [torch.autograd.grad((out * weights).sum(), list(m.parameters()), allow_unused=True)
             for out, m in zip(outputs, (fast, plain), strict=True)]
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_install_reaches_peft_lora_dropout(tiny_decoder):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = get_peft_model(AutoModel.from_pretrained(tiny_decoder),
                           LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"]))
    kernels.install(model, torch.device("cpu"))
    lora_drop = [m for n, m in model.named_modules() if "lora_dropout" in n and
                 isinstance(m, torch.nn.Dropout)]
    assert lora_drop and all(type(m) is kernels.Dropout for m in lora_drop)
    assert model.get_base_model().config._attn_implementation == kernels.ATTENTION


def test_cpu_kernels_off_leaves_the_model_its_own_operations(tiny_encoder):
    from embedrag.config import TrainConfig
    from embedrag.model.loading import ModelSettings, load_backbone

    def load(mode):
        cfg = TrainConfig(model_name_or_path=tiny_encoder, train_dataset="", output_dir="",
                          batch_size=2, finetune_type="full", cpu_kernels=mode)
        return load_backbone(ModelSettings.from_config(cfg), torch.device("cpu"))

    model, info = load("off")
    assert "cpu_attention" not in info and "cpu_dropout_modules" not in info
    assert model.config._attn_implementation == "sdpa"
    assert not any(type(m) is kernels.Dropout for m in model.modules())
    model, info = load("auto")
    assert info["cpu_attention"] and model.config._attn_implementation == kernels.ATTENTION
