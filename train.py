#!/usr/bin/env python
"""Fine-tune an embedding model with InfoNCE by LoRA, QLoRA or full fine-tuning.

    python train.py --model_name_or_path MODEL --train_dataset data.jsonl \
        --output_dir out --batch_size 8 [--finetune_type lora] ...

With several GPUs visible (`CUDA_VISIBLE_DEVICES=0,1 python train.py ...`) it starts one worker
per GPU itself; `--num_processes N` asks for N on any machine. Also runs under
`accelerate launch` and `python -m torch.distributed.run`. `--help` lists every flag. Exit codes:
0 done, 2 bad flags, data, model or output folder, 3 stopped on a non-finite loss (the last
good state is saved as a step checkpoint).
"""

from __future__ import annotations

import os
import pickle
import sys


def main(argv: list[str] | None = None) -> int:
    from embedrag.data.formats import load_rows
    from embedrag.data.mixture import expand
    from embedrag.data.rows import DataError, read_jsonl
    from embedrag.train.checks import parse_args

    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    try:  # both inputs checked whole, before any model loads or any worker starts
        if cfg.streaming:  # read as it streams; the first rows are checked now
            from embedrag.data.streaming import stream_rows

            rows = stream_rows(cfg.train_files()[0])
        else:  # memory-mapped Arrow, cached for the workers; several files: {file: rows}
            files = expand(cfg.train_files())
            rows = ({f: load_rows(f) for f in files} if len(files) > 1 else load_rows(files[0]))
        eval_examples = read_jsonl(cfg.eval_dataset) if cfg.eval_dataset else None
    except DataError as e:
        return fail([f"train.py: error: {line}" for line in str(e).splitlines()], 2)

    from embedrag.model.loading import ModelError
    from embedrag.model.recipe import RecipeError
    from embedrag.train.checkpoints import OutputDirError, check_output_dir
    from embedrag.train.launch import run_workers, workers_to_start
    from embedrag.train.loop import LaunchError, NonFiniteLossError, train

    try:
        check_output_dir(cfg)
        workers = workers_to_start(cfg.num_processes)
        if workers > 1:
            return run_workers(workers, os.path.abspath(__file__), argv)
        train(cfg, rows, eval_examples)
    except (OutputDirError, DataError, LaunchError, ModelError, RecipeError, OSError,
            pickle.UnpicklingError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        return fail([f"train.py: error: {lines[0]}"], 2)
    except NonFiniteLossError as e:
        return fail([f"train.py: stopped: {e}"], 3)
    return 0


def fail(lines: list[str], code: int) -> int:
    """Print why we stop; a worker of a launched run also hands the first line to its launcher."""
    from embedrag.train.launch import report_failure

    print("\n".join(lines), file=sys.stderr)
    report_failure(lines[0], code)
    return code


if __name__ == "__main__":
    sys.exit(main())
