"""GradCache equals plain backprop; the shipped Accelerate configurations load. Runs on several
processes are in test_launch.py."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.float64 import TOLERANCE, float64
from tests.helpers import ROOT, assert_same_weights, learnable_rows, run_train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _batch(tok, n=6, neg=1):
    from embedrag.data.dataset import Collator, TrainingSet
    from embedrag.data.rows import Example

    rows = learnable_rows(n)
    ex = [Example(r["query"], r["pos"], r["neg"], i) for i, r in enumerate(rows)]
    data = TrainingSet(ex, tok, neg_nums=neg, query_max_len=16, passage_max_len=24,
                       query_instruction="", append_eos=True, seed=0)
    return Collator(data, tok.pad_token_id, tok.padding_side)([data[i] for i in range(n)])


def _model(kind, path):
    from accelerate.utils import set_seed

    from embedrag.config import TrainConfig
    from embedrag.model.embedding import EmbeddingModel
    from embedrag.model.loading import ModelSettings, load_backbone

    set_seed(0)
    cfg = TrainConfig(model_name_or_path=path, train_dataset="", output_dir="", batch_size=6,
                      finetune_type=kind, lora_r=4, lora_alpha=8, lora_dropout=0.3)
    backbone, _ = load_backbone(ModelSettings.from_config(cfg), torch.device("cpu"))
    if kind == "lora":  # give lora_B weights so that every adapter weight gets a gradient
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    return EmbeddingModel(backbone, "last").train()


@pytest.fixture(scope="module")
def decoder_with_dropout(tmp_path_factory):
    """The tiny Qwen2 with attention dropout on, so that full fine-tuning has dropout too."""
    from transformers import AutoConfig, AutoModel

    from tests.conftest import build_tiny_decoder

    path = build_tiny_decoder(str(tmp_path_factory.mktemp("dropout_qwen2")))
    config = AutoConfig.from_pretrained(path)
    config.attention_dropout = 0.3
    AutoModel.from_pretrained(path, config=config).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_grad_cache_equals_plain_backprop_with_dropout(kind, chunk, decoder_with_dropout):
    from embedrag.losses import embedding_loss
    from embedrag.model.tokens import load_tokenizer
    from embedrag.train.step import grad_cache_step

    tok = load_tokenizer(decoder_with_dropout)
    batch = _batch(tok)
    with float64():  # the two sums of chunk gradients then agree to ~1e-16 of their terms
        model = _model(kind, decoder_with_dropout)

    def loss_of(q, p):
        return embedding_loss(q, p[batch["passage_index"]], batch["relevant_ids"],
                              batch["passage_ids"], 0.05)

    # Reference: the same chunks in the same order from the same RNG state, one graph.
    torch.manual_seed(123)
    reps = {"query": [], "passage": []}
    for kind_ in ("query", "passage"):
        ids, mask = batch[f"{kind_}_input_ids"], batch[f"{kind_}_attention_mask"]
        for s in range(0, ids.shape[0], chunk):
            reps[kind_].append(model(ids[s:s + chunk], mask[s:s + chunk]))
    plain = loss_of(torch.cat(reps["query"]), torch.cat(reps["passage"]))
    plain.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    torch.manual_seed(123)
    cached = grad_cache_step(model, batch, chunk, loss_of, lambda s: s.backward())
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert abs(cached.item() - plain.item()) < 1e-12
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(want) and len(got) >= len(trainable) - 2  # (unused rows aside)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-12, rtol=0, msg=name)
    # dropout really was on: another RNG state gives another loss
    torch.manual_seed(7)
    with torch.no_grad():
        other = loss_of(model(batch["query_input_ids"], batch["query_attention_mask"]),
                        model(batch["passage_input_ids"], batch["passage_attention_mask"]))
    assert abs(other.item() - plain.item()) > 1e-4


def _adapter(out):
    return load_file(str(out / "final" / "adapter_model.safetensors"))


def test_grad_cache_in_train_py_gives_the_same_adapter(tiny_decoder, learnable_data, tmp_path):
    """train.py with GradCache (chunks of 3) and without, in float64 (tests/float64.py): 2
    epochs of AdamW steps leave the same adapter to TOLERANCE and log the same losses."""
    args = ["--finetune_type", "lora", "--lora_dropout", "0", "--save_on_epoch_end", "0",
            "--gradient_accumulation_steps", "2"]
    with float64():
        assert run_train(tiny_decoder, learnable_data, tmp_path / "plain", *args)[0] == 0
        assert run_train(tiny_decoder, learnable_data, tmp_path / "gc", *args,
                         "--grad_cache_chunk_size", "3")[0] == 0
    plain, cached = _adapter(tmp_path / "plain"), _adapter(tmp_path / "gc")
    assert all(t.dtype == torch.float64 for t in plain.values())
    assert_same_weights(plain, cached, atol=TOLERANCE)
    losses = [json.loads((tmp_path / d / "detailed_training_logs.json").read_text())
              for d in ("plain", "gc")]
    assert len(losses[0]) == 6  # 24 rows / (4 x 2) = 3 steps an epoch, 2 epochs
    assert [r["loss"] for r in losses[0]] == pytest.approx([r["loss"] for r in losses[1]],
                                                           rel=0, abs=TOLERANCE)


def test_float64_runs_agree_across_cpu_code_paths(tiny_decoder, learnable_data, tmp_path):
    """What makes the equivalence tests portable, tested on one machine: the same float64
    training run on this CPU's vector kernels and on the plain, unvectorised ones (another
    summation order in nearly every operation, as another CPU would have) leaves the same
    adapter to TOLERANCE. GradCache in the second run, so both claims are crossed."""
    import subprocess
    import sys

    flags = ["--model_name_or_path", tiny_decoder, "--train_dataset", learnable_data,
             "--finetune_type", "lora", "--lora_dropout", "0", "--save_on_epoch_end", "0",
             "--batch_size", "4", "--max_steps", "8", "--lr", "5e-3", "--neg_nums", "2",
             "--temperature", "0.05", "--lora_r", "4", "--lora_alpha", "8", "--seed", "7"]
    plain = {**ENV, "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}
    for name, env, extra in (("native", ENV, []),
                             ("plain", plain, ["--grad_cache_chunk_size", "3"])):
        done = subprocess.run([sys.executable, "tests/float64.py", "train.py", *flags,
                               "--output_dir", str(tmp_path / name), *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(_adapter(tmp_path / "native"), _adapter(tmp_path / "plain"),
                        atol=TOLERANCE)
