"""FSDP2 (weights, gradients and optimizer state sharded per transformer block), on two CPU
processes over gloo with Accelerate's FSDP2 `prepare` (tests/fsdp2.py switches its state from
the test side). Runs compared across process counts are float64 (tests/float64.py)."""

from __future__ import annotations

import json
import sys

import pytest

from embedrag.model.loading import load_embedder
from tests.float64 import TOLERANCE
from tests.helpers import (
    ENV,
    FLOAT64,
    ROOT,
    TORCHRUN,
    assert_same_weights,
    distinct_passages_per_rank,
    duplicated_rows,
    flags,
    learnable_rows,
    logs,
    run,
    weights,
    write_jsonl,
)

FSDP2 = ["tests/float64.py", "tests/fsdp2.py", "train.py"]


def _summary(out):
    return json.loads((out / "training_summary_report.json").read_text())


# fsdp_cpu_ram_efficient_loading, as `accelerate launch` passes it: the main process alone
# reads the weights; the others build the network on the meta device (embedrag/model/meta.py).
MAIN_LOADS = {**ENV, "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}


@pytest.mark.parametrize("loading", ["every process", "main process"])
def test_full_fine_tuning_under_fsdp2_equals_one_process_with_the_double_batch(
        tiny_decoder, tmp_path, loading):
    """3 steps of 2 processes x batch 2, sharded, against 1 process x batch 4; cross-device
    negatives make the two batches the same. Each process holds half of every block. With
    the main process alone reading the weights, the other gets its shards, dtypes (float64
    here, which its meta-built network was not) and rotary buffers from it."""
    data = write_jsonl(tmp_path / "d.jsonl", learnable_rows(16))
    common = ["--finetune_type", "full", "--max_steps", "3", "--lr", "1e-3"]
    run([*TORCHRUN, *FSDP2, *flags(tiny_decoder, data, tmp_path / "two", 2, *common)],
        env=MAIN_LOADS if loading == "main process" else ENV)
    run([sys.executable, *FLOAT64, *flags(tiny_decoder, data, tmp_path / "one", 4, *common)])
    assert_same_weights(weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final"),
                        TOLERANCE)
    losses = [[r["loss"] for r in logs(tmp_path / d)] for d in ("one", "two")]
    assert len(losses[0]) == 3 and max(abs(a - b) for a, b in zip(*losses, strict=True)) < 1e-8
    sharding = _summary(tmp_path / "two")["sharding"]
    total, held = sharding["total_parameters"], sharding["per_process"]
    assert sharding["engine"] == "FSDP2" and len(held) == 2
    assert sum(h["parameters"] for h in held) == total  # every value on exactly one process
    assert all(abs(h["parameters"] - total / 2) <= 0.02 * total for h in held)
    # full fine-tuning: every parameter trains; AdamW keeps two moments of each, sharded alike
    assert [h["trainable"] for h in held] == [h["parameters"] for h in held]
    assert [h["optimizer_state"] for h in held] == [2 * h["parameters"] for h in held]
    read = [h["loaded_before_sharding"] for h in held]
    assert read == ([total, 0] if loading == "main process" else [total, total])


def test_minilm_under_fsdp2_equals_one_process_with_the_double_batch(
        minilm_without_dropout, manpages, tmp_path):
    """The real all-MiniLM-L6-v2 (BERT blocks), 3 steps, with in-training evaluation through
    the sharded model on both sides. The main process alone reads the weights: the other
    learns from it which parameters the embedding never reaches (the pooler, frozen) and
    gets BERT's position and token-type buffers."""
    train, held_out = manpages
    common = ["--finetune_type", "full", "--pooling", "mean", "--lr", "5e-5", "--epochs", "1",
              "--neg_nums", "1", "--temperature", "0.05", "--query_max_len", "32",
              "--passage_max_len", "48", "--eval_dataset", held_out, "--eval_batch_size", "8"]
    run([*TORCHRUN, *FSDP2, *flags(minilm_without_dropout, train, tmp_path / "two", 4,
                                   *common)], env=MAIN_LOADS)
    run([sys.executable, *FLOAT64, *flags(minilm_without_dropout, train, tmp_path / "one", 8,
                                          *common)])
    assert [r["step"] for r in logs(tmp_path / "two")] == [1, 2, 3]
    assert_same_weights(weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final"),
                        TOLERANCE)
    evals = [_summary(tmp_path / d)["eval"]["metrics"]["ndcg@10"] for d in ("one", "two")]
    assert abs(evals[0]["before"] - evals[1]["before"]) < 1e-9
    assert abs(evals[0]["after"] - evals[1]["after"]) < 1e-6
    sharding = _summary(tmp_path / "two")["sharding"]
    assert sharding["engine"] == "FSDP2"
    assert [h["loaded_before_sharding"] for h in sharding["per_process"]][1] == 0
    frozen = [_summary(tmp_path / d)["embedding"]["frozen_unused_parameters"]
              for d in ("one", "two")]
    assert frozen[0] == frozen[1] and any("pooler" in name for name in frozen[1])


def test_uneven_batches_under_fsdp2_grad_cache_equals_plain_backpropagation(tiny_decoder,
                                                                           tmp_path):
    """Deduplication leaves the two processes different numbers of passages (and GradCache
    chunks) at some steps; with weights sharded every backbone call is a collective, so a
    process making one call more would wait forever. Both runs finish, and agree."""
    rows = duplicated_rows()
    assert any(a != b for a, b in distinct_passages_per_rank(tiny_decoder, rows, seed=3,
                                                             batch=4, neg_nums=1))
    data = write_jsonl(tmp_path / "dup.jsonl", rows)
    common = ["--finetune_type", "full", "--lr", "1e-3", "--neg_nums", "1", "--epochs", "1"]
    run([*TORCHRUN, *FSDP2, *flags(tiny_decoder, data, tmp_path / "plain", 4, *common)])
    run([*TORCHRUN, *FSDP2, *flags(tiny_decoder, data, tmp_path / "gc", 4, *common,
                                   "--grad_cache_chunk_size", "1")])
    assert len(logs(tmp_path / "gc")) == 3
    assert_same_weights(weights(tmp_path / "plain" / "final"), weights(tmp_path / "gc" / "final"),
                        TOLERANCE)


def test_lora_in_bf16_reading_the_weights_on_the_main_process_alone_trains_the_same(
        tiny_decoder, tmp_path):
    """LoRA under FSDP2 with bf16 as the run's precision (Accelerate's policy computes and
    reduces in bf16; the fp32 adapters and the bf16 base are sharded together), dropout on:
    the run whose second process read no weights ends with the same adapter, to the bit, as
    the run where both read them, and logs the same losses."""
    data = write_jsonl(tmp_path / "d.jsonl", learnable_rows(16))
    common = ["--finetune_type", "lora", "--max_steps", "4", "--lr", "1e-3",
              "--mixed_precision", "bf16"]
    for name, env in (("every", ENV), ("main", MAIN_LOADS)):
        run([*TORCHRUN, "tests/fsdp2.py", "train.py",
             *flags(tiny_decoder, data, tmp_path / name, 2, *common)], env=env)
    assert_same_weights(weights(tmp_path / "every" / "final"),
                        weights(tmp_path / "main" / "final"), 0)
    assert [r["loss"] for r in logs(tmp_path / "every")] == [
        r["loss"] for r in logs(tmp_path / "main")]
    sharding = [_summary(tmp_path / name)["sharding"] for name in ("every", "main")]
    total = sharding[1]["total_parameters"]
    assert [h["loaded_before_sharding"] for h in sharding[1]["per_process"]] == [total, 0]
    assert [h["loaded_before_sharding"] for h in sharding[0]["per_process"]] == [total, total]
    assert sharding[1]["mixed_precision"] == {"param_dtype": "bfloat16",
                                              "reduce_dtype": "bfloat16"}


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_lora_and_qlora_under_fsdp2_train_and_their_adapters_reload_and_merge(
        tiny_decoder, learnable_data, tmp_path, kind):
    """LoRA's fp32 adapters beside the frozen base (FSDP1 could not flatten them together);
    QLoRA's 4-bit codes stored as floats, so they are sharded too (every value on one process);
    in-training evaluation through the sharded model; final/ gathered into the usual adapter
    folder, which loads, embeds, and merges. QLoRA asked to read on the main process alone
    says that every process reads its 4-bit base (Accelerate broadcasts no quantized weights)."""
    out = tmp_path / kind
    done = run([*TORCHRUN, "tests/fsdp2.py", "train.py",
                *flags(tiny_decoder, learnable_data, out, 2, "--finetune_type", kind,
                       "--epochs", "2", "--lr", "5e-3", "--eval_dataset", learnable_data)],
               env=MAIN_LOADS if kind == "qlora" else ENV)
    summary = _summary(out)
    sharding = summary["sharding"]
    assert sharding["engine"] == "FSDP2"
    held = [h["parameters"] for h in sharding["per_process"]]
    assert sum(held) == sharding["total_parameters"]  # every value on one process only
    assert all(h < sharding["total_parameters"] for h in held)
    read = [h["loaded_before_sharding"] for h in sharding["per_process"]]
    assert read == [sharding["total_parameters"]] * 2
    assert ("QLoRA reads its 4-bit base on every process" in done.stdout) == (kind == "qlora")
    metrics = summary["eval"]["metrics"]
    assert metrics["ndcg@10"]["after"] > metrics["ndcg@10"]["before"]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    model, tokenizer, settings = load_embedder(str(out / "final"))
    vectors = model.encode(tokenizer, ["apple banana"], max_len=settings.query_max_len,
                           append_eos=settings.append_eos)
    assert vectors.shape[0] == 1 and abs(float(vectors.norm()) - 1) < 1e-5
    # merge.py folds it into its base and verifies the merged model embeds as the adapter does
    merged = tmp_path / "merged"
    done = run([sys.executable, "merge.py", "--base_model_path", tiny_decoder,
                "--lora_adapter_path", str(out / "final"), "--output_path", str(merged),
                "--eval_dataset", learnable_data])
    assert (merged / "model.safetensors").is_file(), done.stdout[-2000:]


def test_a_resume_from_sharded_step_checkpoints_equals_the_uninterrupted_run(
        tiny_decoder, tmp_path):
    """Full fine-tuning under FSDP2, 2 epochs of 4 steps, a step checkpoint every 3 steps
    (each process writes its own shards of weights and AdamW's moments); a fresh run resumed
    from the one in epoch 2 ends with the same weights and logs the same losses."""
    data = write_jsonl(tmp_path / "d.jsonl", learnable_rows(16))
    common = ["--finetune_type", "full", "--epochs", "2", "--lr", "1e-3", "--save_steps", "3"]
    whole = tmp_path / "whole"
    run([*TORCHRUN, *FSDP2, *flags(tiny_decoder, data, whole, 2, *common)])
    checkpoint = whole / "checkpoint-step-6"
    assert (checkpoint / "sharded").is_dir() and (checkpoint / "model.safetensors").is_file()
    state = json.loads((checkpoint / "trainer_state.json").read_text())["state"]
    assert (state["epoch"], state["micro"]) == (2, 2)
    resumed = tmp_path / "resumed"
    run([*TORCHRUN, *FSDP2, *flags(tiny_decoder, data, resumed, 2, *common,
                                   "--resume_from_checkpoint", str(checkpoint))])
    assert_same_weights(weights(whole / "final"), weights(resumed / "final"), 0)
    assert [r["step"] for r in logs(resumed)] == [7, 8]  # a new folder: the steps it ran
    assert [r["loss"] for r in logs(resumed)] == [r["loss"] for r in logs(whole)[6:]]


def test_a_sigkill_mid_epoch_two_then_resume_latest_equals_the_uninterrupted_run(
        tiny_decoder, tmp_path):
    """Both processes killed (SIGKILL, the whole launcher group) once epoch 2 has a step
    checkpoint; `--resume_from_checkpoint latest` in the same folder finishes the run."""
    import os
    import signal
    import subprocess
    import time

    data = write_jsonl(tmp_path / "d.jsonl", learnable_rows(16))
    common = ["--finetune_type", "full", "--epochs", "2", "--lr", "1e-3", "--save_steps", "1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run([*TORCHRUN, *FSDP2, *flags(tiny_decoder, data, whole, 2, *common)])
    proc = subprocess.Popen(
        [*TORCHRUN, "tests/float64.py", "tests/fsdp2.py", "tests/faults.py",
         *flags(tiny_decoder, data, cut, 2, *common)], cwd=ROOT, start_new_session=True,
        env={**ENV, "EMBEDRAG_FAULTS": json.dumps({"sleep_per_step": 0.5})},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (cut / "checkpoint-step-5" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "ended before the kill"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "final").exists()
    run([*TORCHRUN, *FSDP2, *flags(tiny_decoder, data, cut, 2, *common,
                                   "--resume_from_checkpoint", "latest")])
    assert_same_weights(weights(whole / "final"), weights(cut / "final"), TOLERANCE)
    assert [r["loss"] for r in logs(cut)] == [r["loss"] for r in logs(whole)]
