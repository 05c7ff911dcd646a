"""The training loop, under Hugging Face Accelerate. Read `train` top to bottom."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
import warnings
from typing import Any

import torch
from tqdm.auto import tqdm

from embedrag.config import TrainConfig, embedding_config
from embedrag.data.dataset import Collator
from embedrag.data.mixture import training_data
from embedrag.data.rows import DataError, Example
from embedrag.data.streaming import StreamingSet
from embedrag.eval.evaluate import evaluate
from embedrag.hardware import utilisation
from embedrag.io import write_json
from embedrag.losses import forward_backward, margin_note
from embedrag.model.embedding import (
    EmbeddingModel,
    EmbedSettings,
    count_parameters,
    embedding_width,
    freeze_unreached,
)
from embedrag.model.loading import (
    autocast_dtype,
    load_backbone,
    lora_input_casts,
    max_model_length,
    routes_experts,
    shipped_code_errors,
)
from embedrag.model.recipe import DEFAULTS, decide, load_head, read_recipe
from embedrag.model.tokens import load_tokenizer, resolve_append_eos
from embedrag.publish.card import publish
from embedrag.train.checkpoints import (
    check_output_dir,
    check_resumable,
    clear_previous_run,
    load_step_checkpoint,
    read_step_state,
    resolve_checkpoint,
    restore_rng,
    save_model,
    save_step_checkpoint,
)
from embedrag.train.launch import make_accelerator
from embedrag.train.logs import RunLogger, done_lines, eval_summary, peak_memory
from embedrag.train.optim import linear_schedule, make_optimizer
from embedrag.train.precision import resolve as resolve_precision
from embedrag.train.state import PARTS, RunState, Sums

# bitsandbytes warns on every int8 matmul that it casts fp32 inputs to fp16; once is enough.
warnings.filterwarnings("once", message=".*MatMul8bitLt: inputs will be cast.*")


class LaunchError(RuntimeError):
    """The run was started in a way this setup cannot serve."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped with the last good state saved."""


def train(cfg: TrainConfig, rows: Any, eval_examples: list[Example] | None = None,
          ) -> tuple[dict[str, Any], EmbeddingModel]:
    """Train on `rows` (embedrag.data.formats.load_rows, or a list of Examples), save, and return
    (summary report, the trained EmbeddingModel)."""
    from accelerate.utils import DistributedType, broadcast_object_list, set_seed
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(cfg.model_name_or_path,
                                              trust_remote_code=cfg.trust_remote_code)
    # --- how texts are embedded: flags, else the model's own recipe, else our defaults ---
    recipe = read_recipe(cfg.model_name_or_path)
    decided, sources = decide({name: getattr(cfg, name) for name in DEFAULTS}, recipe)
    for name, value in decided.items():
        setattr(cfg, name, value)
    precision = None  # auto: measured on this shape, or from this machine's cache (precision.py)
    if cfg.mixed_precision == "auto":
        precision = resolve_precision(cfg, model_config)
        cfg.mixed_precision = precision["choice"]
    accelerator = make_accelerator(cfg, cfg.mixed_precision, routes_experts(model_config))
    main = accelerator.is_main_process
    world = accelerator.num_processes
    say = tqdm.write if main else (lambda *_: None)
    set_seed(cfg.seed)
    if precision:
        say(f"precision: {'bf16 autocast' if precision['choice'] == 'bf16' else 'fp32'} "
            f"(auto: {precision['reason']})")

    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    append_eos = resolve_append_eos(cfg.append_eos, cfg.pooling, tokenizer)
    limit = max_model_length(cfg.model_name_or_path, tokenizer, cfg.trust_remote_code)
    for name in ("query_max_len", "passage_max_len"):
        if limit and getattr(cfg, name) > limit:
            say(f"note: {name} {getattr(cfg, name)} exceeds what the model takes; using {limit}")
            setattr(cfg, name, limit)
            sources[name] += f", clamped to the model's {limit}"
    say("embedding: " + ", ".join(f"{name} {getattr(cfg, name)!r} ({sources[name]})"
                                  for name in DEFAULTS))

    # --- data: tokenized once; an epoch re-draws the order and the negatives ---
    texts = {"neg_nums": cfg.neg_nums, "query_max_len": cfg.query_max_len,
             "passage_max_len": cfg.passage_max_len, "query_instruction": cfg.query_instruction,
             "passage_instruction": cfg.passage_instruction, "append_eos": append_eos,
             "seed": cfg.seed}
    collate = Collator(None, tokenizer.pad_token_id, tokenizer.padding_side)
    if cfg.streaming:  # rows drawn through a shuffle buffer and tokenized as they come
        data = StreamingSet(rows, tokenizer, buffer=cfg.shuffle_buffer, **texts)
        loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size,
                                             num_workers=cfg.num_workers, collate_fn=collate)
        datasets_used = [{"path": cfg.train_files()[0], "streamed": True}]
    else:
        # One file in a seeded order; several, one file per optimizer step (mixture.py).
        with accelerator.main_process_first():  # one process tokenizes, the others read it
            data, sampler, datasets_used = training_data(
                rows, tokenizer, cfg, texts, world * cfg.batch_size
                * cfg.gradient_accumulation_steps)
        collate.data = data
        if data.short_rows:
            say(f"note: {data.short_rows} of {len(data)} rows have fewer than {cfg.neg_nums} "
                "negatives; they are topped up with other rows' passages")
        # The loader's own generator only seeds its workers; keeping it off the global
        # generator leaves dropout's random stream to the model.
        loader = torch.utils.data.DataLoader(
            data, batch_size=cfg.batch_size, sampler=sampler,
            num_workers=cfg.num_workers, collate_fn=collate,
            generator=torch.Generator().manual_seed(cfg.seed))

    # --- output folder: checked by all processes, prepared by the main one ---
    check_output_dir(cfg)
    resume_from = (resolve_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
                   if cfg.resume_from_checkpoint else None)
    saved = read_step_state(resume_from) if resume_from else None
    if saved:  # the same job, or refused by name before any weight is loaded
        check_resumable(cfg, saved["train_args"], world, saved["state"].get("world_size", world))

    # --- model, optimizer, schedule ---
    backbone, info = load_backbone(cfg, accelerator.device)
    lora_input_casts(backbone, enabled=cfg.mixed_precision == "no")  # autocast casts them
    head = load_head(cfg.model_name_or_path, recipe.dense)  # the model's Dense layers, if any
    if head is not None:
        head.to(accelerator.device).requires_grad_(cfg.finetune_type == "full")
    model = EmbeddingModel(backbone, cfg.pooling, head, recipe.dense)
    unused = []
    # Not for mixtures of experts: two tokens reach only the experts they are routed to.
    if not routes_experts(model_config):
        with shipped_code_errors(cfg.model_name_or_path, cfg.trust_remote_code), \
                accelerator.autocast():
            unused = freeze_unreached(model, tokenizer)  # also the model's first forward
    if unused:
        say(f"note: {len(unused)} parameter tensor(s) the embedding does not use are frozen "
            f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''})")
    width = embedding_width(model)
    if cfg.matryoshka() and cfg.matryoshka()[0][0] > width:
        raise LaunchError(f"--matryoshka_dims {cfg.matryoshka_dims}: the model's embeddings "
                          f"have {width} dimensions")
    info.update(frozen_unused_parameters=unused, settings_from=sources,
                dense_modules=recipe.dense, attention=cfg.attention, embedding_dim=width,
                matryoshka_dims=[d for d, _ in cfg.matryoshka()] or None,
                datasets=datasets_used, precision_auto=precision)
    trainable, total = count_parameters(model)
    # Sharded weights (DeepSpeed, FSDP): every process takes part in each forward pass, and
    # the optimizer state is not whole on any one of them (nor are fused kernels known to work).
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    if (cfg.save_steps or cfg.resume_from_checkpoint) and sharded:
        raise LaunchError("--save_steps and --resume_from_checkpoint support one process and "
                          "DDP (accelerate launch --multi_gpu); DeepSpeed and FSDP shard the "
                          "optimizer state, so use their own checkpointing there")
    # fp16's GradScaler lets a fused step skip itself, and Accelerate would then not see the
    # skip (and would step the schedule): fused only without fp16.
    optimizer = make_optimizer(model, cfg, fused=not sharded and cfg.mixed_precision != "fp16")
    embedder = model  # the module itself, inside whatever Accelerate wraps it in
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accum = cfg.gradient_accumulation_steps
    batches_per_epoch = None if cfg.streaming else len(loader)  # a stream's length is unknown
    total_steps = cfg.max_steps or math.ceil(batches_per_epoch / accum) * cfg.epochs
    if batches_per_epoch:
        total_steps = min(total_steps, math.ceil(batches_per_epoch / accum) * cfg.epochs)
    warmup_steps = math.ceil(total_steps * cfg.warmup_proportion)
    # Not prepared by Accelerate: it is stepped here once per optimizer step, on every process.
    scheduler = linear_schedule(optimizer, warmup_steps, total_steps)
    train_config = embedding_config(cfg, tokenizer, append_eos, info)

    # --- where the run stands: fresh, or as a step checkpoint left it ---
    state = RunState(world_size=world)
    rngs = None
    if saved:
        rngs = load_step_checkpoint(resume_from, accelerator.unwrap_model(model), optimizer,
                                    scheduler)
        state = RunState.from_dict(saved["state"])
        say(f"resuming from {resume_from}: step {state.step}, epoch {state.epoch}, "
            f"{state.micro} batches into it")
    if main:
        os.makedirs(cfg.output_dir, exist_ok=True)  # a resume may continue in a new folder
        if not resume_from:
            clear_previous_run(cfg.output_dir)
    accelerator.wait_for_everyone()
    logger = RunLogger(cfg.output_dir, enabled=main, resume_epoch=state.epoch,
                       resume_step=state.step if resume_from else None)
    rows_seen = ("streamed rows" if cfg.streaming else f"{len(data)} rows, "
                 f"{sum(d['passages'] for d in datasets_used)} passages"
                 + (f" in {len(datasets_used)} files" if len(datasets_used) > 1 else ""))
    say(f"embedrag: {cfg.finetune_type} on {cfg.model_name_or_path} | {rows_seen} | "
        f"{world} process(es) x batch {cfg.batch_size} x accum "
        f"{accum} | {total_steps} steps ({warmup_steps} warmup) | "
        f"trainable {trainable:,} of {total:,} params | append_eos={append_eos}")

    def run_eval(step: int) -> dict[str, float] | None:
        """Retrieval metrics on --eval_dataset, every process embedding its share of the texts
        (all of them, through the sharded model, when the weights are sharded)."""
        if eval_examples is None:
            return None
        settings = EmbedSettings.from_training_config(train_config)
        with accelerator.autocast():
            metrics = evaluate(model if sharded else accelerator.unwrap_model(model),
                               tokenizer, eval_examples, settings,
                               batch_size=cfg.eval_batch_size,
                               accelerator=None if sharded else accelerator,
                               dims=[d for d, _ in cfg.matryoshka()])
        logger.log_eval(metrics, step)
        say(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def checkpoint(path: str, snap: tuple[RunState, Sums]) -> None:
        """Write a step checkpoint of the state `snap` describes (every process calls it)."""
        at, sums = snap
        # Loss sums as their mean over the processes: each resumes from it, and the mean of
        # (mean + its own new sum) over processes is what an uninterrupted run logs.
        position = dataclasses.replace(
            at, window_loss=accelerator.reduce(sums.window_loss, "mean").item(),
            window_parts=accelerator.reduce(sums.window_parts, "mean").tolist(),
            epoch_loss=accelerator.reduce(sums.epoch_loss, "mean").item(),
            tokens=at.tokens + int(sums.tokens) * world,
            elapsed_s=at.elapsed_s + time.perf_counter() - start)
        save_step_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, train_config,
                             path, {"state": dataclasses.asdict(position),
                                    "train_args": cfg.to_dict()},
                             keep=cfg.save_total_limit)

    def stop_on_nonfinite(good: tuple[RunState, Sums]) -> None:
        """Save the state before the bad step (weights and optimizer are not yet touched by
        it) unless a step checkpoint of it exists, then stop with a message naming the step.
        Sharded runs (DeepSpeed, FSDP) cannot resume from a step checkpoint, and DeepSpeed's
        engine steps inside backward: they just stop."""
        at = good[0]
        bar.close()  # the message goes on a line of its own
        where = f"the loss is not finite at step {at.step + 1} (epoch {at.epoch})"
        if sharded:
            raise NonFiniteLossError(f"{where}; stopped without a step checkpoint (DeepSpeed "
                                     "and FSDP runs restart from their own checkpoints): lower "
                                     "--lr, check the data or the precision")
        path = os.path.join(cfg.output_dir, f"checkpoint-step-{at.step}")
        # The main process decides for all: on several machines the folders may differ.
        exists = broadcast_object_list([os.path.isdir(path) if main else None])[0]
        if not exists:
            checkpoint(path, good)
        raise NonFiniteLossError(
            f"{where}; that step was not applied. The last good state is in {path}: lower "
            f"--lr, check the data or the precision, then continue with "
            f"--resume_from_checkpoint {path}")

    if not resume_from:
        state.evals["before"] = run_eval(0)

    # --- the loop ---
    model.train()
    start = window_time = time.perf_counter()
    sums = Sums.start(state, accelerator.device)
    nonfinite = torch.zeros((), device=accelerator.device)
    grad_norm = None
    bar = tqdm(total=total_steps, initial=state.step, disable=not main, desc="train",
               dynamic_ncols=True)
    good = (dataclasses.replace(state), sums.clone())
    if rngs is not None:  # after every load that drew random numbers (LoRA init, ...)
        restore_rng(rngs[accelerator.process_index] if isinstance(rngs, list) else rngs)
    # A stream is read again, reshuffled, until --max_steps; a table for --epochs.
    epochs = itertools.count(state.epoch) if cfg.streaming else range(state.epoch,
                                                                       cfg.epochs + 1)
    for epoch in epochs:
        state.epoch = epoch
        data.set_epoch(epoch)    # which positive and negatives each row draws
        loader.set_epoch(epoch)  # the order of the rows
        skip = state.micro
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for micro, batch in enumerate(batches, start=skip):
            # Accelerate divides every micro-loss by the accumulation steps; an epoch's last
            # window may be shorter, so rescale to keep its gradient a mean, not a fraction.
            window = accum if batches_per_epoch is None else \
                min(accum, batches_per_epoch - micro // accum * accum)
            with accelerator.accumulate(model):
                loss, parts = forward_backward(accelerator, model, batch, cfg,
                                               accum / window if window < accum else 1.0)
                nonfinite += ~torch.isfinite(loss.detach())
                if "margin_dropped" in parts and state.step == 0 and micro == skip:
                    share = accelerator.reduce(parts["margin_dropped"], "mean").item()
                    if share > 0.5:
                        say(margin_note(cfg.false_negative_margin, share))
                if accelerator.sync_gradients:
                    # One host sync per optimizer step, agreed by all processes: a NaN on one
                    # of them stops them all at the same step.
                    if accelerator.reduce(nonfinite, "sum").item():
                        stop_on_nonfinite(good)
                    grad_norm = accelerator.clip_grad_norm_(
                        model.parameters(), cfg.max_grad_norm or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            n = batch["query_input_ids"].shape[0] * world
            state.micro, state.samples, state.window_samples = (
                micro + 1, state.samples + n, state.window_samples + n)
            # Tokens are counted on the device and read back only when logging; the positions
            # computed (packed, or in length buckets) are known on the host from the masks.
            sums.tokens += batch["query_attention_mask"].sum()
            sums.tokens += batch["passage_attention_mask"].sum()
            state.slots += world * (embedder.computed_positions(batch["query_attention_mask"])
                                    + embedder.computed_positions(batch["passage_attention_mask"]))
            sums.window_loss += loss.detach()
            for i, name in enumerate(PARTS):
                if name in parts:
                    sums.window_parts[i] += parts[name]
            sums.epoch_loss += loss.detach()
            state.window_micro += 1
            state.epoch_micro += 1
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step trained at
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            state.step += 1
            step = state.step
            bar.update(1)
            if step % cfg.logging_steps == 0 or step == total_steps:
                now = time.perf_counter()
                state.last_loss = (accelerator.reduce(sums.window_loss, "mean").item()
                                   / state.window_micro)
                record = {
                    "step": step, "epoch": epoch, "loss": state.last_loss, "learning_rate": lr,
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "samples_per_second": state.window_samples / max(now - window_time, 1e-9),
                    "tokens": state.tokens + int(sums.tokens) * world,  # since the run began
                    "elapsed_s": state.elapsed_s + now - start,
                }
                if cfg.kd_weight or cfg.matryoshka_dims:  # the loss's parts, as means
                    means = accelerator.reduce(sums.window_parts, "mean") / state.window_micro
                    record.update({f"loss_{name}": v for name, v in zip(
                        PARTS, means.tolist(), strict=True) if name != "kd" or cfg.kd_weight})
                logger.log_step(record)
                bar.set_postfix(loss=f"{state.last_loss:.4f}", lr=f"{lr:.2e}",
                                sps=f"{record['samples_per_second']:.1f}")
                sums.window_loss.zero_()
                sums.window_parts.zero_()
                state.window_micro, state.window_samples, window_time = 0, 0, now
            good = (dataclasses.replace(state), sums.clone())
            if cfg.save_steps and step % cfg.save_steps == 0:
                checkpoint(os.path.join(cfg.output_dir, f"checkpoint-step-{step}"), good)
            if step >= total_steps:
                break
        if state.epoch_micro == 0:
            raise DataError(f"{cfg.train_files()[0]}: a pass over the rows gave no batch")
        epoch_mean = (accelerator.reduce(sums.epoch_loss, "mean").item()
                      / max(state.epoch_micro, 1))
        epoch_eval = run_eval(state.step)
        if epoch_eval is not None:
            state.evals["per_epoch"].append({"epoch": epoch, "step": state.step, **epoch_eval})
        logger.log_epoch(epoch, epoch_mean, state.step, epoch_eval)
        if cfg.save_on_epoch_end and state.micro == batches_per_epoch:
            save_model(accelerator, model, tokenizer, train_config,
                       os.path.join(cfg.output_dir, f"checkpoint-epoch-{epoch}"))
        say(f"epoch {epoch}: mean loss {epoch_mean:.4f}")
        state.micro, state.epoch_micro, state.epoch = 0, 0, epoch + 1
        sums.epoch_loss.zero_()
        good = (dataclasses.replace(state), sums.clone())
        if state.step >= total_steps:
            break
    bar.close()
    tokens = state.tokens + int(sums.tokens) * world

    save_model(accelerator, model, tokenizer, train_config, os.path.join(cfg.output_dir, "final"))
    trained = accelerator.unwrap_model(model).backbone
    lora_input_casts(trained, enabled=True)  # for use outside autocast
    seconds = state.elapsed_s + time.perf_counter() - start
    summary = {
        "config": cfg.to_dict(),
        "embedding": {k: v for k, v in train_config.items() if k != "train_args"},
        "world_size": world,
        "totals": {"steps": state.step, "samples": state.samples, "tokens": tokens,
                   "seconds": seconds, "padding_share": 1 - tokens / max(state.slots, 1),
                   "samples_per_second": state.samples / seconds,
                   "tokens_per_second": tokens / seconds},
        "final_loss": state.last_loss,
        "rows_with_topped_up_negatives": getattr(data, "short_rows", None),
        "trainable_params": trainable,
        "total_params": total,
        "peak_memory": peak_memory(accelerator.device),
        "throughput": utilisation(
            trained, trained.config, cfg.finetune_type == "full", tokens,
            state.samples * (1 + cfg.neg_nums) + state.samples, seconds, accelerator.device,
            autocast_dtype(cfg.mixed_precision)) if main else {},
        **eval_summary(state.evals, cfg.eval_dataset),
    }
    if main:
        say(done_lines(summary))
        write_json(os.path.join(cfg.output_dir, "training_summary_report.json"), summary)
        say(publish(cfg.output_dir, summary, tokenizer))  # training_curves.png; final/README.md
    logger.close()
    trained_model = accelerator.unwrap_model(model)
    model = optimizer = None  # DDP's reducer goes before the process group it talks through
    accelerator.free_memory()
    accelerator.end_training()
    return summary, trained_model
