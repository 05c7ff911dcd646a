"""Saving models and adapters so that a folder that looks complete is complete.

Each save goes to `<name>.tmp/` first and is renamed into place only when every file is written;
a run killed mid-save leaves at most a `.tmp` folder, never a half-written `final/`.
Only safetensors weights are written; the optimizer/scheduler/RNG file of a step checkpoint is
read back with `torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from typing import Any

import torch

from embedrag.config import TrainConfig
from embedrag.io import atomic_dir, commit_dir, write_json
from embedrag.model.recipe import Dense
from embedrag.publish.card import write_card
from embedrag.train import shards


def save_model(accelerator: Any, model: Any, tokenizer: Any, training_config: dict[str, Any],
               path: str, extra: Callable[[str], None] | None = None) -> None:
    """Write the adapter (lora/qlora) or the full backbone, the tokenizer and
    training_config.json to `path`, plus whatever `extra(tmp_folder)` writes. Call on every
    process: gathering the weights is collective under FSDP2; only the main
    process writes."""
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        embedder = accelerator.unwrap_model(model)
        prefix = "backbone."
        tmp = atomic_dir(path)
        embedder.backbone.save_pretrained(
            tmp, state_dict={k[len(prefix):]: v for k, v in state.items()
                             if k.startswith(prefix)}, safe_serialization=True)
        embedder.save_head(tmp, state)  # the model's Dense layers, if any
        tokenizer.save_pretrained(tmp)
        write_json(os.path.join(tmp, "training_config.json"), training_config)
        if extra is not None:
            extra(tmp)
        describe(tmp, path, tokenizer)
        commit_dir(tmp, path)
    accelerator.wait_for_everyone()


def describe(tmp: str, path: str, tokenizer: Any) -> None:
    """The model card (README.md, replacing PEFT's blank template) of a folder being saved;
    a card that cannot be written is reported, never a reason to lose the weights."""

    try:
        write_card(tmp, target=path, tokenizer=tokenizer)
    except Exception as e:  # whatever it was, the save itself goes on
        print(f"warning: no model card for {path}: {type(e).__name__}: {e}", file=sys.stderr)


STATE_FILE = "trainer_state.json"     # counters and data position; written last
TENSORS_FILE = "training_state.pt"    # optimizer, scheduler, RNG; loaded with weights_only
STEP_DIR = re.compile(r"checkpoint-step-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_step_checkpoint(accelerator: Any, model: Any, optimizer: Any, scheduler: Any,
                         tokenizer: Any, training_config: dict[str, Any], path: str,
                         state: dict[str, Any], keep: int = 0, sharded: bool = False) -> None:
    """checkpoint-step-N/: the model as in final/, plus optimizer, scheduler, every process's
    RNG states and the data position, all committed at once. Call on every process. Keeps the
    newest `keep` step checkpoints (0: all). `sharded` (FSDP2): weights and optimizer state
    also go in as every process's own shards (`shards.py`), which a resume reads."""
    from accelerate.utils import gather_object

    rngs = gather_object([rng_state()])  # one per process: their dropout streams differ
    staged = path.rstrip("/") + ".shards.tmp"  # moved into the checkpoint as it commits
    if sharded:
        shards.save(model, optimizer, staged, accelerator.is_main_process,
                    accelerator.wait_for_everyone)

    def extra(tmp: str) -> None:
        torch.save({"optimizer": None if sharded else optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rngs},
                   os.path.join(tmp, TENSORS_FILE))
        if sharded:
            os.replace(staged, os.path.join(tmp, shards.SHARDS))
        write_json(os.path.join(tmp, STATE_FILE), state)

    save_model(accelerator, model, tokenizer, training_config, path, extra)
    if keep and accelerator.is_main_process:
        for old in step_checkpoints(os.path.dirname(path))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def step_checkpoints(output_dir: str) -> list[str]:
    """Complete step checkpoints of a run, oldest first (a folder being written is `.tmp`)."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(output_dir: str, spec: str) -> str:
    """`latest` (the newest complete step checkpoint of output_dir) or a checkpoint folder."""
    if spec == "latest":
        found = step_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete "
                                    f"checkpoint-step-N/ in {output_dir}")
        return found[-1]
    if not os.path.isfile(os.path.join(spec, STATE_FILE)):
        raise FileNotFoundError(f"--resume_from_checkpoint {spec}: not a complete step "
                                f"checkpoint (no {STATE_FILE})")
    return spec


def read_step_state(path: str) -> dict[str, Any]:
    """A step checkpoint's trainer_state.json: the position and the flags it was written with,
    read before any tensor is loaded so that a different job is refused by name first."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def load_step_checkpoint(path: str, model: Any, optimizer: Any,
                         scheduler: Any) -> dict[str, Any]:
    """Load weights, optimizer and scheduler into the (unwrapped) model and the prepared
    optimizer; return the RNG states of every process, to restore when the loop resumes. A
    checkpoint with FSDP2 shards is read from them (every process its own)."""
    from safetensors.torch import load_file

    blob = torch.load(os.path.join(path, TENSORS_FILE), map_location="cpu", weights_only=True)
    scheduler.load_state_dict(blob["scheduler"])
    if shards.present(path):
        shards.load(model, optimizer, os.path.join(path, shards.SHARDS))
        return blob["rng"]
    backbone = model.backbone
    adapter = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(adapter):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(backbone, load_file(adapter))
        if result.unexpected_keys:
            raise ValueError(f"{adapter}: unexpected keys {result.unexpected_keys[:3]}")
    else:
        weights: dict[str, torch.Tensor] = {}
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                weights.update(load_file(os.path.join(path, name)))
        missing, unexpected = backbone.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not fit the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")

    for name, module in zip(model.head_names, model.head or [], strict=True):
        module.load_state_dict(Dense.load(path, name).state_dict())
    optimizer.load_state_dict(blob["optimizer"])
    return blob["rng"]


# --- the output folder ---
class OutputDirError(RuntimeError):
    """--output_dir holds an earlier run and the user did not ask to overwrite it."""


# Flags that leave the math of the remaining steps alone; every other flag must be as it was.
# --epochs and --max_steps may change too: the run then continues on the schedule of the new
# total (warm-up and linear decay recomputed for it), which is documented in README.
RESUME_MAY_CHANGE = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "epochs", "max_steps",
    "save_steps", "save_total_limit", "save_on_epoch_end", "logging_steps", "eval_dataset",
    "eval_batch_size", "num_workers", "preprocessing_num_workers", "num_processes",
    "gradient_checkpointing", "grad_cache_chunk_size", "ddp_timeout"})


def check_resumable(cfg: TrainConfig, saved: dict[str, Any], world_size: int,
                    saved_world_size: int) -> None:
    """A resumed run must continue the same job: same data, model, batch composition and
    math. Memory savers (GradCache, gradient checkpointing), saving, logging and evaluation
    flags may change, and so may the length of the run."""
    now = cfg.to_dict()
    saved = dict(saved)
    for k, v in now.items():  # a run saved before the flag took a list: one file
        if isinstance(v, list) and isinstance(saved.get(k), str):
            saved[k] = [saved[k]]
    changed = [f"--{k} {saved[k]!r} -> {now[k]!r}" for k in now
               if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]]
    if world_size != saved_world_size:
        changed.append(f"{saved_world_size} -> {world_size} processes (the batch of every "
                       "step would change)")
    if changed:
        raise OutputDirError("cannot resume with different settings: " + "; ".join(changed)
                             + " (they change what the remaining steps compute; start a new "
                             "run instead)")


RUN_FILES = ("final", "runs", "detailed_training_logs.json", "training_losses.json",
             "training_summary_report.json", "training_curves.png")


def _is_run_entry(name: str) -> bool:
    base = name.removesuffix(".tmp").removesuffix(".old")
    return base in RUN_FILES or base.startswith("checkpoint-")


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder + os.sep)


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse a non-empty --output_dir unless asked, and never one holding the inputs."""
    for flag, path in (("--model_name_or_path", cfg.model_name_or_path),
                       *(("--train_dataset", f) for f in cfg.train_files())):
        if os.path.exists(path) and _inside(path, cfg.output_dir):
            raise OutputDirError(f"--output_dir {cfg.output_dir} holds {flag} {path}; "
                                 "choose a separate output folder")
    out = cfg.output_dir
    resuming = bool(cfg.resume_from_checkpoint)
    if os.path.isdir(out) and os.listdir(out) and not (cfg.overwrite_output_dir or resuming):
        raise OutputDirError(f"--output_dir {cfg.output_dir} is not empty; pass "
                             "--overwrite_output_dir to replace its contents, or "
                             "--resume_from_checkpoint latest to continue it")


def clear_previous_run(output_dir: str) -> None:
    """Remove what an earlier run wrote (and nothing else the user keeps there)."""
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):
        if _is_run_entry(name):
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
