"""Stopping on a non-finite loss without reading the device at every step.

A run stops at the first optimizer step whose loss is not finite (on any process), with its
weights, optimizer and data position as they were before that step. Finding that out by
reading a flag from the device every step would make the host wait for the device every
step. PyTorch's fused AdamW can instead skip a step on the device: it reads a `found_inf`
tensor (what its gradient scaler uses) and, where it is non-zero, leaves weights, moments and
step counts untouched. The flag here is sticky: from the first bad step on, every step is
skipped, so the weights stay those of the last good step until the loop next reads the flag —
at a logging step, a checkpoint, the end of an epoch or of the run — and stops there, naming
the first bad step. Optimizers that cannot skip on the device (bitsandbytes' 8-bit AdamW,
the unfused AdamW of FSDP2 and fp16 runs) are read every step instead.
"""

from __future__ import annotations

from typing import Any

import torch


def can_skip_on_device(optimizer: Any) -> bool:
    """torch's AdamW/Adam with fused=True honour `found_inf` (the others refuse it)."""
    return (isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
            and bool(optimizer.defaults.get("fused")))


class NonfiniteGuard:
    """Counts, on the device, the optimizer steps since the start whose loss was not finite
    on some process, and remembers the first of them."""

    def __init__(self, optimizer: Any, device: torch.device):
        inner = getattr(optimizer, "optimizer", optimizer)  # inside Accelerate's wrapper
        self.deferred = can_skip_on_device(inner)
        # float32 whatever the default dtype: the fused kernels read it as such
        self.bad = torch.zeros((), dtype=torch.float32, device=device)  # 1.0 once tripped
        self.steps = torch.zeros((), dtype=torch.long, device=device)  # steps observed
        self.first = torch.full((), -1, dtype=torch.long, device=device)
        if self.deferred:
            inner.found_inf = self.bad  # read by every fused step from now on

    def observe(self, nonfinite: torch.Tensor) -> None:
        """Fold in one optimizer step: `nonfinite` counts the non-finite micro-losses so far,
        summed over the processes (so every process trips at the same step)."""
        self.steps += 1
        tripped = nonfinite > 0
        self.first.copy_(torch.where(tripped & (self.first < 0), self.steps, self.first))
        self.bad.copy_(torch.maximum(self.bad, tripped.to(self.bad.dtype)))

    def first_bad_step(self) -> int | None:
        """The 1-based optimizer step of the run (counted from the guard's start) whose loss
        was first not finite, or None. Reads the device."""
        first = int(self.first)
        return first if first > 0 else None
