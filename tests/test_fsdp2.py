"""FSDP2 (weights, gradients and optimizer state sharded per transformer block), on two CPU
processes over gloo with Accelerate's FSDP2 `prepare` (tests/fsdp2.py switches its state from
the test side). Runs compared across process counts are float64 (tests/float64.py)."""

from __future__ import annotations

import json
import sys

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
    minilm_flags,
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


def test_full_fine_tuning_under_fsdp2_equals_one_process_with_the_double_batch(
        tiny_decoder, tmp_path):
    """3 steps of 2 processes x batch 2, sharded, against 1 process x batch 4; cross-device
    negatives make the two batches the same. Each process holds half of every block. The
    main process alone reads the weights: the other gets its shards, dtypes (float64 here,
    which its meta-built network was not) and rotary buffers from it."""
    data = write_jsonl(tmp_path / "d.jsonl", learnable_rows(16))
    common = ["--finetune_type", "full", "--max_steps", "3", "--lr", "1e-3"]
    run([*TORCHRUN, *FSDP2, *flags(tiny_decoder, data, tmp_path / "two", 2, *common)],
        env=MAIN_LOADS)
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
    assert [h["loaded_before_sharding"] for h in held] == [total, 0]


def test_minilm_under_fsdp2_equals_one_process_with_the_double_batch(
        minilm_without_dropout, manpages, minilm_one_process, tmp_path):
    """The real all-MiniLM-L6-v2 (BERT blocks), 3 steps, with in-training evaluation through
    the sharded model on both sides. The main process alone reads the weights: the other
    learns from it which parameters the embedding never reaches (the pooler, frozen) and
    gets BERT's position and token-type buffers."""
    train, held_out = manpages
    one, two = minilm_one_process[0], tmp_path / "two"
    run([*TORCHRUN, *FSDP2, *flags(minilm_without_dropout, train, two, 4,
                                   *minilm_flags(held_out))], env=MAIN_LOADS)
    assert [r["step"] for r in logs(two)] == [1, 2, 3]
    assert_same_weights(weights(one / "final"), weights(two / "final"), TOLERANCE)
    evals = [_summary(d)["eval"]["metrics"]["ndcg@10"] for d in (one, two)]
    assert abs(evals[0]["before"] - evals[1]["before"]) < 1e-9
    assert abs(evals[0]["after"] - evals[1]["after"]) < 1e-6
    sharding = _summary(two)["sharding"]
    assert sharding["engine"] == "FSDP2"
    assert _held(sharding, "loaded_before_sharding")[1] == 0
    frozen = [_summary(d)["embedding"]["frozen_unused_parameters"] for d in (one, two)]
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


def _reloads_embeds_and_merges(final, base, data, merged) -> None:
    """final/ is the usual adapter folder: it loads, embeds, and merge.py folds it into its
    base (verifying that the merged model embeds as the adapter does)."""
    assert (final / "adapter_model.safetensors").is_file()
    model, tokenizer, settings = load_embedder(str(final))
    vectors = model.encode(tokenizer, ["apple banana"], max_len=settings.query_max_len,
                           append_eos=settings.append_eos)
    assert vectors.shape[0] == 1 and abs(float(vectors.norm()) - 1) < 1e-5
    done = run([sys.executable, "merge.py", "--base_model_path", base,
                "--lora_adapter_path", str(final), "--output_path", str(merged),
                "--eval_dataset", data])
    assert (merged / "model.safetensors").is_file(), done.stdout[-2000:]


def _held(sharding, key):
    return [h[key] for h in sharding["per_process"]]


def test_lora_in_bf16_under_fsdp2_trains_reloads_merges_and_loads_on_one_process_alike(
        tiny_decoder, learnable_data, tmp_path):
    """LoRA under FSDP2 with bf16 as the run's precision (Accelerate's policy computes and
    reduces in bf16; the fp32 adapters and the bf16 base are sharded together, which FSDP1
    could not flatten), dropout on, in-training evaluation through the sharded model. The run
    whose second process read no weights ends with the same adapter, to the bit, as the run
    where both read them, and logs the same losses; its final/ reloads and merges."""
    common = ["--finetune_type", "lora", "--epochs", "2", "--lr", "5e-3",
              "--mixed_precision", "bf16", "--eval_dataset", learnable_data]
    for name, env in (("every", ENV), ("main", MAIN_LOADS)):
        run([*TORCHRUN, "tests/fsdp2.py", "train.py",
             *flags(tiny_decoder, learnable_data, tmp_path / name, 2, *common)], env=env)
    assert_same_weights(weights(tmp_path / "every" / "final"),
                        weights(tmp_path / "main" / "final"), 0)
    assert [r["loss"] for r in logs(tmp_path / "every")] == [
        r["loss"] for r in logs(tmp_path / "main")]
    summary = _summary(tmp_path / "main")
    sharding, total = summary["sharding"], summary["sharding"]["total_parameters"]
    assert sum(_held(sharding, "parameters")) == total  # every value on one process only
    assert _held(sharding, "loaded_before_sharding") == [total, 0]
    assert _held(_summary(tmp_path / "every")["sharding"], "loaded_before_sharding") == [
        total, total]
    assert sharding["mixed_precision"] == {"param_dtype": "bfloat16",
                                           "reduce_dtype": "bfloat16"}
    metrics = summary["eval"]["metrics"]
    assert metrics["ndcg@10"]["after"] > metrics["ndcg@10"]["before"]
    _reloads_embeds_and_merges(tmp_path / "main" / "final", tiny_decoder, learnable_data,
                               tmp_path / "merged")


def test_qlora_under_fsdp2_trains_and_its_adapter_reloads_and_merges(
        tiny_decoder, learnable_data, tmp_path):
    """QLoRA's 4-bit codes stored as floats under FSDP2, so they are sharded too (every value
    on one process). Asked to read on the main process alone, it says that every process reads
    its 4-bit base (Accelerate broadcasts no quantized weights)."""
    out = tmp_path / "qlora"
    done = run([*TORCHRUN, "tests/fsdp2.py", "train.py",
                *flags(tiny_decoder, learnable_data, out, 2, "--finetune_type", "qlora",
                       "--epochs", "2", "--lr", "5e-3", "--eval_dataset", learnable_data)],
               env=MAIN_LOADS)
    assert "QLoRA reads its 4-bit base on every process" in done.stdout
    summary = _summary(out)
    sharding, total = summary["sharding"], summary["sharding"]["total_parameters"]
    assert sharding["engine"] == "FSDP2"
    assert sum(_held(sharding, "parameters")) == total
    assert all(h < total for h in _held(sharding, "parameters"))
    assert _held(sharding, "loaded_before_sharding") == [total, total]
    metrics = summary["eval"]["metrics"]
    assert metrics["ndcg@10"]["after"] > metrics["ndcg@10"]["before"]
    _reloads_embeds_and_merges(out / "final", tiny_decoder, learnable_data, tmp_path / "merged")


def test_resumes_from_sharded_step_checkpoints_equal_the_uninterrupted_run(tiny_decoder,
                                                                          tmp_path):
    """Full fine-tuning under FSDP2, 2 epochs of 4 steps, a step checkpoint every step (each
    process writes its own shards of weights and AdamW's moments). A fresh run resumed from
    the checkpoint of step 6 (in epoch 2) ends with the same weights and logs the same
    losses; so does a run whose processes were both killed (SIGKILL, the whole launcher
    group) once epoch 2 had a checkpoint, continued with `--resume_from_checkpoint latest`."""
    import os
    import signal
    import subprocess
    import time

    data = write_jsonl(tmp_path / "d.jsonl", learnable_rows(16))
    common = ["--finetune_type", "full", "--epochs", "2", "--lr", "1e-3", "--save_steps", "1"]
    whole, resumed, cut = tmp_path / "whole", tmp_path / "resumed", tmp_path / "cut"
    run([*TORCHRUN, *FSDP2, *flags(tiny_decoder, data, whole, 2, *common)])
    checkpoint = whole / "checkpoint-step-6"
    assert (checkpoint / "sharded").is_dir() and (checkpoint / "model.safetensors").is_file()
    state = json.loads((checkpoint / "trainer_state.json").read_text())["state"]
    assert (state["epoch"], state["micro"]) == (2, 2)
    run([*TORCHRUN, *FSDP2, *flags(tiny_decoder, data, resumed, 2, *common,
                                   "--resume_from_checkpoint", str(checkpoint))])
    assert_same_weights(weights(whole / "final"), weights(resumed / "final"), 0)
    assert [r["step"] for r in logs(resumed)] == [7, 8]  # a new folder: the steps it ran
    assert [r["loss"] for r in logs(resumed)] == [r["loss"] for r in logs(whole)[6:]]

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
