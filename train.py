#!/usr/bin/env python
"""Fine-tune an embedding model with InfoNCE by LoRA, QLoRA or full fine-tuning.

    python train.py --model_name_or_path MODEL --train_dataset data.jsonl \
        --output_dir out --batch_size 8 [--finetune_type lora] ...

Also runs under `accelerate launch` and `python -m torch.distributed.run`. `--help` lists every
flag. Exit codes: 0 done, 2 bad flags, data, model or output folder, 3 stopped on a non-finite
loss (the last good state is saved as a step checkpoint).
"""

from __future__ import annotations

import pickle
import sys


def main(argv: list[str] | None = None) -> int:
    from embedrag.config import parse_args
    from embedrag.data import DataError, read_jsonl

    cfg = parse_args(argv)
    try:  # both files checked whole, before any model loads
        examples = read_jsonl(cfg.train_dataset)
        eval_examples = read_jsonl(cfg.eval_dataset) if cfg.eval_dataset else None
    except DataError as e:
        for line in str(e).splitlines():
            print(f"train.py: error: {line}", file=sys.stderr)
        return 2

    from embedrag.checkpoints import OutputDirError, check_output_dir
    from embedrag.trainer import LaunchError, NonFiniteLossError, train

    try:
        check_output_dir(cfg)
        train(cfg, examples, eval_examples)
    except (OutputDirError, DataError, LaunchError, OSError, pickle.UnpicklingError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"train.py: error: {lines[0]}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"train.py: stopped: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
