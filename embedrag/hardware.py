"""How close training runs to the machine's limit: model FLOPs utilisation (MFU).

MFU = (FLOPs the model needs for the tokens it processed) / seconds / (the machine's measured
matrix-multiply peak in the training dtype). Counting the model's FLOPs rather than the
kernels' makes padding, recomputation and idle time show up as lost utilisation.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn


def hardware() -> str:
    """What this process runs on: its GPUs, else the CPU model and its cores."""
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return ", ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))
    import platform
    import re

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        name = found.group(1).strip() if found else name
    except OSError:
        pass
    return f"CPU: {name}, {os.cpu_count()} cores visible"


def cpu_flags() -> list[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return []
    return line.partition(":")[2].split()


def native_bf16(device: torch.device | None = None) -> bool:
    """Does this hardware run bf16 matmuls natively (CUDA Ampere+, or AVX-512 BF16/AMX CPUs)?"""
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, largest: int = 2048,
                      seconds: float = 1.0) -> float:
    """Best FLOP/s of an n x n matmul on `device` in `dtype`, measured over ~`seconds`.

    n doubles from 256 up to `largest` while one multiply takes under a tenth of `seconds`,
    so a dtype the hardware only emulates (bf16 on a CPU without AVX-512 BF16, where a 2048
    multiply takes tens of seconds) is measured on a smaller matrix in about the same time."""

    def once(a: torch.Tensor, b: torch.Tensor) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    n = 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        once(a, b)  # warm-up (kernel selection, caches)
        took = once(a, b)
        if n >= largest or took * 8 > seconds / 10:
            break
        n *= 2
    best, deadline = 2 * n**3 / took, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        best = max(best, 2 * n**3 / once(a, b))
    return best


def matmul_parameters(model: nn.Module) -> int:
    """Weights that take part in matrix multiplies: every linear layer but LoRA's (token
    embeddings are lookups and cost no FLOPs)."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "lora_" not in name:
            total += module.in_features * module.out_features
    return total


def flops_per_token(model: nn.Module, config: Any, full: bool, mean_length: float) -> float:
    """Forward + backward FLOPs per token. Forward: 2 per matmul weight, plus attention's
    4 * layers * hidden * length. Backward: twice the forward for full fine-tuning (gradients
    for inputs and weights), once under LoRA/QLoRA (frozen weights need input gradients only)."""
    forward = 2 * matmul_parameters(model)
    layers = getattr(config, "num_hidden_layers", 0)
    hidden = getattr(config, "hidden_size", 0)
    forward += 4 * layers * hidden * mean_length
    return forward * (3 if full else 2)


def utilisation(model: nn.Module, config: Any, full: bool, tokens: int, sequences: int,
                seconds: float, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """The summary report's `throughput` section."""
    achieved = flops_per_token(model, config, full, tokens / max(sequences, 1)) * tokens / seconds
    peak = matmul_peak_flops(device, dtype)
    return {"achieved_tflops": achieved / 1e12, "peak_tflops": peak / 1e12,
            "mfu": achieved / peak, "peak_dtype": str(dtype).replace("torch.", "")}
