#!/usr/bin/env python
"""Peak memory of LoRA, QLoRA 4-bit, QLoRA 8-bit and full fine-tuning on the same model and batch.

    python benchmarks/memory.py [--model DIR] [--batch_size 8 --steps 2]

Default model: Gemma-3-270M prepared by scripts/prepare_gemma.py. Each mode runs train.py in its
own process for a few steps on the Traditional Chinese man-page split; the table shows peak
memory (RSS on a CPU, allocated memory on a GPU), trainable parameters and seconds per step,
read from each run's training_summary_report.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import gemma, train  # noqa: E402

MODES = {"lora": ["--finetune_type", "lora"],
         "qlora 4-bit": ["--finetune_type", "qlora", "--quantization_bits", "4"],
         "qlora 8-bit": ["--finetune_type", "qlora", "--quantization_bits", "8"],
         "full": ["--finetune_type", "full", "--lr", "1e-5"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    model = args.model or gemma()
    work = tempfile.mkdtemp(prefix="memory_")
    print(f"{model}: batch {args.batch_size} x (1 query + 2 passages), passage_max_len 128")
    print(f"{'mode':14}{'peak memory (MiB)':>20}{'trainable params':>20}{'s/step':>10}")
    for name, flags in MODES.items():
        r = train(["--model_name_or_path", model, "--train_dataset",
                   os.path.join(ROOT, "datasets/manpages_zh_tw_train.jsonl"),
                   "--batch_size", str(args.batch_size), "--neg_nums", "1",
                   "--query_max_len", "32", "--passage_max_len", "128",
                   "--max_steps", str(args.steps), "--save_on_epoch_end", "0", *flags],
                  os.path.join(work, name.replace(" ", "_")))
        peak = next(iter(r["peak_memory"].values()))
        print(f"{name:14}{peak:>20,.0f}{r['trainable_params']:>20,}"
              f"{r['totals']['seconds'] / r['totals']['steps']:>10.1f}")


if __name__ == "__main__":
    main()
