"""Saving models and adapters so that a folder that looks complete is complete.

Each save goes to `<name>.tmp/` first and is renamed into place only when every file is written;
a run killed mid-save leaves at most a `.tmp` folder, never a half-written `final/`.
Only safetensors weights are written; the optimizer/scheduler/RNG file of a step checkpoint is
read back with `torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from embedrag.config import TrainConfig, write_json


def atomic_dir(path: str) -> str:
    """A fresh temporary sibling of `path` to write into before `commit_dir`."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit_dir(tmp: str, path: str) -> None:
    """Move a finished temporary folder into place, replacing an older one at `path`."""
    old = path.rstrip("/") + ".old"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_model(accelerator: Any, model: Any, tokenizer: Any, training_config: dict[str, Any],
               path: str, extra: Callable[[str], None] | None = None) -> None:
    """Write the adapter (lora/qlora) or the full backbone, the tokenizer and
    training_config.json to `path`, plus whatever `extra(tmp_folder)` writes. Call on every
    process: gathering the weights is collective under DeepSpeed ZeRO-3 and FSDP; only the main
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
    from embedrag.card import write_card

    try:
        write_card(tmp, target=path, tokenizer=tokenizer)
    except Exception as e:  # whatever it was, the save itself goes on
        print(f"warning: no model card for {path}: {type(e).__name__}: {e}", file=sys.stderr)


# --- step checkpoints: everything needed to continue exactly where a run stopped ---
@dataclass
class RunState:
    """Where a run stands: everything a step checkpoint holds besides tensors, in one place.

    Running sums that would need the device to answer (losses, token counts) are kept as
    device tensors in `Sums` between log points and folded in here when a checkpoint is
    written, so the loop waits for the device once per optimizer step, not once per counter."""

    step: int = 0            # optimizer steps done
    epoch: int = 1           # the epoch in progress (1-based)
    micro: int = 0           # micro-batches of this epoch done on each process
    samples: int = 0         # queries trained on, all processes
    tokens: int = 0          # real tokens fed to the model before this process started
    slots: int = 0           # token positions incl. padding, for the padding share
    epoch_micro: int = 0
    window_micro: int = 0    # micro-batches since the last log record
    window_samples: int = 0
    epoch_loss: float = 0.0  # loss sums, as of the checkpoint
    window_loss: float = 0.0
    window_parts: list[float] = field(default_factory=lambda: [0.0, 0.0])  # PARTS' sums
    last_loss: float = float("nan")
    elapsed_s: float = 0.0
    world_size: int = 1
    evals: dict[str, Any] = field(default_factory=lambda: {"before": None, "per_epoch": []})

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> RunState:
        return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})


@dataclass
class Sums:
    """Device-side running sums since this process started (or resumed)."""

    window_loss: torch.Tensor
    epoch_loss: torch.Tensor
    tokens: torch.Tensor
    window_parts: torch.Tensor  # (len(PARTS),) the loss's parts, when a recipe splits it

    @classmethod
    def start(cls, state: RunState, device: torch.device) -> Sums:
        return cls(torch.tensor(state.window_loss, device=device),
                   torch.tensor(state.epoch_loss, device=device),
                   torch.zeros((), dtype=torch.long, device=device),
                   torch.tensor(state.window_parts, device=device))

    def clone(self) -> Sums:
        return Sums(*(t.clone() for t in dataclasses.astuple(self)))


PARTS = ("infonce", "kd")  # logged as loss_infonce, loss_kd when the loss has parts
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
                         state: dict[str, Any], keep: int = 0) -> None:
    """checkpoint-step-N/: the model as in final/, plus optimizer, scheduler, every process's
    RNG states and the data position, all committed at once. Call on every process. Keeps the
    newest `keep` step checkpoints (0: all)."""
    from accelerate.utils import gather_object

    rngs = gather_object([rng_state()])  # one per process: their dropout streams differ

    def extra(tmp: str) -> None:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rngs}, os.path.join(tmp, TENSORS_FILE))
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
    optimizer; return the RNG states of every process, to restore when the loop resumes."""
    from safetensors.torch import load_file

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
    from embedrag.recipe import Dense

    for name, module in zip(model.head_names, model.head or [], strict=True):
        module.load_state_dict(Dense.load(path, name).state_dict())
    blob = torch.load(os.path.join(path, TENSORS_FILE), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
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
    "gradient_checkpointing", "grad_cache_chunk_size"})


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
