"""The loop's counters and logs: where the run stands (`RunState`), loss and token sums kept on
the device, the progress bar, the last state known to be good, and the log records.

A record is queued at every logging step with its numbers still on the device; the queue is
read back (with the non-finite flag of `guard.py`) every READ_EVERY steps at least, at
checkpoints and at the end of an epoch, so the host does not wait for the device at every
logging step. The records come out as they would have one by one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from embedrag.losses import margin_note
from embedrag.train.guard import NonfiniteGuard
from embedrag.train.setup import Job
from embedrag.train.state import PARTS, RunState, Sums

READ_EVERY = 10  # optimizer steps between reads of the queued records, at least


class Progress:
    """The loop's counters: the run's `RunState`, the loss and token sums kept on the device
    until a log point, the progress bar and clocks, and the last state known to be good."""

    def __init__(self, job: Job):
        self.job, self.state = job, job.state
        self.start = self.window_time = time.perf_counter()
        self.sums = Sums.start(self.state, job.accelerator.device)
        self.nonfinite = torch.zeros((), device=job.accelerator.device)
        self.guard, self.guard_start = NonfiniteGuard(job.optimizer, job.accelerator.device), \
            self.state.step
        self.history: dict[int, tuple[RunState, Sums]] = {}  # good states since `flush`
        self.pending: list[tuple[dict[str, Any], torch.Tensor]] = []  # records not yet read
        self.every = job.cfg.logging_steps * math.ceil(READ_EVERY / job.cfg.logging_steps)
        self.margin_share: torch.Tensor | None = None  # read at the first flush
        self.grad_norm: Any = None
        self.bar = tqdm(total=job.total_steps, initial=self.state.step,
                        disable=not job.accelerator.is_main_process, desc="train",
                        dynamic_ncols=True)
        self.mark_good()

    def mark_good(self) -> None:
        """Remember the state after a finished step: what a NaN at the next one goes back to."""
        self.good = (dataclasses.replace(self.state), self.sums.clone())
        if self.guard.deferred:
            self.history[self.state.step] = self.good

    def flush(self) -> int | None:
        """Read the device — the queued log records and the non-finite flag — and write the
        records. Returns the first step whose loss was not finite, if any (its records and
        later ones are not written; `good` is then the state before it, for the loop to stop
        with), else None."""
        first = self.guard.first_bad_step()
        bad = None if first is None else self.guard_start + first
        self.warn_margin()
        if self.pending:
            values = torch.stack([numbers for _, numbers in self.pending]).tolist()
            for (record, _), numbers in zip(self.pending, values, strict=True):
                if bad is None or record["step"] < bad:
                    self.write(record, numbers)
            self.pending = []
        if bad is None:
            self.history = {self.state.step: self.good} if self.guard.deferred else {}
            return None
        self.good = self.history.get(bad - 1, self.good)
        return bad

    def elapsed(self) -> float:
        """Seconds of training in the run, those before a resume included."""
        return self.state.elapsed_s + time.perf_counter() - self.start

    def scale(self, micro: int) -> float:
        """Accelerate divides every micro-loss by the accumulation steps; an epoch's last window
        may be shorter, so rescale to keep its gradient a mean, not a fraction."""
        accum, per_epoch = self.job.cfg.gradient_accumulation_steps, self.job.batches_per_epoch
        window = accum if per_epoch is None else min(accum, per_epoch - micro // accum * accum)
        return accum / window if window < accum else 1.0

    def note_margin(self, parts: dict[str, torch.Tensor]) -> None:
        """Keep the share of candidates the false-negative margin drops at the first step; the
        first flush warns once when it is most of them."""
        if "margin_dropped" in parts:
            self.margin_share = self.job.accelerator.reduce(parts["margin_dropped"], "mean")

    def warn_margin(self) -> None:
        if self.margin_share is not None:
            share, self.margin_share = float(self.margin_share), None
            if share > 0.5:
                self.job.say(margin_note(self.job.cfg.false_negative_margin, share))

    def count(self, micro: int, batch: dict[str, torch.Tensor], loss: torch.Tensor,
              parts: dict[str, torch.Tensor]) -> None:
        """Fold one micro-batch into the counters. Tokens and losses are summed on the device
        and read back only when logging; the positions computed (packed, or in length
        buckets) are known on the host from the masks."""
        state, sums, world = self.state, self.sums, self.job.world
        n = batch["query_input_ids"].shape[0] * world
        state.micro, state.samples, state.window_samples = (
            micro + 1, state.samples + n, state.window_samples + n)
        sums.tokens += batch["query_attention_mask"].sum()
        sums.tokens += batch["passage_attention_mask"].sum()
        embedder = self.job.embedder
        state.slots += world * sum(
            embedder.computed_positions(batch[f"{kind}_attention_mask"],
                                        batch.get(f"{kind}_lengths"))
            for kind in ("query", "passage"))
        sums.window_loss += loss.detach()
        for i, name in enumerate(PARTS):
            if name in parts:
                sums.window_parts[i] += parts[name]
        sums.epoch_loss += loss.detach()
        state.window_micro += 1
        state.epoch_micro += 1

    def end_step(self, lr: float) -> int | None:
        """Count a finished optimizer step; queue its record at a logging step, and read the
        queue back every `every` steps and at the last one (see `flush`, whose answer this
        returns; None when nothing was read)."""
        job, state = self.job, self.state
        state.step += 1
        self.bar.update(1)
        bad = None
        if state.step % job.cfg.logging_steps == 0 or state.step == job.total_steps:
            self.queue(lr)
            if state.step % self.every == 0 or state.step == job.total_steps:
                bad = self.flush()
        if bad is None:
            self.mark_good()
        return bad

    def queue(self, lr: float) -> None:
        """One record of detailed_training_logs.json: the window's mean loss (over processes
        and micro-batches), its throughput, and the loss's parts when it has some. What the
        host knows is filled in now; the numbers stay on the device until `flush`."""
        job, state, sums, acc = self.job, self.state, self.sums, self.job.accelerator
        now = time.perf_counter()
        record = {
            "step": state.step, "epoch": state.epoch, "learning_rate": lr,
            "samples_per_second": state.window_samples / max(now - self.window_time, 1e-9),
            "elapsed_s": state.elapsed_s + now - self.start,
            "has_grad_norm": self.grad_norm is not None,
        }
        device, wide = sums.tokens.device, torch.float64
        norm = self.grad_norm if self.grad_norm is not None else 0.0
        numbers = [acc.reduce(sums.window_loss, "mean").to(wide) / state.window_micro,
                   torch.as_tensor(norm, device=device).to(wide), sums.tokens.to(wide)]
        if job.loss.has_parts:  # the loss's parts, as means
            numbers += list((acc.reduce(sums.window_parts, "mean").to(wide)
                             / state.window_micro).unbind())
        self.pending.append((record, torch.stack([n.reshape(()) for n in numbers])))
        sums.window_loss.zero_()
        sums.window_parts.zero_()
        state.window_micro, state.window_samples, self.window_time = 0, 0, now

    def write(self, record: dict[str, Any], numbers: list[float]) -> None:
        """A queued record with its numbers read back, to the logs and the progress bar."""
        job, state = self.job, self.state
        loss, norm, tokens, *parts = numbers
        state.last_loss = loss
        done = {"step": record["step"], "epoch": record["epoch"], "loss": loss,
                "learning_rate": record["learning_rate"],
                "grad_norm": norm if record["has_grad_norm"] else None,
                "samples_per_second": record["samples_per_second"],
                "tokens": state.tokens + int(tokens) * job.world,  # since the run began
                "elapsed_s": record["elapsed_s"]}
        done.update({f"loss_{name}": v for name, v in zip(PARTS, parts, strict=False)
                     if name != "kd" or job.loss.kd_weight})
        job.logger.log_step(done)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['learning_rate']:.2e}",
                             sps=f"{record['samples_per_second']:.1f}")

    def tokens(self) -> int:
        """Real tokens trained on since the run began, over all processes."""
        return self.state.tokens + int(self.sums.tokens) * self.job.world
