"""Length buckets are the cheapest grouping and give the padded batch's results. Packed
batches (EmbeddingModel.packs, kernels._packed): the texts of a batch go through the
transformer in one row with no padding, and every embedding and every gradient is the one
stock transformers computes for the padded batch. The models run in float64 (embeddings are
normalised in float64 too), so the two orders of summation agree to ~1e-16 of their terms, and
a wrong attention is off by 1e-2 and more."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from embedrag.cpu import kernels, packing
from embedrag.cpu.packing import length_buckets
from embedrag.data.tokens import pad, tokenize
from embedrag.model.embedding import EmbeddingModel
from embedrag.model.tokens import load_tokenizer
from tests.packed import (
    TEXTS,
    batch,
    close,
    outputs_and_grads,
    padded_reference,
    reference_model,
    stock,
)


def packed_model(path: str, pooling: str, **config) -> EmbeddingModel:
    backbone = stock(path, **config)
    assert kernels.install(backbone, torch.device("cpu"))["cpu_attention"]
    return EmbeddingModel(backbone, pooling).eval()


def _partitions(items):
    """Every set partition of `items` (the brute-force reference for length_buckets)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1:]]
        yield [[first], *part]


def test_length_buckets_are_the_cheapest_grouping_and_cover_every_real_token():

    def computed_positions(mask):
        return sum(len(b.rows) * (b.window[1] - b.window[0]) for b in length_buckets(mask))

    gen = torch.Generator().manual_seed(3)
    for trial in range(30):
        n, width = 7, 40
        lengths = torch.randint(1, width + 1, (n,), generator=gen).tolist()
        overhead = [0, 5, 30, 1000][trial % 4]
        side = "left" if trial % 2 else "right"
        mask = torch.tensor([[0] * (width - k) + [1] * k if side == "left"
                             else [1] * k + [0] * (width - k) for k in lengths])
        buckets = length_buckets(mask, overhead)
        assert sorted(i for b in buckets for i in b.rows) == list(range(n))
        for b in buckets:  # the window holds every real token of its rows
            lo, hi = b.window
            assert mask[b.rows, lo:hi].sum() == sum(lengths[i] for i in b.rows)
        cost = sum(len(b.rows) * (b.window[1] - b.window[0]) + overhead for b in buckets)
        best = min(sum(len(g) * max(lengths[i] for i in g) + overhead for g in part)
                   for part in _partitions(list(range(n))))
        assert cost == best
    mask = torch.tensor([[1] * 100, [1] * 99 + [0], [1] * 2 + [0] * 98, [1] + [0] * 99])
    assert computed_positions(mask) == 2 * 100 + 2 * 2  # 400 padded, or 204 + one overhead
    assert computed_positions(mask[:, :10]) == 4 * 10  # saving 16 is not worth a call


def test_bucketed_forward_has_the_padded_batchs_embeddings_and_gradients(
        tiny_encoder, tiny_decoder_left, monkeypatch):
    monkeypatch.setitem(packing.BUCKET_OVERHEAD, "cpu", 0)  # a bucket per distinct length
    texts = ["apple", "banana cherry delta eagle", "tiger lion", "the river near the zebra x y",
             "z", "apple banana"]
    for path, pooling in ((tiny_encoder, "mean"), (tiny_decoder_left, "last")):
        tok = load_tokenizer(path)
        ids, mask = pad(tokenize(tok, texts, 32, pooling == "last"), tok.pad_token_id,
                        tok.padding_side)
        assert len(packing.length_buckets(mask)) > 2
        model = EmbeddingModel(reference_model(path), pooling).eval()
        target = torch.randn(len(texts), model.backbone.config.hidden_size,
                             generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        grads = []
        for bucketed in (True, False):
            model.zero_grad()
            out = (model(ids, mask) if bucketed
                   else padded_reference(model.backbone, ids, mask, pooling))
            (out * target).sum().backward()
            grads.append((out.detach(), [p.grad.clone() for p in model.parameters()
                                         if p.grad is not None]))
        (bucketed, g1), (padded, g2) = grads
        # float64 rounding; but transformers computes RoPE's cos/sin in float32 whatever the
        # model's dtype, and a left-padded text in a shorter bucket sits at other absolute
        # positions: its rotations round differently, by up to 2**-24 of each entry.
        tolerance = 2**-24 if tok.padding_side == "left" else 1e-12
        assert torch.allclose(bucketed, padded, atol=tolerance, rtol=0)
        assert len(g1) == len(g2) > 0
        for a, b in zip(g1, g2, strict=True):
            assert torch.allclose(a, b, atol=tolerance, rtol=0)


CASES = [("tiny_encoder", "mean", {}), ("tiny_decoder", "last", {}),
         ("tiny_decoder_left", "last", {}),
         # a sliding window of 4 tokens on one layer, shorter than most texts here
         ("tiny_gemma3", "last", {}),
         ("tiny_gemma3", "mean", {"use_bidirectional_attention": True})]


@pytest.mark.parametrize(("fixture", "pooling", "config"), CASES)
def test_packed_batch_has_the_padded_batchs_embeddings_and_gradients(fixture, pooling, config,
                                                                     request):
    path = request.getfixturevalue(fixture)
    ids, mask = batch(path, pooling)
    model = packed_model(path, pooling, **config)
    reference = reference_model(path, **config).eval()
    assert model.packs(mask)
    target = torch.randn(len(TEXTS), model.backbone.config.hidden_size, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))
    before = dict(kernels.PACKED_CALLS)
    out, grads = outputs_and_grads(lambda: model(ids, mask), list(model.parameters()), target)
    layers = model.backbone.config.num_hidden_layers
    assert kernels.PACKED_CALLS["segments"] - before["segments"] == layers  # one call a layer
    ref, ref_grads = outputs_and_grads(
        lambda: padded_reference(reference, ids, mask, pooling, True),
        list(reference.parameters()), target)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    assert sum(g is not None for g in grads) > 10
    for a, b in zip(grads, ref_grads, strict=True):  # BERT's pooler gets none in either
        assert (a is None and b is None) or close(a, b)
    assert model.computed_positions(mask) == int(mask.sum()) < mask.numel()


def test_packed_attention_is_each_texts_own_attention_by_hand():
    """kernels.attention given texts' boundaries: float64 softmax attention per text, causal
    and not, with grouped key/value heads and a transformers-style block mask."""

    class Layer(torch.nn.Module):
        def __init__(self, causal):
            super().__init__()
            self.is_causal = causal

    gen = torch.Generator().manual_seed(1)
    lengths = [5, 1, 9, 3, 9, 2]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total, heads, kv_heads, d = sum(lengths), 4, 2, 8
    q = torch.randn(1, heads, total, d, dtype=torch.float64, generator=gen)
    k = torch.randn(1, kv_heads, total, d, dtype=torch.float64, generator=gen)
    v = torch.randn(1, kv_heads, total, d, dtype=torch.float64, generator=gen)
    text = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # (T,)
    pos = torch.arange(total) - bounds[:-1].long().repeat_interleave(torch.tensor(lengths))
    same = text[:, None] == text[None, :]
    window = (pos[:, None] - pos[None, :]) < 3                        # a sliding window of 3
    for causal, mask in ((False, None), (True, None),
                         (True, (same & (pos[:, None] >= pos[None, :]) & window)[None, None])):
        out, _ = kernels.attention(Layer(causal), q, k, v, mask, scaling=0.3,
                                   cu_seq_lens_q=bounds, cu_seq_lens_k=bounds)
        allowed = same.clone() if mask is None else mask[0, 0]
        if causal:
            allowed &= pos[:, None] >= pos[None, :]
        kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = (q @ kk.transpose(2, 3)) * 0.3
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        expected = (probs @ vv).transpose(1, 2)                       # (1, T, H, d)
        assert out.shape == (1, total, heads, d)
        assert torch.allclose(out, expected, atol=1e-12, rtol=0)


def test_rows_beyond_pack_tokens_go_in_several_packed_calls(tiny_decoder, monkeypatch):
    ids, mask = batch(tiny_decoder, "last")
    model = packed_model(tiny_decoder, "last")
    whole = model(ids, mask)
    monkeypatch.setattr(packing, "PACK_TOKENS", 12)
    calls = []
    real = model._embed_row
    monkeypatch.setattr(model, "_embed_row",
                        lambda i, m, n: calls.append((len(m), int(m.sum()))) or real(i, m, n))
    assert torch.allclose(model(ids, mask), whole, atol=1e-12, rtol=0)
    assert sum(rows for rows, _ in calls) == len(TEXTS) and len(calls) > 2
    assert sum(tokens for _, tokens in calls) == int(mask.sum())
    assert all(tokens <= 12 or rows == 1 for rows, tokens in calls)


def test_a_model_that_does_not_pass_the_boundaries_on_is_not_packed(tiny_encoder, monkeypatch):
    """BERT attends to the whole row unless the boundaries reach its attention; a model that
    drops them (shipped code, say) is found out by the probe and embeds in length buckets."""
    ids, mask = batch(tiny_encoder, "mean")
    model = packed_model(tiny_encoder, "mean")
    forward = model.backbone.forward

    def drops_them(*args, **kwargs):
        kwargs.pop("cu_seq_lens_q", None)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.backbone, "forward", drops_them)
    assert not model.packs(mask)
    reference = reference_model(tiny_encoder).eval()
    with torch.no_grad():
        assert torch.allclose(model(ids, mask), padded_reference(reference, ids, mask, "mean"),
                              atol=1e-12, rtol=0)
    assert model.computed_positions(mask) > int(mask.sum())  # buckets carry some padding


@pytest.mark.parametrize("training", [True, False])
def test_the_probe_leaves_the_random_stream_and_the_mode_alone(tiny_encoder, training):
    """BERT has dropout: a probe run in training mode would draw from torch's generator."""
    ids, mask = batch(tiny_encoder, "mean")
    model = packed_model(tiny_encoder, "mean").train(training)
    torch.manual_seed(5)
    assert model.packs(mask)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))
    assert all(m.training is training for m in model.modules())


def test_a_backbone_the_probe_cannot_read_keeps_length_buckets(tiny_decoder, monkeypatch):
    ids, mask = batch(tiny_decoder, "last")
    model = packed_model(tiny_decoder, "last")
    monkeypatch.setattr(model.backbone, "get_input_embeddings", lambda: None)  # shipped code
    assert not model.packs(mask)
    assert model(ids, mask).shape == (len(TEXTS), 64)


def test_packing_only_with_embedrags_cpu_attention(tiny_decoder):
    ids, mask = batch(tiny_decoder, "last")
    model = EmbeddingModel(stock(tiny_decoder), "last")          # transformers' own SDPA
    assert not model.packs(mask)
    assert not packed_model(tiny_decoder, "last").packs(mask[:, :0])  # nothing to embed


def test_packed_training_step_with_checkpointing_and_lora(tiny_decoder):
    """Activation checkpointing recomputes each layer in the backward pass: the boundaries
    must reach the attention again there. LoRA (PEFT) passes them through its own forward."""
    from peft import LoraConfig, get_peft_model

    ids, mask = batch(tiny_decoder, "last")
    target = torch.randn(len(TEXTS), 64, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2))
    results = []
    for checkpointing in (False, True):
        backbone = stock(tiny_decoder)
        if checkpointing:
            backbone.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            backbone.enable_input_require_grads()
        torch.manual_seed(0)
        backbone = get_peft_model(backbone, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
        kernels.install(backbone, torch.device("cpu"))
        model = EmbeddingModel(backbone, "last").train()
        assert model.packs(mask)
        params = [p for p in model.parameters() if p.requires_grad]
        results.append(outputs_and_grads(lambda m=model: m(ids, mask), params, target))
    reference = reference_model(tiny_decoder)
    torch.manual_seed(0)
    reference = get_peft_model(reference, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False)).train()
    params = [p for p in reference.parameters() if p.requires_grad]
    ref, ref_grads = outputs_and_grads(
        lambda: padded_reference(reference, ids, mask, "last", True), params, target)
    for out, grads in results:
        assert torch.allclose(out, ref, atol=1e-12, rtol=0)
        for a, b in zip(grads, ref_grads, strict=True):
            assert close(a, b)


@pytest.mark.parametrize("caller_autocast", [True, False])
def test_a_bf16_lora_model_is_probed_under_autocast_as_it_trains(tiny_decoder, caller_autocast):
    """LoRA on a bf16 base with PEFT's input casts off (as train.py trains it) runs only under
    autocast: the probe must keep the caller's autocast, and bring its own when there is
    none, or it fails and the model silently falls back to length buckets."""
    from peft import LoraConfig, get_peft_model

    from embedrag.model.loading import lora_input_casts

    ids, mask = batch(tiny_decoder, "last")
    backbone = AutoModel.from_pretrained(tiny_decoder, attn_implementation="sdpa",
                                         dtype=torch.bfloat16)
    backbone = get_peft_model(backbone, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    kernels.install(backbone, torch.device("cpu"))
    lora_input_casts(backbone, enabled=False)
    model = EmbeddingModel(backbone, "last").train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=caller_autocast):
        assert model.packs(mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(ids, mask).shape == (len(TEXTS), 64)


def test_train_py_packs_its_batches(cli_run):
    """train.py as users run it (LoRA, bidirectional attention, activation checkpointing,
    in-training evaluation) computes no padding: the probe passed inside the real loop."""
    import json

    out, _ = cli_run
    report = json.loads((out / "training_summary_report.json").read_text())
    assert report["totals"]["padding_share"] == 0.0
    config = json.loads((out / "final" / "training_config.json").read_text())
    assert config["cpu_attention"] is True
