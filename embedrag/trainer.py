"""The training loop, under Hugging Face Accelerate. Read `train` top to bottom."""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any

import torch
from tqdm.auto import tqdm

from embedrag.checkpoints import (
    check_output_dir,
    check_resumable,
    clear_previous_run,
    load_step_checkpoint,
    resolve_checkpoint,
    restore_rng,
    save_model,
    save_step_checkpoint,
)
from embedrag.config import TrainConfig, embedding_config, write_json
from embedrag.data import Collator, Example, TrainingSet
from embedrag.evaluation import evaluate, format_table
from embedrag.logs import RunLogger, peak_memory
from embedrag.loss import embedding_loss, grad_cache_step
from embedrag.modeling import (
    EmbeddingModel,
    EmbedSettings,
    autocast_dtype,
    count_parameters,
    load_backbone,
    load_tokenizer,
    max_model_length,
    resolve_append_eos,
)
from embedrag.perf import native_bf16, utilisation

# bitsandbytes warns on every int8 matmul that it casts fp32 inputs to fp16; once is enough.
warnings.filterwarnings("once", message=".*MatMul8bitLt: inputs will be cast.*")


class LaunchError(RuntimeError):
    """The run was started in a way that would silently waste hardware."""


def check_launch(accelerator: Any, cfg: TrainConfig) -> None:
    """One process with several GPUs visible would train on one of them and leave the others
    idle (the seed runs `CUDA_VISIBLE_DEVICES=0,1 python train.py`). We stop and show the
    data-parallel launch instead of spreading layers over GPUs, which is slower for models that
    fit on one GPU — and QLoRA/LoRA on a 1.5B model always fits."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible > 1 and accelerator.num_processes == 1:
        import shlex
        import sys

        args = " ".join(shlex.quote(a) for a in sys.argv[1:])
        raise LaunchError(f"{visible} GPUs are visible but train.py runs as one process, which "
                          f"would use only one of them. Use all of them with: accelerate launch "
                          f"--num_processes {visible} train.py {args}  (or make one GPU visible "
                          f"with CUDA_VISIBLE_DEVICES=0)")


def test_hook(name: str) -> float:
    """EMBEDRAG_TEST_<name>: fault injection and pacing for the reliability tests; 0 when unset."""
    return float(os.environ.get(f"EMBEDRAG_TEST_{name}", "0"))


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped with the last good state saved."""


def stop_on_nonfinite(output_dir: str, good: tuple, checkpoint: Any) -> None:
    """Save the state before the bad step (weights and optimizer are not yet touched by it)
    unless a step checkpoint of it exists, then stop with a message naming the step."""
    counters = good[0]
    path = os.path.join(output_dir, f"checkpoint-step-{counters['step']}")
    if not os.path.isdir(path):
        checkpoint(path, good)
    raise NonFiniteLossError(
        f"the loss is not finite at step {counters['step'] + 1} (epoch {counters['epoch']}); "
        f"that step was not applied. The last good state is in {path}: lower --lr, check the "
        f"data or the precision, then continue with --resume_from_checkpoint {path}")


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D tensors) get no weight decay. `fused` updates all
    parameters in one kernel (on CPU too) instead of a dozen small ops per tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, fused=fused)


def eval_summary(evals: dict[str, Any], path: str) -> dict[str, Any]:
    """The summary's eval section: each metric before training, after it, and the change."""
    if evals["before"] is None:
        return {}
    after = evals["per_epoch"][-1] if evals["per_epoch"] else evals["before"]
    side_by_side = {m: {"before": v, "after": after[m], "change": after[m] - v}
                    for m, v in evals["before"].items()}
    return {"eval": {"dataset": path, "metrics": side_by_side, "per_epoch": evals["per_epoch"]}}


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int,
                    total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then linear decay. Step s (0-based) trains at lr * factor(s), which is
    never 0: the first warm-up step already moves the weights (transformers' schedule spends
    it at lr 0, so a 1-step run would train nothing), and the last step is not wasted either."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        return max(total - s, 1) / max(total - warmup, 1)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(cfg: TrainConfig, examples: list[Example], eval_examples: list[Example] | None = None,
          ) -> tuple[dict[str, Any], EmbeddingModel]:
    """Train, save and return (summary report, the trained EmbeddingModel)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    if cfg.mixed_precision == "auto":
        cfg.mixed_precision = "bf16" if native_bf16() else "no"
    # cpu=True on machines without CUDA lets `torch.distributed.run` start a MULTI_CPU (gloo) run.
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision,
                              cpu=not torch.cuda.is_available())
    check_launch(accelerator, cfg)
    main = accelerator.is_main_process
    say = tqdm.write if main else (lambda *_: None)
    set_seed(cfg.seed)

    # --- data: tokenized once, re-drawn each epoch ---
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    append_eos = resolve_append_eos(cfg.append_eos, cfg.pooling, tokenizer)
    limit = max_model_length(cfg.model_name_or_path, tokenizer, cfg.trust_remote_code)
    for name in ("query_max_len", "passage_max_len"):
        if limit and getattr(cfg, name) > limit:
            say(f"note: --{name} {getattr(cfg, name)} exceeds what the model takes; using {limit}")
            setattr(cfg, name, limit)
    data = TrainingSet(examples, tokenizer, neg_nums=cfg.neg_nums,
                       query_max_len=cfg.query_max_len, passage_max_len=cfg.passage_max_len,
                       query_instruction=cfg.query_instruction, append_eos=append_eos,
                       seed=cfg.seed, source=cfg.train_dataset)
    if data.short_rows:
        say(f"note: {data.short_rows} of {len(data)} rows have fewer than {cfg.neg_nums} "
            "negatives; they are topped up with other rows' passages")
    loader = torch.utils.data.DataLoader(
        data, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
        collate_fn=Collator(data, tokenizer.pad_token_id, tokenizer.padding_side),
        generator=torch.Generator().manual_seed(cfg.seed))

    # --- output folder: checked by all processes, prepared by the main one ---
    check_output_dir(cfg)
    resume_from = (resolve_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
                   if cfg.resume_from_checkpoint else None)

    # --- model, optimizer, schedule ---
    backbone, info = load_backbone(cfg, accelerator.device)
    model = EmbeddingModel(backbone, cfg.pooling)
    trainable, total = count_parameters(model)
    # Sharded weights (DeepSpeed, FSDP): every process takes part in each forward pass, and
    # the optimizer state is not whole on any one of them (nor are fused kernels known to work).
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    # fp16's GradScaler lets a fused step skip itself, and Accelerate would then not see the
    # skip (and would step the schedule): fused only without fp16.
    optimizer = _optimizer(model, cfg, fused=not sharded and cfg.mixed_precision != "fp16")
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(loader) / accum)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warmup_steps = math.ceil(total_steps * cfg.warmup_proportion)
    # Not prepared by Accelerate: it is stepped here once per optimizer step, on every process.
    scheduler = linear_schedule(optimizer, warmup_steps, total_steps)
    train_config = embedding_config(cfg, tokenizer, append_eos, info)
    world = accelerator.num_processes
    if (cfg.save_steps or cfg.resume_from_checkpoint) and sharded:
        raise LaunchError("--save_steps and --resume_from_checkpoint support one process and "
                          "DDP (accelerate launch --multi_gpu); DeepSpeed and FSDP shard the "
                          "optimizer state, so use their own checkpointing there")

    # Counters and data position: all a step checkpoint needs besides tensors.
    st: dict[str, Any] = {"step": 0, "epoch": 1, "micro": 0, "samples": 0, "tokens": 0,
                          "epoch_loss": 0.0, "epoch_micro": 0, "window_loss": 0.0,
                          "window_micro": 0, "window_samples": 0, "last_loss": float("nan"),
                          "slots": 0,  # token positions incl. padding, for the padding share
                          "evals": {"before": None, "per_epoch": []}, "elapsed_s": 0.0}
    rng = None
    if resume_from:
        saved, rng = load_step_checkpoint(resume_from, accelerator.unwrap_model(model),
                                          optimizer, scheduler)
        check_resumable(cfg, saved["train_args"])
        st.update(saved["state"])
        say(f"resuming from {resume_from}: step {st['step']}, epoch {st['epoch']}, "
            f"{st['micro']} batches into it")
    elif main:
        clear_previous_run(cfg.output_dir)
    accelerator.wait_for_everyone()
    logger = RunLogger(cfg.output_dir, enabled=main, resume_epoch=st["epoch"],
                       resume_step=st["step"] if resume_from else None)
    say(f"embedrag: {cfg.finetune_type} on {cfg.model_name_or_path} | {len(data)} rows, "
        f"{len(data.passages)} passages | {world} process(es) x batch {cfg.batch_size} x accum "
        f"{accum} | {total_steps} steps ({warmup_steps} warmup) | "
        f"trainable {trainable:,} of {total:,} params | append_eos={append_eos}")

    def run_eval(step: int) -> dict[str, float] | None:
        """Retrieval metrics on --eval_dataset: on the main process while the others wait, or
        on all of them (the same computation) when the weights are sharded."""
        if eval_examples is None:
            return None
        metrics = None
        if main or sharded:
            settings = EmbedSettings.from_training_config(train_config)
            with accelerator.autocast():
                metrics = evaluate(model if sharded else accelerator.unwrap_model(model),
                                   tokenizer, eval_examples, settings,
                                   batch_size=cfg.eval_batch_size)
        if main:
            logger.log_eval(metrics, step)
            say(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        accelerator.wait_for_everyone()
        return metrics

    def forward_backward(batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Embed, score and backpropagate one micro-batch; returns its loss."""
        def loss_of(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            p = p[batch["passage_index"]]  # distinct passages -> (B*G, D) slots
            return embedding_loss(q, p, batch["relevant_ids"], batch["passage_ids"],
                                  cfg.temperature, bool(cfg.cross_device_negatives))

        if not cfg.grad_cache_chunk_size:
            q = model(batch["query_input_ids"], batch["query_attention_mask"])      # (B, D)
            p = model(batch["passage_input_ids"], batch["passage_attention_mask"])  # (P', D)
            loss = loss_of(q, p)
            accelerator.backward(loss * scale)
            return loss

        def backward(surrogate: torch.Tensor, last: bool) -> None:
            if last or not accelerator.sync_gradients:  # sync gradients once, at the end
                accelerator.backward(surrogate * scale)
            else:
                with accelerator.no_sync(model):
                    accelerator.backward(surrogate * scale)

        return grad_cache_step(model, batch, cfg.grad_cache_chunk_size, loss_of, backward)

    def snapshot() -> tuple:
        """Counters as of the last finished optimizer step (device scalars: no host sync)."""
        return dict(st), window_loss.clone(), epoch_loss.clone(), tokens_seen.clone()

    def checkpoint(path: str, snap: tuple) -> None:
        counters, w_loss, e_loss, tokens = snap
        position = dict(counters, window_loss=w_loss.item(), epoch_loss=e_loss.item(),
                        tokens=counters["tokens"] + int(tokens) * world,
                        elapsed_s=counters["elapsed_s"] + time.perf_counter() - start)
        save_step_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, train_config,
                             path, {"state": position, "train_args": cfg.to_dict()},
                             keep=cfg.save_total_limit)

    if not resume_from:
        st["evals"]["before"] = run_eval(0)

    # --- the loop ---
    model.train()
    start = window_time = time.perf_counter()
    dev = accelerator.device
    window_loss = torch.tensor(st["window_loss"], device=dev)
    epoch_loss = torch.tensor(st["epoch_loss"], device=dev)
    tokens_seen = torch.zeros((), dtype=torch.long, device=dev)  # since start/resume
    nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
    grad_norm = None
    fault_step = int(test_hook("NAN_AT_STEP"))  # fault injection for the tests
    bar = tqdm(total=total_steps, initial=st["step"], disable=not main, desc="train",
               dynamic_ncols=True)
    good = snapshot()
    if rng is not None:
        restore_rng(rng)  # after every load that drew random numbers (LoRA init, ...)
    for epoch in range(st["epoch"], cfg.epochs + 1):
        st["epoch"] = epoch
        data.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        skip = st["micro"]
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for micro, batch in enumerate(batches, start=skip):
            # Accelerate divides every micro-loss by the accumulation steps; an epoch's last
            # window may be shorter, so rescale to keep its gradient a mean, not a fraction.
            window = min(accum, len(loader) - micro // accum * accum)
            with accelerator.accumulate(model):
                loss = forward_backward(batch, accum / window if window < accum else 1.0)
                if fault_step == st["step"] + 1:
                    loss = loss * float("nan")
                nonfinite |= ~torch.isfinite(loss.detach())
                if accelerator.sync_gradients:
                    if nonfinite.item():  # one host sync per optimizer step
                        stop_on_nonfinite(cfg.output_dir, good, checkpoint)
                    grad_norm = accelerator.clip_grad_norm_(
                        model.parameters(), cfg.max_grad_norm or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            n = batch["query_input_ids"].shape[0] * world
            st["micro"], st["samples"], st["window_samples"] = micro + 1, st["samples"] + n, \
                st["window_samples"] + n
            # Counted on the device; read back only when logging (no per-step host sync).
            tokens_seen += batch["query_attention_mask"].sum()
            tokens_seen += batch["passage_attention_mask"].sum()
            st["slots"] += world * (batch["query_input_ids"].numel()
                                    + batch["passage_input_ids"].numel())
            window_loss += loss.detach()
            epoch_loss += loss.detach()
            st["window_micro"] += 1
            st["epoch_micro"] += 1
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step trained at
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            st["step"] += 1
            step = st["step"]
            bar.update(1)
            time.sleep(test_hook("SLEEP_PER_STEP"))  # lets the tests kill a run mid-way
            if step % cfg.logging_steps == 0 or step == total_steps:
                now = time.perf_counter()
                mean = accelerator.reduce(window_loss, "mean").item()
                st["last_loss"] = mean / st["window_micro"]
                record = {
                    "step": step, "epoch": epoch, "loss": st["last_loss"], "learning_rate": lr,
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "samples_per_second": st["window_samples"] / max(now - window_time, 1e-9),
                    "tokens": st["tokens"] + int(tokens_seen) * world,  # since the run began
                    "elapsed_s": st["elapsed_s"] + now - start,
                }
                logger.log_step(record)
                bar.set_postfix(loss=f"{st['last_loss']:.4f}", lr=f"{lr:.2e}",
                                sps=f"{record['samples_per_second']:.1f}")
                window_loss.zero_()
                st["window_micro"], st["window_samples"], window_time = 0, 0, now
            good = snapshot()
            if cfg.save_steps and step % cfg.save_steps == 0:
                checkpoint(os.path.join(cfg.output_dir, f"checkpoint-step-{step}"), good)
            if step >= total_steps:
                break
        epoch_mean = accelerator.reduce(epoch_loss, "mean").item() / max(st["epoch_micro"], 1)
        epoch_eval = run_eval(st["step"])
        if epoch_eval is not None:
            st["evals"]["per_epoch"].append({"epoch": epoch, "step": st["step"], **epoch_eval})
        logger.log_epoch(epoch, epoch_mean, st["step"], epoch_eval)
        if cfg.save_on_epoch_end and st["micro"] == len(loader):
            save_model(accelerator, model, tokenizer, train_config,
                       os.path.join(cfg.output_dir, f"checkpoint-epoch-{epoch}"))
        say(f"epoch {epoch}: mean loss {epoch_mean:.4f}")
        st.update(micro=0, epoch_micro=0, epoch=epoch + 1)
        epoch_loss.zero_()
        good = snapshot()
        if st["step"] >= total_steps:
            break
    bar.close()
    step, samples, last_loss, evals = st["step"], st["samples"], st["last_loss"], st["evals"]
    tokens = st["tokens"] + int(tokens_seen) * world

    save_model(accelerator, model, tokenizer, train_config, os.path.join(cfg.output_dir, "final"))
    trained = accelerator.unwrap_model(model).backbone
    seconds = st["elapsed_s"] + time.perf_counter() - start
    summary = {
        "config": cfg.to_dict(),
        "embedding": {k: v for k, v in train_config.items() if k != "train_args"},
        "world_size": world,
        "totals": {"steps": step, "samples": samples, "tokens": tokens, "seconds": seconds,
                   "padding_share": 1 - tokens / max(st["slots"], 1),
                   "samples_per_second": samples / seconds, "tokens_per_second": tokens / seconds},
        "final_loss": last_loss,
        "rows_with_topped_up_negatives": data.short_rows,
        "trainable_params": trainable,
        "total_params": total,
        "peak_memory": peak_memory(accelerator.device),
        "throughput": utilisation(
            trained, trained.config, cfg.finetune_type == "full", tokens,
            samples * (1 + cfg.neg_nums) + samples, seconds, accelerator.device,
            autocast_dtype(cfg.mixed_precision)) if main else {},
        **eval_summary(evals, cfg.eval_dataset),
    }
    if main:
        t = summary["throughput"]
        say(f"done: {step} steps, {samples / seconds:.1f} samples/s, {tokens / seconds:,.0f} "
            f"tokens/s, {t['achieved_tflops'] * 1e3:.1f} GFLOP/s = {t['mfu']:.1%} of this "
            f"machine's {t['peak_dtype']} matmul peak ({t['peak_tflops'] * 1e3:.0f} GFLOP/s)")
        if "eval" in summary:
            m = summary["eval"]["metrics"]
            say(format_table({"before": {k: v["before"] for k, v in m.items()},
                              "after": {k: v["after"] for k, v in m.items()}}))
        write_json(os.path.join(cfg.output_dir, "training_summary_report.json"), summary)
    logger.close()
    accelerator.end_training()
    return summary, accelerator.unwrap_model(model)
