"""Starting and coordinating the processes of a data-parallel run.

The seed's own multi-GPU command is `CUDA_VISIBLE_DEVICES=0,1 python train.py ...`: one process
that would use one GPU. `train.py` instead starts one worker per visible GPU itself, through
PyTorch's elastic launcher (what `torchrun` and `accelerate launch --multi_gpu` use underneath),
so the run behaves as `accelerate launch --num_processes N train.py ...` would: same logs, same
outputs, one writer. `--num_processes N` asks for N workers on any machine; on a CPU they talk
over gloo, which is how the tests exercise this path.

Only worker 0's output reaches the console; the others write to files. When workers fail, the
user sees worker 0's one-line reason (and another worker's only if it differs) and the exit code
— not N interleaved tracebacks.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from typing import Any

# Set in a process that a launcher (torchrun, accelerate launch, mpirun, ...) started.
LAUNCHER_VARIABLES = ("LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION",
                      "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def started_by_launcher() -> bool:
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def workers_to_start(num_processes: int | None) -> int:
    """How many worker processes this `train.py` should start (1: train in this process).

    Under a launcher the launcher decides. Otherwise `--num_processes` decides, and without it
    every visible CUDA device gets a worker."""
    if started_by_launcher():
        return 1
    if num_processes:
        return num_processes
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def check_world_size(num_processes: int | None) -> str | None:
    """Under a launcher, an explicit --num_processes must agree with what was started."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if num_processes and started_by_launcher() and num_processes != world:
        return (f"--num_processes {num_processes}, but the launcher started {world} "
                f"process(es); drop the flag or launch {num_processes}")
    return None


def _threads_per_worker(n: int) -> str:
    """OMP threads per worker: the user's OMP_NUM_THREADS, else the cores shared out (torchrun
    and accelerate launch default to 1, which starves CPU workers on a machine with many cores)."""
    if "OMP_NUM_THREADS" in os.environ:
        return os.environ["OMP_NUM_THREADS"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return str(max(1, (cores or 1) // n))


def report_failure(line: str, code: int) -> None:
    """Also hand our one-line reason to the launcher, when there is one: torchelastic (behind
    torchrun, accelerate launch and `run_workers`) gives every worker a file for it. Our
    launcher then reports a failure once; torchrun shows the line in its summary."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"message": line, "timestamp": int(time.time()), "exitcode": code}, f)


def _reports(logs: str) -> dict[int, dict]:
    """The reasons the workers handed over, by rank (see `report_failure`)."""
    found = {}
    for path in glob.glob(os.path.join(logs, "*", "attempt_*", "*", "error.json")):
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        if isinstance(report.get("message"), str):
            found[int(os.path.basename(os.path.dirname(path)))] = report
    return found


def _last_line(logs: str, rank: int) -> str:
    """The last line a worker wrote to its (redirected) stderr: a traceback's last line."""
    lines = []
    for path in glob.glob(os.path.join(logs, "*", "attempt_*", str(rank), "stderr.log")):
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln.rstrip() for ln in f if ln.strip()]
    return lines[-1] if lines else ""


def run_workers(n: int, script: str, argv: list[str]) -> int:
    """Run `python script argv...` as n workers of one data-parallel job; return its exit code.

    Worker 0 writes to this console (progress bar included); workers 1..n-1 write to files
    that are read only if one of them is the first to fail. The elastic agent's own failure
    report is silenced: it is replaced by one line."""
    from accelerate.utils import patch_environment

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    with patch_environment(omp_num_threads=_threads_per_worker(n)):  # the workers inherit it
        return _launch(n, script, argv)


def _launch(n: int, script: str, argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="embedrag-workers-") as logs:
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=uuid.uuid4().hex,
            rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
            logs_specs=DefaultLogsSpecs(log_dir=logs,
                                        redirects={rank: Std.ALL for rank in range(1, n)}))
        try:
            elastic_launch(config, sys.executable)(script, *argv)
            return 0
        except ChildFailedError as e:
            reports = _reports(logs)
            if 0 in reports:  # worker 0 said why on this console; say only what differs
                others = {r: m for r, m in reports.items()
                          if r != 0 and m["message"] != reports[0]["message"]}
                for rank, report in sorted(others.items()):
                    reason = report["message"].removeprefix("train.py: ")
                    print(f"train.py: worker {rank} of {n}: {reason}", file=sys.stderr)
                return reports[0]["exitcode"]
            rank, failure = e.get_first_failure()
            code = failure.exitcode
            if rank in reports:
                reason = reports[rank]["message"].removeprefix("train.py: ")
                code = reports[rank]["exitcode"]
            else:
                how = f"exit code {code}" if code > 0 else f"killed by signal {-code}"
                reason = f"failed ({how}): {_last_line(logs, rank)}"
            # Worker 0 was stopped where it stood, perhaps mid progress bar: a line of our own.
            print(f"\ntrain.py: worker {rank} of {n}: {reason}", file=sys.stderr)
            return code if code > 0 else 1


def make_accelerator(mixed_precision: str, accumulation: int, streaming: bool,
                     dynamic_graph: bool) -> Any:
    """The Accelerator of this run. cpu=True on machines without CUDA lets a launcher start a
    MULTI_CPU (gloo) run. DDP looks for unused parameters every step only where they change
    from step to step (mixture of experts); fixed ones are frozen before it starts
    (`unreached_parameters`)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

    # A stream is read by every process, each keeping its own batches (batches of different
    # lengths cannot be dispatched from one process as one tensor).
    loading = DataLoaderConfiguration(dispatch_batches=False if streaming else None)
    return Accelerator(gradient_accumulation_steps=accumulation,
                       mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(),
                       dataloader_config=loading, kwargs_handlers=[DistributedDataParallelKwargs(
                           find_unused_parameters=dynamic_graph)])


def process_state(timeout_s: int) -> Any:
    """This process's place in the run (Accelerate's `PartialState`), set up before anything
    else starts the process group, so that the group's collectives wait `timeout_s` seconds.
    cpu=True on machines without CUDA lets a launcher start a MULTI_CPU (gloo) run."""
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=timeout_s))
