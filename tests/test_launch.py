"""Several processes, as users run them: train.py starting its own workers (`--num_processes`,
what `CUDA_VISIBLE_DEVICES=0,1 python train.py` does on GPUs) and `torch.distributed.run`, both
on gloo here. Every run is several optimizer steps long: the failures this guards against
(DDP waiting for gradients that never come, ranks issuing different collectives) show up at
step 2, not step 1."""

import json
import os
import sys

import pytest
import torch

import train as train_script
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

# --- the real all-MiniLM-L6-v2, full fine-tuning: the README's encoder example -------------



def test_minilm_full_on_two_processes_equals_one_process_with_the_double_batch(
        minilm_without_dropout, manpages, minilm_one_process, tmp_path, monkeypatch):
    """In float64 (tests/float64.py), so the two runs agree to TOLERANCE on any CPU. The user's
    own spelling, train.py starting its workers, then runs in float32 with the same workers and
    threads as torchrun's: the same arithmetic, so the same numbers."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's default, for the spawned workers
    train, held_out = manpages
    common = minilm_flags(held_out)
    one, said = minilm_one_process
    run([*TORCHRUN, *FLOAT64,
         *flags(minilm_without_dropout, train, tmp_path / "two", 4, *common)])
    # 24 rows / (2 x 4) = 3 steps: past step 2, where DDP would stop on the unused pooler
    runs = {"one": logs(one), "two": logs(tmp_path / "two")}
    assert [r["step"] for r in runs["two"]] == list(range(1, 4))
    assert [r["loss"] for r in runs["two"]] == pytest.approx([r["loss"] for r in runs["one"]],
                                                             rel=0, abs=TOLERANCE)
    assert_same_weights(weights(one / "final"), weights(tmp_path / "two" / "final"),
                        atol=TOLERANCE)
    reports = {d: json.loads((folder / "training_summary_report.json").read_text())
               for d, folder in (("one", one), ("two", tmp_path / "two"))}
    assert reports["two"]["world_size"] == 2
    config = json.loads((tmp_path / "two" / "final" / "training_config.json").read_text())
    assert config["frozen_unused_parameters"] == ["backbone.pooler.dense.weight",
                                                  "backbone.pooler.dense.bias"]
    assert "frozen" in said
    # evaluation shared by the two processes: the same metrics
    one_eval, two_eval = (reports[d]["eval"]["metrics"] for d in ("one", "two"))
    for when in ("before", "after"):
        assert {m: v[when] for m, v in two_eval.items()} == pytest.approx(
            {m: v[when] for m, v in one_eval.items()}, rel=0, abs=TOLERANCE)

    # the user's own spelling, float32: train.py starts its two workers itself, as torchrun
    # does; two steps compare the two ways of starting the same workers
    short = [*common, "--max_steps", "2"]
    run([*TORCHRUN, "train.py", *flags(minilm_without_dropout, train, tmp_path / "torchrun", 4,
                                       *short)])
    code = train_script.main(flags(minilm_without_dropout, train, tmp_path / "spawned", 4,
                                   *short, "--num_processes", "2"))
    assert code == 0
    assert sorted(os.listdir(tmp_path / "spawned")) == sorted(os.listdir(tmp_path / "two"))
    assert [r["loss"] for r in logs(tmp_path / "spawned")] == \
        [r["loss"] for r in logs(tmp_path / "torchrun")]
    assert_same_weights(weights(tmp_path / "torchrun" / "final"),
                        weights(tmp_path / "spawned" / "final"), atol=0)
    spawned, torchrun = (json.loads((tmp_path / d / "training_summary_report.json").read_text())
                         for d in ("spawned", "torchrun"))
    assert spawned["world_size"] == 2 and spawned["eval"] == torchrun["eval"]


# --- GradCache on two processes whose batches differ in size -------------------------------

def test_grad_cache_on_two_processes_with_uneven_chunks_equals_plain_backprop(
        tiny_decoder, tmp_path, monkeypatch):
    rows = duplicated_rows()
    data = write_jsonl(tmp_path / "dup.jsonl", rows)
    counts = distinct_passages_per_rank(tiny_decoder, rows, seed=3, batch=4, neg_nums=1)
    assert any(a != b for a, b in counts), counts  # what used to hang
    common = ["--finetune_type", "lora", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout",
              "0", "--lr", "1e-2", "--neg_nums", "1", "--temperature", "0.05", "--epochs", "1"]
    plain = run([*TORCHRUN, *FLOAT64, *flags(tiny_decoder, data, tmp_path / "plain", 4,
                                             *common)])
    assert "FutureWarning" not in plain.stderr  # the gather keeps gradients, undeprecated
    run([*TORCHRUN, *FLOAT64, *flags(tiny_decoder, data, tmp_path / "gc", 4, *common,
                                     "--grad_cache_chunk_size", "1")])
    logged = {d: logs(tmp_path / d) for d in ("plain", "gc")}
    assert len(logged["gc"]) == 3  # 24 rows / (2 x 4) = 3 steps
    assert [r["loss"] for r in logged["gc"]] == pytest.approx(
        [r["loss"] for r in logged["plain"]], rel=0, abs=TOLERANCE)
    assert_same_weights(weights(tmp_path / "plain" / "final"), weights(tmp_path / "gc" / "final"),
                        atol=TOLERANCE)
    # without shared negatives each process sees only its own half: an easier first step
    run([*TORCHRUN, "train.py", *flags(tiny_decoder, data, tmp_path / "alone", 4, *common,
                                       "--cross_device_negatives", "0", "--max_steps", "1")])
    assert logs(tmp_path / "alone")[0]["loss"] < logged["plain"][0]["loss"] - 0.1


def test_gte_and_margin_on_two_processes_equal_one_process_with_the_double_batch(
        tiny_decoder, learnable_data, tmp_path):
    """GTE's query-query and passage->query terms gather every process's queries with their
    gradients; two processes x 4 must train as one process x 8."""
    common = ["--finetune_type", "lora", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout",
              "0", "--lr", "1e-2", "--neg_nums", "1", "--temperature", "0.05", "--epochs", "1",
              "--gte_negatives", "1", "--false_negative_margin", "0.2"]
    run([*TORCHRUN, *FLOAT64, *flags(tiny_decoder, learnable_data, tmp_path / "two", 4,
                                     *common)])
    run([sys.executable, *FLOAT64, *flags(tiny_decoder, learnable_data, tmp_path / "one", 8,
                                          *common, "--num_processes", "1")])
    two, one = logs(tmp_path / "two"), logs(tmp_path / "one")
    assert len(two) == len(one) == 3
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=0,
                                                     abs=TOLERANCE)
    assert_same_weights(weights(tmp_path / "two" / "final"), weights(tmp_path / "one" / "final"),
                        atol=TOLERANCE)


def test_grad_cache_with_dropout_on_two_processes_equals_plain_backprop(tiny_decoder,
                                                                         tmp_path):
    """Dropout on, three optimizer steps through DDP: GradCache's gradients equal those of
    one graph over the same chunks drawn from the same random state (tests/dist_grad_cache.py)."""
    done = run([*TORCHRUN, "tests/dist_grad_cache.py", tiny_decoder, str(tmp_path)])
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in results:
        assert result["steps"] == 3, done.stdout
        assert result["max_grad_diff"] < 1e-12, result
        assert result["dropout_changes_loss"]
    assert results[0]["chunks"] != results[1]["chunks"]  # uneven, and it finished


# --- a NaN on one process stops both -----------------------------------------------------------

def test_nan_on_one_process_stops_both_at_the_same_step_with_one_checkpoint(
        tiny_decoder, learnable_data, tmp_path):
    env = {**ENV, "EMBEDRAG_FAULTS": json.dumps({"nan_at_step": 3, "nan_rank": 1})}
    out = tmp_path / "o"
    done = run([sys.executable, "tests/faults.py",
                *flags(tiny_decoder, learnable_data, out, 2, "--finetune_type", "lora",
                       "--num_processes", "2")], env=env, code=3)
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("train.py:")]
    assert len(lines) == 1 and "not finite at step 3 (epoch 1)" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-step-2"]
    assert [r["step"] for r in logs(out)] == [1, 2]
    assert not (out / "final").exists()


def test_a_failing_worker_is_reported_once_with_its_exit_code(tiny_decoder, learnable_data,
                                                              tmp_path):
    """A problem only one worker meets (an OSError injected into its first step) reaches the
    user as that worker's one line, with its exit code."""
    out = tmp_path / "o"
    env = {**ENV, "EMBEDRAG_FAULTS": json.dumps({"fail_rank": 1})}
    done = run([sys.executable, "tests/faults.py",
                *flags(tiny_decoder, learnable_data, out, 2, "--finetune_type", "lora",
                       "--num_processes", "2")], env=env, code=2)
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("train.py:")]
    assert lines == ["train.py: worker 1 of 2: error: injected on rank 1"], \
        done.stderr[-2000:]


def test_auto_precision_is_decided_once_and_shared_by_every_process(tiny_decoder,
                                                                   learnable_data, tmp_path):
    """Only the main process probes (were each to probe, rank 1 would find fp32 faster); every
    process trains in its choice, bf16, so their LoRA bases agree."""
    out, probed = tmp_path / "o", tmp_path / "probed.txt"
    env = {**ENV, "EMBEDRAG_FAULTS": json.dumps({"probe": {"log": str(probed)}}),
           "EMBEDRAG_CACHE": str(tmp_path / "cache")}
    done = run([sys.executable, "tests/faults.py",
                *flags(tiny_decoder, learnable_data, out, 2, "--finetune_type", "lora",
                       "--num_processes", "2", "--max_steps", "2",
                       "--mixed_precision", "auto")], env=env)
    assert probed.read_text() == "0\n"
    config = json.loads((out / "final" / "training_config.json").read_text())
    assert config["mixed_precision"] == "bf16"
    assert config["precision_auto"]["choice"] == "bf16"
    assert done.stdout.count("precision: bf16 autocast (auto: ") == 1


# --- exact resume on two processes, dropout on --------------------------------------------

def test_resume_mid_epoch_two_on_two_processes_equals_the_uninterrupted_run(
        tiny_decoder, learnable_data, tmp_path, monkeypatch):
    """Also: an eval set of 3 rows leaves process 1 without a single eval batch. Both runs
    compute on 2 processes of 1 thread each: the same arithmetic, so the same numbers."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's default, for the spawned workers
    small_eval = write_jsonl(tmp_path / "eval.jsonl", learnable_rows(3))
    common = ["--finetune_type", "lora", "--lora_r", "4", "--lora_alpha", "8", "--lr", "5e-3",
              "--lora_dropout", "0.2", "--neg_nums", "2", "--epochs", "2", "--save_steps", "2",
              "--eval_dataset", small_eval]
    whole = tmp_path / "whole"
    assert train_script.main(flags(tiny_decoder, learnable_data, whole, 2, *common,
                                   "--num_processes", "2")) == 0
    # 24 rows / (2 x 2) = 6 steps per epoch; step 8 is mid-epoch 2
    state = json.loads((whole / "checkpoint-step-8" / "trainer_state.json").read_text())
    assert state["state"]["epoch"] == 2 and state["state"]["micro"] == 2
    resumed = tmp_path / "resumed"
    run([*TORCHRUN, "train.py", *flags(tiny_decoder, learnable_data, resumed, 2, *common,
                                       "--resume_from_checkpoint",
                                       str(whole / "checkpoint-step-8"))])
    assert_same_weights(weights(whole / "final"), weights(resumed / "final"), atol=0)
    assert [r["loss"] for r in logs(resumed)] == pytest.approx(
        [r["loss"] for r in logs(whole)][8:], abs=1e-6)
    epochs = [logs(d, "training_losses.json") for d in (whole, resumed)]
    assert epochs[1][-1]["mean_loss"] == pytest.approx(epochs[0][-1]["mean_loss"], abs=1e-6)
    assert epochs[1][-1]["eval"] == pytest.approx(epochs[0][-1]["eval"], abs=1e-6)


def test_spawning_needs_no_launcher_and_a_launcher_decides_itself(monkeypatch):
    from embedrag.train.launch import check_world_size, workers_to_start

    for name in ("LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION",
                 "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert workers_to_start(0) == 2       # CUDA_VISIBLE_DEVICES=0,1 python train.py
    assert workers_to_start(1) == 1       # a deliberate single-device run
    assert workers_to_start(4) == 4
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert workers_to_start(0) == 1       # torchrun / accelerate launch started this one
    assert check_world_size(2) is None and check_world_size(0) is None
    assert "launcher started 2" in check_world_size(3)


# --- the process group's timeout, and two machines ------------------------------------------

def test_ddp_timeout_bounds_the_wait_for_a_stalled_process(tiny_decoder, learnable_data,
                                                           tmp_path):
    """Rank 1 stalls for two minutes before its first step; with --ddp_timeout 5 rank 0 gives
    up at its first collective instead of waiting (the default is 30 minutes)."""
    import subprocess
    import time

    env = {**ENV, "EMBEDRAG_FAULTS": json.dumps({"stall": {"rank": 1, "seconds": 120}})}
    start = time.perf_counter()
    done = subprocess.run([*TORCHRUN, "tests/faults.py",
                           *flags(tiny_decoder, learnable_data, tmp_path / "o", 2,
                                  "--ddp_timeout", "5", "--max_steps", "2")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert done.returncode != 0 and time.perf_counter() - start < 110
    assert "timed out" in done.stderr.lower() or "timeout" in done.stderr.lower(), \
        done.stderr[-2000:]


def test_two_machines_on_one_host_train_into_one_output(tiny_decoder, learnable_data, tmp_path):
    """torchrun --nnodes 2 on one host, each "machine" with its own datasets cache and one
    output folder between them: each machine's first process converts and hashes the data
    into its own cache, and the run writes one final/."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "shared_out"
    procs = []
    for node in (0, 1):
        env = {**ENV, "HF_DATASETS_CACHE": str(tmp_path / f"cache{node}")}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
             str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
             "--master_port", str(port), "train.py",
             *flags(tiny_decoder, learnable_data, out, 2, "--max_steps", "3",
                    "--save_steps", "2")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    summary = json.loads((out / "training_summary_report.json").read_text())
    assert summary["world_size"] == 2 and summary["totals"]["steps"] == 3
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-step-2" / "trainer_state.json").is_file()
    assert [r["step"] for r in logs(out)] == [1, 2, 3]
    for node in (0, 1):  # each machine prepared the data in its own cache
        assert list((tmp_path / f"cache{node}" / "embedrag").glob("*.arrow"))


@pytest.mark.parametrize(("engine", "name"), [("DEEPSPEED", "DeepSpeed"), ("FSDP", "FSDP1")])
def test_deepspeed_and_fsdp1_are_refused_at_start(tiny_decoder, learnable_data, tmp_path,
                                                  monkeypatch, capsys, engine, name):
    """An accelerate config that asks for DeepSpeed or FSDP1 gets one line naming FSDP2 and
    exit code 2 before any weight loads, not a crash at the first forward or silently wrong
    steps."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from embedrag.train import setup
    from tests.helpers import run_train

    real = setup.make_accelerator

    def sharded(*args, **kwargs):
        accelerator = real(*args, **kwargs)
        accelerator.state.distributed_type = DistributedType[engine]  # as the config asks
        if engine == "FSDP":
            accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=1)
        return accelerator

    monkeypatch.setattr(setup, "make_accelerator", sharded)
    monkeypatch.setattr(setup, "make_model", lambda *a, **k: pytest.fail("model loaded"))
    code = run_train(tiny_decoder, learnable_data, tmp_path / "o")[0]
    err = capsys.readouterr().err
    assert code == 2 and f"train.py: error: {name} is not supported" in err and "FSDP2" in err
    assert len([ln for ln in err.splitlines() if ln.startswith("train.py:")]) == 1


def _accelerate(config, node_env, *extra):
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch",
                             "--config_file", f"configs/accelerate/{config}", *extra],
                            cwd=ROOT, env=node_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_shipped_accelerate_configs_run(tiny_decoder, learnable_data, tmp_path):
    """Every config in configs/accelerate is run as shipped, on this machine's CPU processes
    (Accelerate falls back to gloo without CUDA). multi_node.yaml's address and 16 processes
    are overridden on the command line, as its comment tells users to."""
    import glob
    import socket

    assert {os.path.basename(p) for p in glob.glob(f"{ROOT}/configs/accelerate/*.yaml")} == {
        "multi_gpu.yaml", "multi_node.yaml", "fsdp2.yaml"}
    args = ["train.py", *flags(tiny_decoder, learnable_data, tmp_path / "one", 2,
                               "--max_steps", "2")]
    args.remove("--mixed_precision")  # as users run it: the config's bf16 decides
    args.remove("no")
    single = _accelerate("multi_gpu.yaml", ENV, *args)
    err = single.communicate(timeout=300)[1]
    assert single.returncode == 0, err[-2000:]
    summary = json.loads((tmp_path / "one" / "training_summary_report.json").read_text())
    assert summary["world_size"] == 2 and summary["config"]["mixed_precision"] == "bf16"
    assert "accelerate config" in summary["embedding"]["precision_auto"]["reason"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [_accelerate("multi_node.yaml", {**ENV, "HF_DATASETS_CACHE": str(tmp_path / f"c{r}")},
                         "--machine_rank", str(r), "--num_processes", "2",
                         "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                         "train.py", *flags(tiny_decoder, learnable_data, tmp_path / "two", 2,
                                            "--max_steps", "2"))
             for r in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:]
    summary = json.loads((tmp_path / "two" / "training_summary_report.json").read_text())
    assert summary["world_size"] == 2 and (tmp_path / "two" / "final").is_dir()
    # fsdp2.yaml: Accelerate keeps FSDP off on CPUs; tests/fsdp2.py switches its state on
    # from the test side and takes the plugin from the config's variables
    args = ["train.py", *flags(tiny_decoder, learnable_data, tmp_path / "fsdp2", 2,
                               "--max_steps", "2", "--finetune_type", "full")]
    args.remove("--mixed_precision")  # the config's bf16: FSDP2's policy computes in bf16
    args.remove("no")
    sharded = _accelerate("fsdp2.yaml", ENV, "tests/fsdp2.py", *args)
    err = sharded.communicate(timeout=300)[1]
    assert sharded.returncode == 0, err[-2000:]
    summary = json.loads((tmp_path / "fsdp2" / "training_summary_report.json").read_text())
    assert summary["sharding"]["engine"] == "FSDP2" and summary["world_size"] == 2
    assert summary["sharding"]["mixed_precision"]["param_dtype"] == "bfloat16"
    total = summary["sharding"]["total_parameters"]  # the config has the main process read
    assert [h["loaded_before_sharding"] for h in summary["sharding"]["per_process"]] == [total, 0]
