"""Tiny random models and data, built once per test session: fast, offline, real code paths."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ("apple banana cherry delta eagle falcon garnet harbor island jungle kettle lemon "
         "marble nickel orange pepper quartz river saddle tiger umber violet walnut xenon "
         "yellow zebra").split()


def learnable_rows(n: int = 24, seed: int = 0) -> list[dict]:
    """Rows whose positive shares the query's words: a random model can learn to retrieve it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 5) % len(WORDS)]
        rows.append({"query": f"{a} {b}", "pos": [f"the {a} near the {b} {rng.choice(WORDS)}"]})
    for i, row in enumerate(rows):
        others = [r["pos"][0] for j, r in enumerate(rows) if j != i]
        row["neg"] = rng.sample(others, min(3, len(others)))
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def build_tiny_decoder(path: str, padding_side: str = "right") -> str:
    """A 2-layer Qwen2 (hidden 64: bitsandbytes' CPU 4-bit kernels need >= 64 inputs) with a
    byte-level BPE tokenizer trained here; no pad token, EOS not added, like gte-Qwen2's."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(WORDS)] * 5 + [r["pos"][0] for r in learnable_rows()]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   unk_token="<unk>", padding_side=padding_side)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(fast), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, attention_dropout=0.0)
    Qwen2Model(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def build_tiny_encoder(path: str) -> str:
    """A 2-layer BERT with a WordPiece tokenizer trained here ([CLS] ... [SEP], pad token set)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([" ".join(WORDS)] * 5 + ["the near"],
                            trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def assert_same_weights(a, b, atol=1e-5):
    """Equal to float tolerance. AdamW divides by sqrt(v): on a coordinate whose gradient is
    ~0, rounding noise in the 7th digit (other batch shapes, other summation order) moves that
    coordinate's update, so a lone element may stray by more than the rest; rtol covers it."""
    import torch

    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=1e-4, msg=k)


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> str:
    return build_tiny_decoder(str(tmp_path_factory.mktemp("tiny_qwen2")))


@pytest.fixture(scope="session")
def tiny_decoder_left(tmp_path_factory) -> str:
    return build_tiny_decoder(str(tmp_path_factory.mktemp("tiny_qwen2_left")), "left")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    return build_tiny_encoder(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="session")
def learnable_data(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", learnable_rows())
