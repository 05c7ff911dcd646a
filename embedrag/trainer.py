"""The training loop, under Hugging Face Accelerate. Read `train` top to bottom."""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from typing import Any

import torch
from tqdm.auto import tqdm

from embedrag import __version__
from embedrag.checkpoints import save_model
from embedrag.config import TrainConfig, write_json
from embedrag.data import Collator, Example, TrainingSet
from embedrag.evaluation import evaluate, format_table
from embedrag.logs import RunLogger, peak_memory
from embedrag.loss import info_nce
from embedrag.modeling import (
    EmbeddingModel,
    EmbedSettings,
    count_parameters,
    load_backbone,
    load_tokenizer,
    max_model_length,
    resolve_append_eos,
)

# bitsandbytes warns on every int8 matmul that it casts fp32 inputs to fp16; once is enough.
warnings.filterwarnings("once", message=".*MatMul8bitLt: inputs will be cast.*")


class OutputDirError(RuntimeError):
    """--output_dir holds an earlier run and the user did not ask to overwrite it."""


RUN_FILES = ("final", "runs", "detailed_training_logs.json", "training_losses.json",
             "training_summary_report.json")


def _is_run_entry(name: str) -> bool:
    base = name.removesuffix(".tmp").removesuffix(".old")
    return base in RUN_FILES or base.startswith("checkpoint-")


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder + os.sep)


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse a non-empty --output_dir unless asked, and never one holding the inputs."""
    for flag, path in (("--model_name_or_path", cfg.model_name_or_path),
                       ("--train_dataset", cfg.train_dataset)):
        if os.path.exists(path) and _inside(path, cfg.output_dir):
            raise OutputDirError(f"--output_dir {cfg.output_dir} holds {flag} {path}; "
                                 "choose a separate output folder")
    out = cfg.output_dir
    if os.path.isdir(out) and os.listdir(out) and not cfg.overwrite_output_dir:
        raise OutputDirError(f"--output_dir {cfg.output_dir} is not empty; pass "
                             "--overwrite_output_dir to replace its contents")


def clear_previous_run(output_dir: str) -> None:
    """Remove what an earlier run wrote (and nothing else the user keeps there)."""
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):
        if _is_run_entry(name):
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D tensors) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


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


def embedding_config(cfg: TrainConfig, tokenizer: Any, append_eos: bool,
                     info: dict[str, Any]) -> dict[str, Any]:
    """training_config.json: all that merge/evaluate need to embed exactly as training did."""
    base = cfg.model_name_or_path
    return {
        "embedrag_version": __version__,
        "base_model": os.path.abspath(base) if os.path.isdir(base) else base,
        "finetune_type": cfg.finetune_type,
        "quantization_bits": cfg.quantization_bits if cfg.finetune_type == "qlora" else None,
        "pooling": cfg.pooling,
        "normalize": True,
        "query_instruction": cfg.query_instruction,
        "passage_instruction": "",
        "query_max_len": cfg.query_max_len,
        "passage_max_len": cfg.passage_max_len,
        "append_eos": append_eos,
        "eos_token": tokenizer.eos_token,
        "padding_side": tokenizer.padding_side,
        "temperature": cfg.temperature,
        "mixed_precision": cfg.mixed_precision,
        **info,
        "train_args": cfg.to_dict(),
    }


def train(cfg: TrainConfig, examples: list[Example], eval_examples: list[Example] | None = None,
          ) -> tuple[dict[str, Any], EmbeddingModel]:
    """Train, save and return (summary report, the trained EmbeddingModel)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision)
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
    accelerator.wait_for_everyone()
    if main:
        clear_previous_run(cfg.output_dir)

    # --- model, optimizer, schedule ---
    backbone, info = load_backbone(cfg, accelerator.device)
    model = EmbeddingModel(backbone, cfg.pooling)
    trainable, total = count_parameters(model)
    optimizer = _optimizer(model, cfg)
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
    logger = RunLogger(cfg.output_dir, enabled=main)
    world = accelerator.num_processes
    say(f"embedrag: {cfg.finetune_type} on {cfg.model_name_or_path} | {len(data)} rows, "
        f"{len(data.passages)} passages | {world} process(es) x batch {cfg.batch_size} x accum "
        f"{cfg.gradient_accumulation_steps} | {total_steps} steps ({warmup_steps} warmup) | "
        f"trainable {trainable:,} of {total:,} params | append_eos={append_eos}")

    def run_eval(step: int) -> dict[str, float] | None:
        """Retrieval metrics on --eval_dataset, on the main process (others wait)."""
        if eval_examples is None:
            return None
        metrics = None
        if main:
            settings = EmbedSettings.from_training_config(train_config)
            with accelerator.autocast():
                metrics = evaluate(accelerator.unwrap_model(model), tokenizer, eval_examples,
                                   settings, batch_size=cfg.eval_batch_size)
            logger.log_eval(metrics, step)
            say(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        accelerator.wait_for_everyone()
        return metrics

    evals = {"before": run_eval(0), "per_epoch": []}

    # --- the loop ---
    model.train()
    step, samples = 0, 0
    tokens_seen = torch.zeros((), dtype=torch.long, device=accelerator.device)
    start = window_start = time.perf_counter()
    window_loss, window_micro, window_samples = torch.zeros((), device=accelerator.device), 0, 0
    last_loss, grad_norm = float("nan"), None
    bar = tqdm(total=total_steps, disable=not main, desc="train", dynamic_ncols=True)
    for epoch in range(1, cfg.epochs + 1):
        data.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        epoch_loss, epoch_micro = torch.zeros((), device=accelerator.device), 0
        for micro, batch in enumerate(loader):
            # Accelerate divides every micro-loss by the accumulation steps; an epoch's last
            # window may be shorter, so rescale to keep its gradient a mean, not a fraction.
            window = min(accum, len(loader) - micro // accum * accum)
            with accelerator.accumulate(model):
                q = model(batch["query_input_ids"], batch["query_attention_mask"])      # (B, D)
                p = model(batch["passage_input_ids"], batch["passage_attention_mask"])  # (B*G, D)
                loss = info_nce(q, p, cfg.temperature, batch["false_negative_mask"])
                accelerator.backward(loss * (accum / window) if window < accum else loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(
                        model.parameters(), cfg.max_grad_norm or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            n = batch["query_input_ids"].shape[0]
            samples += n * world
            window_samples += n * world
            # Counted on the device; read back only when logging (no per-step host sync).
            tokens_seen += batch["query_attention_mask"].sum()
            tokens_seen += batch["passage_attention_mask"].sum()
            window_loss += loss.detach()
            epoch_loss += loss.detach()
            window_micro += 1
            epoch_micro += 1
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step trained at
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            step += 1
            bar.update(1)
            if step % cfg.logging_steps == 0 or step == total_steps:
                now = time.perf_counter()
                tokens = int(tokens_seen) * world
                last_loss = accelerator.reduce(window_loss, "mean").item() / window_micro
                record = {
                    "step": step, "epoch": epoch, "loss": last_loss,
                    "learning_rate": lr,
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "samples_per_second": window_samples / max(now - window_start, 1e-9),
                    "tokens": tokens, "elapsed_s": now - start,
                }
                logger.log_step(record)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['learning_rate']:.2e}",
                                sps=f"{record['samples_per_second']:.1f}")
                window_loss.zero_()
                window_micro, window_samples, window_start = 0, 0, now
            if step >= total_steps:
                break
        epoch_mean = accelerator.reduce(epoch_loss, "mean").item() / max(epoch_micro, 1)
        epoch_eval = run_eval(step)
        if epoch_eval is not None:
            evals["per_epoch"].append({"epoch": epoch, "step": step, **epoch_eval})
        logger.log_epoch(epoch, epoch_mean, step, epoch_eval)
        finished_epoch = epoch_micro == len(loader)
        if cfg.save_on_epoch_end and finished_epoch:
            save_model(accelerator, model, tokenizer, train_config,
                       os.path.join(cfg.output_dir, f"checkpoint-epoch-{epoch}"))
        say(f"epoch {epoch}: mean loss {epoch_mean:.4f}")
        if step >= total_steps:
            break
    bar.close()
    tokens = int(tokens_seen) * world

    save_model(accelerator, model, tokenizer, train_config, os.path.join(cfg.output_dir, "final"))
    seconds = time.perf_counter() - start
    summary = {
        "config": cfg.to_dict(),
        "embedding": {k: v for k, v in train_config.items() if k != "train_args"},
        "world_size": world,
        "totals": {"steps": step, "samples": samples, "tokens": tokens, "seconds": seconds,
                   "samples_per_second": samples / seconds, "tokens_per_second": tokens / seconds},
        "final_loss": last_loss,
        "rows_with_topped_up_negatives": data.short_rows,
        "trainable_params": trainable,
        "total_params": total,
        "peak_memory": peak_memory(accelerator.device),
        **eval_summary(evals, cfg.eval_dataset),
    }
    if main and "eval" in summary:
        m = summary["eval"]["metrics"]
        say(format_table({"before": {k: v["before"] for k, v in m.items()},
                          "after": {k: v["after"] for k, v in m.items()}}))
    if main:
        path = os.path.join(cfg.output_dir, "training_summary_report.json")
        write_json(path + ".tmp", summary)
        os.replace(path + ".tmp", path)
    logger.close()
    accelerator.end_training()
    return summary, accelerator.unwrap_model(model)
