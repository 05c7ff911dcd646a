"""Pooling, EOS handling, LoRA target discovery and encode()."""

import torch

from embedrag.model.embedding import (
    EmbeddingModel,
    cls_pool,
    find_lora_targets,
    last_token_pool,
    mean_pool,
)
from embedrag.model.tokens import load_tokenizer, resolve_append_eos
from tests.float64 import float64_norms


def _hidden_and_masks(n=4, length=6, h=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, length, h, generator=gen)
    lengths = [6, 3, 1, 4]
    right = torch.tensor([[1] * k + [0] * (length - k) for k in lengths])
    left = torch.tensor([[0] * (length - k) + [1] * k for k in lengths])
    return hidden, lengths, right, left


def test_last_token_pool_under_right_and_left_padding():
    hidden, lengths, right, left = _hidden_and_masks()
    want_right = torch.stack([hidden[i, k - 1] for i, k in enumerate(lengths)])
    assert torch.equal(last_token_pool(hidden, right), want_right)
    assert torch.equal(last_token_pool(hidden, left), hidden[:, -1])
    mixed = torch.stack([right[0], left[1], right[2], left[3]])
    want = torch.stack([hidden[0, 5], hidden[1, 5], hidden[2, 0], hidden[3, 5]])
    assert torch.equal(last_token_pool(hidden, mixed), want)


def test_mean_and_cls_pool_by_hand():
    hidden, lengths, right, left = _hidden_and_masks()
    for i, k in enumerate(lengths):
        assert torch.allclose(mean_pool(hidden, right)[i], hidden[i, :k].mean(0))
        assert torch.allclose(mean_pool(hidden, left)[i], hidden[i, 6 - k:].mean(0))
        assert torch.equal(cls_pool(hidden, left)[i], hidden[i, 6 - k])
    assert torch.equal(cls_pool(hidden, right), hidden[:, 0])


def test_append_eos_resolution(tiny_decoder, tiny_encoder):
    dec = load_tokenizer(tiny_decoder)
    assert dec.pad_token == dec.eos_token  # the fixture has no pad token of its own
    assert resolve_append_eos("auto", "last", dec) is True
    assert resolve_append_eos("auto", "mean", dec) is False
    assert resolve_append_eos("no", "last", dec) is False
    enc = load_tokenizer(tiny_encoder)
    assert resolve_append_eos("auto", "last", enc) is False  # no EOS token at all


def test_append_eos_not_doubled_when_tokenizer_adds_it(tiny_decoder, tmp_path):
    from tokenizers import processors

    tok = load_tokenizer(tiny_decoder)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", tok.eos_token_id)])
    assert tok("apple")["input_ids"][-1] == tok.eos_token_id
    assert resolve_append_eos("auto", "last", tok) is False
    assert resolve_append_eos("yes", "last", tok) is False


def test_lora_targets_found_from_the_model(tiny_decoder, tiny_encoder):
    from transformers import AutoModel

    targets, excluded = find_lora_targets(AutoModel.from_pretrained(tiny_decoder))
    assert targets == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                              "down_proj"]) and excluded == []
    targets, excluded = find_lora_targets(AutoModel.from_pretrained(tiny_encoder))
    assert targets == ["dense", "key", "query", "value"] and excluded == ["pooler.dense"]


def test_encode_matches_unbatched_forward_in_input_order(tiny_decoder_left):
    from transformers import AutoModel

    tok = load_tokenizer(tiny_decoder_left)
    assert tok.padding_side == "left"
    model = EmbeddingModel(float64_norms(AutoModel.from_pretrained(
        tiny_decoder_left, dtype=torch.float64)), "last").eval()
    texts = ["apple", "banana cherry delta eagle", "tiger", "the river near the zebra"]
    batched = model.encode(tok, texts, max_len=32, append_eos=True, batch_size=3)
    for i, text in enumerate(texts):
        ids = torch.tensor([tok(text)["input_ids"] + [tok.eos_token_id]])
        one = model(ids, torch.ones_like(ids))[0]
        assert batched.dtype == torch.float64
        # float64 rounding; but transformers computes RoPE's cos/sin in float32 whatever the
        # model's dtype, and a left-padded text sits at other absolute positions in a batch:
        # its rotations round differently, by up to 2**-24 of each entry
        assert torch.allclose(batched[i], one, atol=2**-24, rtol=0)
    assert torch.allclose(batched.norm(dim=1), torch.ones(4, dtype=torch.float64), atol=1e-12)
