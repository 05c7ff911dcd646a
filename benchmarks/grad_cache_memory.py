#!/usr/bin/env python
"""Peak memory of one training configuration with and without GradCache.

    python benchmarks/grad_cache_memory.py [--batch_size 64 --chunk 16 --steps 2]

Runs train.py twice on all-MiniLM-L6-v2 (full fine-tuning, mean pooling, the English man-page
split) with the same batch, and prints each run's peak memory (peak RSS on a CPU, peak
allocated memory on a GPU) and time per step, from training_summary_report.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import minilm, train  # noqa: E402


def run(out: str, args: argparse.Namespace, chunk: int) -> dict:
    report = train(["--model_name_or_path", minilm(), "--train_dataset",
                    os.path.join(ROOT, "datasets/manpages_en_train.jsonl"),
                    "--finetune_type", "full", "--pooling", "mean",
                    "--batch_size", str(args.batch_size), "--neg_nums", "3",
                    "--query_max_len", "64", "--passage_max_len", str(args.max_len),
                    "--max_steps", str(args.steps), "--save_on_epoch_end", "0",
                    "--temperature", "0.05", "--lr", "2e-5", "--grad_cache_chunk_size",
                    str(chunk)], out)
    return {"peak": report["peak_memory"], "seconds_per_step":
            report["totals"]["seconds"] / report["totals"]["steps"],
            "final_loss": report["final_loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--max_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="gc_mem_")
    rows = {"plain": run(os.path.join(work, "plain"), args, 0),
            f"GradCache chunk {args.chunk}": run(os.path.join(work, "gc"), args, args.chunk)}
    print(f"batch {args.batch_size} queries x 4 passages, passage_max_len {args.max_len}")
    for name, r in rows.items():
        peak = ", ".join(f"{k} {v:,.0f}" for k, v in r["peak"].items())
        print(f"{name:22} {peak}   {r['seconds_per_step']:.1f} s/step   "
              f"final loss {r['final_loss']:.4f}")


if __name__ == "__main__":
    main()
