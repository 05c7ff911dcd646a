#!/usr/bin/env python
"""QLoRA, the default mode, end to end on a real model: does in-training evaluation disturb
training, and which merge is the model that was evaluated?

    python benchmarks/qlora_end_to_end.py [--steps 20 --bits 4]

Gemma-3-270M, QLoRA on the Traditional Chinese man pages with the quick start's settings
(batch 8, 1 negative, lr 2e-4, temperature 0.05, query 32 / passage 128 tokens, fp32). Trains
twice, with and without --eval_dataset, and prints the losses at every 5th step of both (they
must be identical) and nDCG@10 before -> after; then merges the adapter with merge.py
--eval_dataset, which scores the trained model (quantized base + adapter) and the two merge
candidates side by side, and prints merge_report.json's embedding gaps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import OFFLINE, gemma, train  # noqa: E402

EVAL = os.path.join(ROOT, "datasets/manpages_zh_tw_eval.jsonl")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--bits", type=int, default=4, choices=(4, 8))
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="qlora_e2e_")
    model = gemma()
    flags = ["--model_name_or_path", model, "--finetune_type", "qlora", "--quantization_bits",
             str(args.bits), "--train_dataset",
             os.path.join(ROOT, "datasets/manpages_zh_tw_train.jsonl"), "--batch_size", "8",
             "--neg_nums", "1", "--query_max_len", "32", "--passage_max_len", "128",
             "--epochs", "1", "--max_steps", str(args.steps), "--lr", "2e-4", "--temperature",
             "0.05", "--warmup_proportion", "0.1", "--save_on_epoch_end", "0",
             "--overwrite_output_dir"]
    losses = {}
    for name, extra in (("with eval", ["--eval_dataset", EVAL]), ("no eval", [])):
        out = os.path.join(work, name.replace(" ", "_"))
        summary = train(flags + extra, out)
        with open(os.path.join(out, "detailed_training_logs.json"), encoding="utf-8") as f:
            losses[name] = [r["loss"] for r in json.load(f)]
        if "eval" in summary:
            m = summary["eval"]["metrics"]["ndcg@10"]
            print(f"nDCG@10 during training: {m['before']:.4f} -> {m['after']:.4f}")
    for name, values in losses.items():
        marks = ", ".join(f"{values[s - 1]:.4f}" for s in range(5, len(values) + 1, 5))
        print(f"loss at steps 5/10/... {name:10}: {marks}")
    print("losses identical with and without evaluation:",
          losses["with eval"] == losses["no eval"])
    merged = os.path.join(work, "merged")
    subprocess.run([sys.executable, os.path.join(ROOT, "merge.py"), "--base_model_path", model,
                    "--lora_adapter_path", os.path.join(work, "with_eval", "final"),
                    "--output_path", merged, "--overwrite", "--eval_dataset", EVAL],
                   check=True, env=OFFLINE)
    with open(os.path.join(merged, "merge_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    print(json.dumps({k: v for k, v in report.items() if k != "probes"}, indent=2))


if __name__ == "__main__":
    main()
