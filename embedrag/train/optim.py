"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import torch


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, fused: bool,
                   kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (`kind`: adamw, adamw_8bit or paged_adamw_8bit); biases and norm weights (1-D
    tensors) get no weight decay. `fused` (PyTorch's AdamW) updates all parameters in one
    kernel (on CPU too) instead of a dozen small ops per tensor, and can skip a step on the
    device (train/guard.py). bitsandbytes' 8-bit AdamW keeps both moments in 8 bits, blockwise
    quantized (on CPUs too); the paged one lets them move to host memory under pressure."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused)
    import bitsandbytes as bnb

    eight_bit = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}
    return eight_bit[kind](groups, lr=lr)


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


def rewind(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    """Put the schedule (and the optimizer's learning rates) back to where it stood after
    `steps` optimizer steps."""
    scheduler.last_epoch, scheduler._step_count = steps, steps + 1  # as `steps` calls leave it
    rates = [base * f(steps) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas,
                                                 strict=True)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates
