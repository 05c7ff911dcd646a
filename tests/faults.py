"""train.py with faults injected from the tests' side; nothing in embedrag reads any of this.

    EMBEDRAG_FAULTS='{"nan_at_step": 3, "nan_rank": 1}' python tests/faults.py [flags]

Keys of the JSON object in EMBEDRAG_FAULTS:
    nan_at_step     the loss of that optimizer step (1-based, one micro-batch per step) is NaN
    nan_rank        ... on that process only (default: every process)
    sleep_per_step  seconds to sleep after each logged step (lets a test kill a run mid-way)
    save_delay      seconds to sleep before a step checkpoint's trainer_state.json is written
    fail_rank       that process raises OSError("injected on rank N") in its first step
    stall           {"rank": N, "seconds": S}: that process sleeps S seconds before its first step
    probe           {"log": FILE}: --mixed_precision auto's probe is not run; each process that
                    would run it appends its rank to FILE and finds bf16 faster on rank 0 and
                    fp32 faster elsewhere (every process reports native bf16)
Runs under `python -m torch.distributed.run` too, and workers that train.py starts itself
(`--num_processes`) run this file again, so they carry the same faults.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
sys.path.insert(0, ROOT)


def install(faults: dict) -> None:
    from embedrag import losses as loss
    from embedrag.train import checkpoints, launch, logs, precision
    from embedrag.train import loop as trainer

    if "nan_at_step" in faults:
        real_loss, calls = loss.embedding_loss, [0]

        def nan_loss(*args, **kwargs):
            calls[0] += 1
            value = real_loss(*args, **kwargs)
            rank = int(os.environ.get("RANK", "0"))
            if calls[0] == faults["nan_at_step"] and faults.get("nan_rank", rank) == rank:
                value = value * float("nan")
            return value

        loss.embedding_loss = nan_loss
    if "sleep_per_step" in faults:
        real_log = logs.RunLogger.log_step

        def log_step(self, record):
            time.sleep(faults["sleep_per_step"])
            real_log(self, record)

        logs.RunLogger.log_step = log_step
    if "save_delay" in faults:
        real_write = checkpoints.write_json

        def write_json(path, obj):
            if path.endswith(checkpoints.STATE_FILE):
                time.sleep(faults["save_delay"])
            real_write(path, obj)

        checkpoints.write_json = write_json
    if "fail_rank" in faults and int(os.environ.get("RANK", "0")) == faults["fail_rank"]:
        def fail(*args, **kwargs):
            raise OSError(f"injected on rank {faults['fail_rank']}")

        trainer.forward_backward = fail
    if "stall" in faults and int(os.environ.get("RANK", "0")) == faults["stall"]["rank"]:
        real_fb, slept = trainer.forward_backward, []

        def stalled(*args, **kwargs):
            if not slept:
                slept.append(True)
                time.sleep(faults["stall"]["seconds"])
            return real_fb(*args, **kwargs)

        trainer.forward_backward = stalled
    if "probe" in faults:
        def measure(cfg, device):
            rank = int(os.environ.get("RANK", "0"))
            with open(faults["probe"]["log"], "a", encoding="utf-8") as f:
                f.write(f"{rank}\n")
            return {"fp32": 2.0, "bf16": 1.0} if rank == 0 else {"fp32": 1.0, "bf16": 2.0}

        precision.measure = measure
        precision.native_bf16 = lambda device=None: True
    real_workers = launch.run_workers
    launch.run_workers = lambda n, script, argv: real_workers(n, os.path.abspath(__file__), argv)


if __name__ == "__main__":
    install(json.loads(os.environ.get("EMBEDRAG_FAULTS", "{}")))
    sys.argv = [TRAIN, *sys.argv[1:]]
    runpy.run_path(TRAIN, run_name="__main__")
