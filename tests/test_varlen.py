"""The GPU's packed attention (embedrag/model/varlen.py), wired as on a CUDA machine, gives
the padded batch's embeddings and gradients. PyTorch's FlashAttention varlen kernel runs on
CUDA only; here a CPU reference of the same signature (each text against itself, in float64,
with the window and grouped heads as the kernel defines them) stands in for it, so what is
tested is everything around the kernel: the boundaries, positions, causality, sliding
windows and heads EmbedRAG hands it, and how the packed row comes back. The grouped SDPA
fallback (fp32, old GPUs, dropout) is tested as it is."""

from __future__ import annotations

import pytest
import torch

from embedrag.model import varlen
from embedrag.model.embedding import EmbeddingModel
from embedrag.model.loading import model_config
from tests.float64 import float64_norms
from tests.packed import (
    CALLS,
    TEXTS,
    batch,
    close,
    outputs_and_grads,
    padded_reference,
    reference_model,
    reference_varlen,
    stock,
)

MODELS = {  # fixture, pooling, --attention, the windows its layers must get
    "qwen2 causal": ("tiny_decoder", "last", "model", {(-1, 0)}),
    "qwen2 bidirectional": ("tiny_decoder", "last", "bidirectional", {(-1, -1)}),
    "gemma3 causal": ("tiny_gemma3", "last", "model", {(3, 0), (-1, 0)}),
    "gemma3 bidirectional": ("tiny_gemma3", "mean", "bidirectional", {(3, 3), (-1, -1)}),
    "bert": ("tiny_encoder", "mean", "model", {(-1, -1)}),
}


@pytest.fixture
def kernel(monkeypatch):
    """The reference in the kernel's place, and every query taken as the kernel's."""
    monkeypatch.setattr(varlen, "varlen_attn", reference_varlen)
    monkeypatch.setattr(varlen, "supports", lambda query: True)
    CALLS.clear()
    return CALLS


def _varlen_model(path, pooling, config):
    backbone = float64_norms(stock(path, **config))
    assert varlen.use(backbone)
    return EmbeddingModel(backbone, pooling).eval()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("path", ["kernel", "grouped"])
def test_packed_varlen_attention_gives_the_padded_batchs_embeddings_and_gradients(
        name, path, request, monkeypatch):
    fixture, pooling, attention, windows = MODELS[name]
    model_path = request.getfixturevalue(fixture)
    # transformers' own switches for bidirectional attention, as training sets them
    config = {"config": model_config(model_path, attention=attention)}
    calls = request.getfixturevalue("kernel") if path == "kernel" else []
    ids, mask = batch(model_path, pooling)
    lengths = mask.sum(1).tolist()
    model = _varlen_model(model_path, pooling, config)
    assert model.packs(mask, lengths)  # the probe passed: boundaries reach every layer
    target = torch.randn(len(TEXTS), model.backbone.config.hidden_size, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    calls.clear()
    out, grads = outputs_and_grads(lambda: model(ids, mask, lengths), params, target)
    reference = reference_model(model_path, **config).eval()
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    ref, ref_grads = outputs_and_grads(
        lambda: padded_reference(reference, ids, mask, pooling), ref_params, target)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a is None) == (b is None) and (a is None or close(a, b))
    if path == "kernel":  # every layer went through the kernel, with its own window
        layers = model.backbone.config.num_hidden_layers
        assert len(calls) == layers and {c["texts"] for c in calls} == {len(TEXTS)}
        assert {c["window"] for c in calls} == windows


def test_a_model_that_drops_the_boundaries_goes_back_to_sdpa(tiny_decoder, kernel,
                                                             monkeypatch):
    """Without boundaries the GPU attention would see one long text: the probe finds that
    out and the model embeds padded batches through SDPA and transformers' masks."""
    ids, mask = batch(tiny_decoder, "last")
    model = _varlen_model(tiny_decoder, "last", {})
    forward = model.backbone.forward

    def drops_them(*args, **kwargs):
        kwargs.pop("cu_seq_lens_q", None)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.backbone, "forward", drops_them)
    assert not model.packs(mask)
    assert model.backbone.config._attn_implementation == "sdpa"
    reference = reference_model(tiny_decoder).eval()
    with torch.no_grad():
        assert torch.allclose(model(ids, mask), padded_reference(reference, ids, mask, "last"),
                              atol=1e-12, rtol=0)


def test_the_gpu_attention_is_installed_on_cuda_devices_only(tiny_decoder, monkeypatch):
    backbone = stock(tiny_decoder)
    assert varlen.install(backbone, torch.device("cpu")) == {}
    assert backbone.config._attn_implementation == "sdpa"
    monkeypatch.setattr(varlen, "available", lambda: True)
    assert varlen.install(backbone, torch.device("cuda", 0)) == {"varlen_attention": True}
    assert backbone.config._attn_implementation == varlen.VARLEN


@pytest.mark.parametrize(("causal", "sliding", "expected"), [
    (True, None, (-1, 0)), (False, None, (-1, -1)), (True, 4, (3, 0)), (False, 4, (3, 3))])
def test_windows_follow_transformers_masks(causal, sliding, expected):
    """transformers' sliding layers: key k is seen by query j when j - k < window (causal),
    |j - k| < window (Gemma 3 bidirectional); flash-attention's bounds are inclusive."""
    assert varlen.window_of(causal, sliding) == expected
