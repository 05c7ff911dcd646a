"""The training loop, under Hugging Face Accelerate. Read `train` top to bottom; `setup.py`
builds what it steps through, `progress.Progress` keeps its counters and logs."""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
import warnings
from typing import Any

import torch

from embedrag.config import TrainConfig
from embedrag.data.rows import DataError, Example
from embedrag.eval.evaluate import evaluate
from embedrag.hardware import utilisation
from embedrag.io import write_json
from embedrag.model.embedding import EmbeddingModel, EmbedSettings
from embedrag.model.loading import autocast, autocast_dtype, lora_input_casts
from embedrag.publish.card import publish
from embedrag.train.checkpoints import restore_rng, save_model, save_step_checkpoint
from embedrag.train.logs import done_lines, eval_summary, peak_memory
from embedrag.train.optim import rewind
from embedrag.train.progress import Progress
from embedrag.train.setup import Job, LaunchError, prepare, shard_sizes
from embedrag.train.state import RunState, Sums
from embedrag.train.step import forward_backward

__all__ = ["LaunchError", "NonFiniteLossError", "train"]

# bitsandbytes warns on every int8 matmul that it casts fp32 inputs to fp16; once is enough.
warnings.filterwarnings("once", message=".*MatMul8bitLt: inputs will be cast.*")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped with the last good state saved."""


def train(cfg: TrainConfig, rows: Any, eval_examples: list[Example] | None = None,
          ) -> tuple[dict[str, Any], EmbeddingModel]:
    """Train on `rows` (embedrag.data.formats.load_rows, or a list of Examples), save, and
    return (summary report, the trained EmbeddingModel)."""
    job = prepare(cfg, rows)
    cfg, acc, state = job.cfg, job.accelerator, job.state
    if not job.resume_from:
        state.evals["before"] = run_eval(job, eval_examples, 0)
    job.model.train()
    run = Progress(job)
    if job.rngs is not None:  # after every load that drew random numbers (LoRA init, ...)
        restore_rng(job.rngs[acc.process_index] if isinstance(job.rngs, list) else job.rngs)
    # A stream is read again, reshuffled, until --max_steps; a table for --epochs.
    epochs = (itertools.count(state.epoch) if cfg.streaming
              else range(state.epoch, cfg.epochs + 1))
    for epoch in epochs:
        state.epoch = epoch
        job.data.set_epoch(epoch)    # which positive and negatives each row draws
        job.loader.set_epoch(epoch)  # the order of the rows
        skip = state.micro
        batches = acc.skip_first_batches(job.loader, skip) if skip else job.loader
        for micro, batch in enumerate(batches, start=skip):
            with acc.accumulate(job.model):
                loss, parts = forward_backward(acc, job.model, batch, job.loss,
                                               cfg.grad_cache_chunk_size, run.scale(micro))
                run.nonfinite += ~torch.isfinite(loss.detach())
                if state.step == 0 and micro == skip:
                    run.note_margin(parts)
                if acc.sync_gradients:
                    # Agreed by all processes, on the device (guard.py): a NaN on one of them
                    # stops them all, before the step it happened in.
                    run.guard.observe(acc.reduce(run.nonfinite, "sum"))
                    if not run.guard.deferred and run.flush():
                        stop_on_nonfinite(job, run)
                    run.grad_norm = acc.clip_grad_norm_(job.model.parameters(),
                                                        cfg.max_grad_norm or float("inf"))
                job.optimizer.step()
                job.optimizer.zero_grad(set_to_none=True)
            run.count(micro, batch, loss, parts)
            if not acc.sync_gradients:
                continue
            lr = job.scheduler.get_last_lr()[0]  # the rate this step trained at
            if not acc.optimizer_step_was_skipped:
                job.scheduler.step()
            if run.end_step(lr):  # a queued record or flag showed a non-finite loss
                stop_on_nonfinite(job, run)
            if cfg.save_steps and state.step % cfg.save_steps == 0:
                if run.flush():
                    stop_on_nonfinite(job, run)
                checkpoint(job, run, os.path.join(cfg.output_dir,
                                                  f"checkpoint-step-{state.step}"))
            if state.step >= job.total_steps:
                break
        end_epoch(job, run, epoch, eval_examples)
        if state.step >= job.total_steps:
            break
    run.bar.close()
    return finish(job, run)


def run_eval(job: Job, examples: list[Example] | None, step: int) -> dict[str, float] | None:
    """Retrieval metrics on --eval_dataset, every process embedding its share of the texts
    (all of them, through the sharded model, when the weights are sharded)."""
    if examples is None:
        return None
    acc, cfg = job.accelerator, job.cfg
    settings = EmbedSettings.from_training_config(job.train_config)
    with autocast(job.embedder, cfg.mixed_precision):
        metrics = evaluate(job.model if job.sharded else acc.unwrap_model(job.model),
                           job.tokenizer, examples, settings, batch_size=cfg.eval_batch_size,
                           accelerator=None if job.sharded else acc,
                           dims=[d for d, _ in job.loss.matryoshka])
    job.logger.log_eval(metrics, step)
    job.say(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


def end_epoch(job: Job, run: Progress, epoch: int, eval_examples: list[Example] | None) -> None:
    """Log the epoch's mean loss and evaluation, save checkpoint-epoch-N after a whole epoch,
    and reset the epoch's counters."""
    cfg, state, acc = job.cfg, job.state, job.accelerator
    if run.flush():
        stop_on_nonfinite(job, run)
    if state.epoch_micro == 0:
        raise DataError(f"{cfg.train_files()[0]}: a pass over the rows gave no batch")
    epoch_mean = acc.reduce(run.sums.epoch_loss, "mean").item() / max(state.epoch_micro, 1)
    epoch_eval = run_eval(job, eval_examples, state.step)
    if epoch_eval is not None:
        state.evals["per_epoch"].append({"epoch": epoch, "step": state.step, **epoch_eval})
    job.logger.log_epoch(epoch, epoch_mean, state.step, epoch_eval)
    if cfg.save_on_epoch_end and state.micro == job.batches_per_epoch:
        save_model(acc, job.model, job.tokenizer, job.train_config,
                   os.path.join(cfg.output_dir, f"checkpoint-epoch-{epoch}"))
    job.say(f"epoch {epoch}: mean loss {epoch_mean:.4f}")
    state.micro, state.epoch_micro, state.epoch = 0, 0, epoch + 1
    run.sums.epoch_loss.zero_()
    run.mark_good()


def checkpoint(job: Job, run: Progress, path: str, snap: tuple[RunState, Sums] | None = None,
               ) -> None:
    """Write a step checkpoint of the state `snap` describes (default: the last good one);
    every process calls it. Loss sums are saved as their mean over the processes: each
    resumes from it, and the mean of (mean + its own new sum) is what an uninterrupted run
    logs."""
    acc = job.accelerator
    at, sums = snap or run.good
    position = dataclasses.replace(
        at, window_loss=acc.reduce(sums.window_loss, "mean").item(),
        window_parts=acc.reduce(sums.window_parts, "mean").tolist(),
        epoch_loss=acc.reduce(sums.epoch_loss, "mean").item(),
        tokens=at.tokens + int(sums.tokens) * job.world,
        elapsed_s=at.elapsed_s + time.perf_counter() - run.start)
    save_step_checkpoint(acc, job.model, job.optimizer, job.scheduler, job.tokenizer,
                         job.train_config, path, {"state": dataclasses.asdict(position),
                                                  "train_args": job.cfg.to_dict()},
                         keep=job.cfg.save_total_limit, sharded=job.sharded)


def stop_on_nonfinite(job: Job, run: Progress) -> None:
    """Save the state before the bad step (weights and optimizer were not touched by it, nor,
    when the device skipped steps, by any after it: guard.py) unless a step checkpoint of it
    exists, then stop with a message naming the step."""
    from accelerate.utils import broadcast_object_list

    at = run.good[0]
    run.bar.close()  # the message goes on a line of its own
    if run.guard.deferred:  # steps after the bad one were skipped; the schedule was not
        rewind(job.scheduler, at.step)
    where = f"the loss is not finite at step {at.step + 1} (epoch {at.epoch})"
    path = os.path.join(job.cfg.output_dir, f"checkpoint-step-{at.step}")
    # The main process decides for all: on several machines the folders may differ.
    main = job.accelerator.is_main_process
    exists = broadcast_object_list([os.path.isdir(path) if main else None])[0]
    if not exists:
        checkpoint(job, run, path)
    raise NonFiniteLossError(
        f"{where}; that step was not applied. The last good state is in {path}: lower --lr, "
        f"check the data or the precision, then continue with --resume_from_checkpoint {path}")


def finish(job: Job, run: Progress) -> tuple[dict[str, Any], EmbeddingModel]:
    """Save final/, write the summary report, curves and model card; hand the model back
    (with PEFT's input casts on, for use outside autocast)."""
    cfg, state, acc = job.cfg, job.state, job.accelerator
    tokens = run.tokens()
    if job.sharding:  # now with the optimizer state the steps made
        loaded = job.sharding["per_process"][acc.process_index]["loaded_before_sharding"]
        job.sharding = shard_sizes(job.model, job.optimizer, acc, loaded)
    save_model(acc, job.model, job.tokenizer, job.train_config,
               os.path.join(cfg.output_dir, "final"))
    trained = acc.unwrap_model(job.model).backbone
    lora_input_casts(trained, enabled=True)
    seconds = run.elapsed()
    trainable, total = job.params
    summary = {
        "config": cfg.to_dict(),
        "embedding": {k: v for k, v in job.train_config.items() if k != "train_args"},
        "world_size": job.world,
        "totals": {"steps": state.step, "samples": state.samples, "tokens": tokens,
                   "seconds": seconds, "padding_share": 1 - tokens / max(state.slots, 1),
                   "samples_per_second": state.samples / seconds,
                   "tokens_per_second": tokens / seconds},
        "final_loss": state.last_loss,
        "rows_with_topped_up_negatives": getattr(job.data, "short_rows", None),
        "trainable_params": trainable,
        "total_params": total,
        "peak_memory": peak_memory(acc.device),
        **({"sharding": job.sharding} if job.sharding else {}),
        "throughput": utilisation(
            trained, trained.config, cfg.finetune_type == "full", tokens,
            state.samples * (1 + cfg.neg_nums) + state.samples, seconds, acc.device,
            autocast_dtype(cfg.mixed_precision)) if acc.is_main_process else {},
        **eval_summary(state.evals, cfg.eval_dataset),
    }
    if acc.is_main_process:
        job.say(done_lines(summary))
        write_json(os.path.join(cfg.output_dir, "training_summary_report.json"), summary)
        job.say(publish(cfg.output_dir, summary, job.tokenizer))  # curves; final/README.md
    job.logger.close()
    trained_model = acc.unwrap_model(job.model)
    job.model = job.optimizer = None  # DDP's reducer goes before the process group it uses
    acc.free_memory()
    acc.end_training()
    return summary, trained_model
