"""Where a run stands: the counters a step checkpoint saves and the loss sums kept on the device."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


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
