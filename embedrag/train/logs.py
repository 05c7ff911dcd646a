"""JSON logs, TensorBoard events and the summary report of a training run.

Only the main process writes. The JSON logs stay valid JSON lists at every moment and are
flushed as records arrive, so a crash keeps every step logged before it; appending costs the
same at step 10 and at step 100,000 (the closing bracket is rewritten, not the whole file).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

from embedrag.eval.evaluate import format_table


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities (fp16 overflow steps) as null: strict JSON readers reject them."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()}


class JsonListFile:
    """A file holding a JSON list, appended to in place."""

    def __init__(self, path: str, keep: Callable[[dict[str, Any]], bool] | None = None):
        """A new empty list; or, with `keep`, the file's records that `keep` accepts (resuming
        a run drops what was logged after its checkpoint)."""
        self.path = path
        self.count = 0
        kept = []
        if keep is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                kept = [r for r in json.load(f) if keep(r)]
        with open(path, "w", encoding="utf-8") as f:
            f.write("[]\n")
        for record in kept:
            self.append(record)

    def append(self, record: dict[str, Any]) -> None:
        text = json.dumps(_finite(record), ensure_ascii=False, allow_nan=False)
        with open(self.path, "r+b") as f:
            f.seek(-3, os.SEEK_END)  # over "[]\n" at first, then over the closing "\n]\n"
            prefix = "[\n  " if self.count == 0 else ",\n  "
            f.write(f"{prefix}{text}\n]\n".encode())
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        self.count += 1


class RunLogger:
    """detailed_training_logs.json, training_losses.json and runs/ (TensorBoard)."""

    def __init__(self, output_dir: str, enabled: bool, resume_step: int | None = None,
                 resume_epoch: int = 1):
        """resume_step: continuing from a checkpoint at that step; records after it (logged
        before the run stopped) are dropped, in the JSON logs and in TensorBoard."""
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        resuming = resume_step is not None
        self.steps = JsonListFile(os.path.join(output_dir, "detailed_training_logs.json"),
                                  (lambda r: r["step"] <= resume_step) if resuming else None)
        self.epochs = JsonListFile(os.path.join(output_dir, "training_losses.json"),
                                   (lambda r: r["epoch"] < resume_epoch) if resuming else None)
        self.tb = SummaryWriter(log_dir=os.path.join(output_dir, "runs"),
                                purge_step=resume_step + 1 if resuming else None)

    def log_step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.steps.append(record)
        step = record["step"]
        self.tb.add_scalar("train/loss", record["loss"], step)
        self.tb.add_scalar("train/learning_rate", record["learning_rate"], step)
        if record.get("grad_norm") is not None:
            self.tb.add_scalar("train/grad_norm", record["grad_norm"], step)
        self.tb.add_scalar("train/samples_per_second", record["samples_per_second"], step)
        for key in (k for k in record if k.startswith("loss_")):  # the loss's parts
            self.tb.add_scalar(f"train/{key}", record[key], step)

    def log_epoch(self, epoch: int, mean_loss: float, step: int,
                  metrics: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {"epoch": epoch, "mean_loss": mean_loss}
        if metrics is not None:
            record["eval"] = metrics
        self.epochs.append(record)
        self.tb.add_scalar("train/epoch_mean_loss", mean_loss, step)
        self.tb.flush()

    def log_eval(self, metrics: dict[str, float], step: int, prefix: str = "eval") -> None:
        if not self.enabled:
            return
        for key, value in metrics.items():
            self.tb.add_scalar(f"{prefix}/{key}", value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def peak_memory(device: Any) -> dict[str, float]:
    """Peak memory in MiB: device memory on CUDA, resident set size of this process on CPU."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return {"peak_gpu_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    import resource

    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def eval_summary(evals: dict[str, Any], path: str) -> dict[str, Any]:
    """The summary's eval section: each metric before training, after it, and the change."""
    if evals["before"] is None:
        return {}
    after = evals["per_epoch"][-1] if evals["per_epoch"] else evals["before"]
    side_by_side = {m: {"before": v, "after": after[m], "change": after[m] - v}
                    for m, v in evals["before"].items()}
    return {"eval": {"dataset": path, "metrics": side_by_side, "per_epoch": evals["per_epoch"]}}


def done_lines(summary: dict[str, Any]) -> str:
    """The end-of-run report: speed, share of the matmul peak, and the eval table."""

    totals, t = summary["totals"], summary["throughput"]
    lines = [f"done: {totals['steps']} steps, {totals['samples_per_second']:.1f} samples/s, "
             f"{totals['tokens_per_second']:,.0f} tokens/s, {t['achieved_tflops'] * 1e3:.1f} "
             f"GFLOP/s = {t['mfu']:.1%} of this machine's {t['peak_dtype']} matmul peak "
             f"({t['peak_tflops'] * 1e3:.0f} GFLOP/s)"]
    if "eval" in summary:
        m = summary["eval"]["metrics"]
        lines.append(format_table({"before": {k: v["before"] for k, v in m.items()},
                                   "after": {k: v["after"] for k, v in m.items()}}))
    return "\n".join(lines)
