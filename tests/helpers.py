"""Helpers the test files share: paths, data, running train.py in this process or others,
reading what a run wrote, comparing weights."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import torch
from safetensors.torch import load_file

import train as train_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def assert_same_weights(a, b, atol):
    """Two state dicts hold the same tensors, every coordinate within `atol` (no relative
    slack). Runs compared across batch shapes or process counts run in float64
    (tests/float64.py), where `atol` is its TOLERANCE."""

    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


# fp32 unless a test asks otherwise: `--mixed_precision auto` (the default) measures on CPUs
# with native bf16, and the tests' numbers must not depend on which CPU runs them.
PINNED = ["--mixed_precision", "no"]


def run_train(model, data, out, *extra):
    """train.py's main() in this process; returns (exit code, summary, trained model)."""
    from embedrag.train import loop as trainer

    captured = {}
    real_train = trainer.train

    def spy(*args):
        captured["result"] = real_train(*args)
        return captured["result"]

    trainer.train = spy
    try:
        code = train_script.main(["--model_name_or_path", model, "--train_dataset", data,
                                  "--output_dir", str(out), "--batch_size", "4", "--epochs", "2",
                                  "--lr", "2e-3", "--neg_nums", "2", "--temperature", "0.05",
                                  "--lora_r", "4", "--lora_alpha", "8", "--seed", "7",
                                  *PINNED, *extra])
    finally:
        trainer.train = real_train
        reset_accelerate()
    summary, trained = captured.get("result", (None, None))
    return code, summary, trained


ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2"]


# train.py with its models in float64, for runs compared across batch shapes or process counts
FLOAT64 = ["tests/float64.py", "train.py"]


def flags(model, data, out, batch, *extra):
    return ["--model_name_or_path", model, "--train_dataset", data, "--output_dir", str(out),
            "--batch_size", str(batch), "--seed", "3", "--save_on_epoch_end", "0", *PINNED,
            *extra]


def run(cmd, env=ENV, code=0):
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == code, done.stderr[-3000:]
    return done


def weights(folder):
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() \
        else "model.safetensors"
    return load_file(str(folder / name))


def logs(out, name="detailed_training_logs.json"):
    return json.loads((out / name).read_text())


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def duplicated_rows():
    """24 rows, 12 of which share one positive: deduplication leaves the two processes with
    different numbers of distinct passages (checked below), hence different chunk counts."""
    rows = learnable_rows(24)
    for row in rows[:12]:
        row["pos"] = [rows[0]["pos"][0]]
    for row in rows:
        row["neg"] = [n for n in row["neg"] if n != rows[0]["pos"][0]]
    return rows


def distinct_passages_per_rank(model, rows, seed, batch, neg_nums, epoch=1):
    """Replays the data order and draws: distinct passages of each rank's batch, per step."""
    from embedrag.data.dataset import EpochShuffle, TrainingSet
    from embedrag.data.rows import Example
    from embedrag.model.tokens import load_tokenizer

    tok = load_tokenizer(model)
    data = TrainingSet([Example(r["query"], r["pos"], r["neg"], i) for i, r in enumerate(rows)],
                       tok, neg_nums=neg_nums, query_max_len=16, passage_max_len=16,
                       query_instruction="", append_eos=True, seed=seed)
    data.set_epoch(epoch)
    sampler = EpochShuffle(len(rows), seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    counts = []
    for step in range(0, len(batches), 2):
        counts.append([len({p for i in b for p in [data[i]["pos"], *data[i]["negs"]]})
                       for b in batches[step:step + 2]])
    return counts


def minilm_flags(held_out: str) -> list[str]:
    """Full fine-tuning of all-MiniLM-L6-v2 on the man pages, 3 steps at 2 x 4 rows, with
    in-training evaluation: the two-process tests' settings (DDP and FSDP2)."""
    return ["--finetune_type", "full", "--pooling", "mean", "--lr", "5e-5", "--epochs", "1",
            "--neg_nums", "1", "--temperature", "0.05", "--query_max_len", "32",
            "--passage_max_len", "48", "--eval_dataset", held_out, "--eval_batch_size", "8"]
