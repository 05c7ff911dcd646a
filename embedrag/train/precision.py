"""`--mixed_precision auto` (the default): the precision a run trains in when no one said.

Said elsewhere: an explicit `--mixed_precision no|fp16|bf16` wins, then the `mixed_precision`
of the accelerate config `accelerate launch` ran with (bf16 or fp16; its "no" is also the value
of a config that never set one, so it does not count). Otherwise:

- a CUDA GPU that runs bf16 natively (Ampere and later) trains under bf16 autocast, with TF32
  for the matmuls that stay in fp32; older GPUs and other devices train in fp32;
- a CPU takes bf16 or fp32, whichever trains this model faster on this machine.

Whether bf16 autocast pays depends on more than the hardware's bf16 support: a CPU whose bf16
matmuls are faster can still train a whole model slower in bf16 (casts, attention and
element-wise work around the matmuls), while CPUs with matrix units gain. No rule from flags
gets both right, so `auto` measures (figures in docs/benchmarks.md):
one transformer layer of the model's own shape (random weights, so the probe costs no load)
runs a forward and backward pass on a batch of the run's shape, as the run will (weights
trainable or frozen in the compute dtype, EmbedRAG's CPU kernels), a few times in each
precision; the faster wins. The result is cached per machine, library versions and shape in
$EMBEDRAG_CACHE/precision.json (default ~/.cache/embedrag), so only the first run pays its
few seconds. Without native bf16 (older CPUs, GPUs before Ampere) fp32 is chosen unmeasured.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import torch

from embedrag.cpu import kernels
from embedrag.hardware import cpu_flags, hardware, native_bf16
from embedrag.io import write_json
from embedrag.model.loading import model_config

PROBE_TOKENS = 2048  # positions per probe pass: long enough to time, short enough to not wait
ROUNDS = 3           # timed passes per precision, alternating; the fastest of each counts


def cache_path() -> str:
    root = os.environ.get("EMBEDRAG_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "embedrag"))
    return os.path.join(root, "precision.json")


def probe_shape(cfg: Any) -> tuple[int, int]:
    """(rows, length) of a probe pass: passages at the run's length (capped at 512), as many
    as the run's batch has or PROBE_TOKENS allow."""
    length = max(8, min(cfg.passage_max_len, 512))
    rows = max(1, min(cfg.batch_size * (1 + cfg.neg_nums), PROBE_TOKENS // length))
    return rows, length


def cache_key(cfg: Any, model_config: Any, device: torch.device) -> str:
    """What the answer depends on: hardware and its flags, threads, library versions, the
    layer's shape and attention, how it trains, the probe's shape."""
    import transformers

    flags = " ".join(cpu_flags()) if device.type == "cpu" else ""
    text = model_config.get_text_config()
    shape = {k: getattr(text, k, None) for k in (
        "model_type", "hidden_size", "intermediate_size", "num_attention_heads",
        "num_key_value_heads", "head_dim", "hidden_act", "attention_dropout",
        "attention_probs_dropout_prob")}
    parts = [hardware(), device.type, flags, str(torch.get_num_threads()), torch.__version__,
             transformers.__version__, json.dumps(shape, sort_keys=True),
             cfg.finetune_type, cfg.attention, str(cfg.attention_dropout), cfg.cpu_kernels,
             str(bool(cfg.gradient_checkpointing)), str(probe_shape(cfg))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def probe_layer(cfg: Any, device: torch.device) -> Any:
    """The model with one transformer layer, random weights, set up as the run trains it."""
    from transformers import AutoModel

    config = model_config(cfg.model_name_or_path, attention=cfg.attention,
                          attention_dropout=cfg.attention_dropout,
                          trust_remote_code=cfg.trust_remote_code)
    for c in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        c.num_hidden_layers = 1
        if getattr(c, "layer_types", None):
            c.layer_types = c.layer_types[:1]
    torch.manual_seed(0)
    model = AutoModel.from_config(config, trust_remote_code=cfg.trust_remote_code).to(device)
    if cfg.cpu_kernels == "auto":
        kernels.install(model, device)
    return model.train()


def time_step(model: Any, dtype: torch.dtype, full: bool, rows: int, length: int,
              device: torch.device) -> float:
    """Seconds of one forward and backward pass of `model` under autocast to `dtype`."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (rows, length), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    mask = torch.ones_like(ids)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        embeds = model.get_input_embeddings()(ids)
        if not full:  # frozen weights: the backward pass computes input gradients only
            embeds = embeds.detach().requires_grad_()
        out = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    out.float().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(cfg: Any, device: torch.device) -> dict[str, float]:
    """Fastest seconds per probe pass in fp32 and in bf16 (after a warm-up pass of each)."""
    full = cfg.finetune_type == "full"
    rows, length = probe_shape(cfg)
    models = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = probe_layer(cfg, device)
        if not full:  # the frozen base sits in the compute dtype, as load_backbone puts it
            model.to(dtype).requires_grad_(False)
        models[name] = (model, dtype)
    best = {name: float("inf") for name in models}
    for round_ in range(ROUNDS + 1):
        for name, (model, dtype) in models.items():
            seconds = time_step(model, dtype, full, rows, length, device)
            model.zero_grad(set_to_none=True)
            if round_:  # round 0 warms up (kernel selection, allocator)
                best[name] = min(best[name], seconds)
    return best


def choose(cfg: Any, model_config: Any, device: torch.device) -> dict[str, Any]:
    """Decide `auto` on this process: {"choice": "bf16"|"no", "reason": ..., ...}."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if native_bf16(device):
            return {"choice": "bf16", "tf32": True,
                    "reason": f"{name} runs bf16 natively; TF32 for what stays fp32"}
        return {"choice": "no", "reason": f"{name} has no native bf16"}
    if device.type != "cpu":
        return {"choice": "no", "reason": f"fp32 on {device.type}"}
    if not native_bf16(device):
        return {"choice": "no", "reason": f"no native bf16 on {hardware()}"}
    path, key = cache_path(), cache_key(cfg, model_config, device)
    try:
        with open(path, encoding="utf-8") as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    found = known.get(key)
    if found is None:
        seconds = measure(cfg, device)
        found = {"fp32_seconds": seconds["fp32"], "bf16_seconds": seconds["bf16"],
                 "hardware": hardware(), "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        known[key] = found
        try:  # a read-only home still trains; it only measures again next time
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_json(path, known)
        except OSError:
            pass
        how = "measured now"
    else:
        how = f"measured {found['measured']}, cached in {path}"
    fp32, bf16 = found["fp32_seconds"], found["bf16_seconds"]
    choice = "bf16" if bf16 < fp32 else "no"
    rows, length = probe_shape(cfg)
    reason = (f"a {rows}x{length}-token forward+backward of one layer of this model took "
              f"{bf16 * 1e3:.0f} ms in bf16 and {fp32 * 1e3:.0f} ms in fp32 on {found['hardware']}"
              f" ({how})")
    return {"choice": choice, "reason": reason, "fp32_seconds": fp32, "bf16_seconds": bf16}


def from_launcher() -> str | None:
    """The accelerate config's mixed_precision, when `accelerate launch` passed one that
    chooses (bf16, fp16)."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    return value if value in ("bf16", "fp16") else None


def resolve(cfg: Any, model_config: Any, state: Any) -> dict[str, Any]:
    """What `auto` means for this run: {"choice": "no"|"fp16"|"bf16", "reason": ..., ...},
    decided once, by the main process, and the same answer given to every process (they
    must agree: each builds its Accelerator from it). `state`: this process's place in the
    run (`launch.process_state`)."""
    from accelerate.utils import broadcast_object_list

    launcher = from_launcher()
    if launcher:
        return {"choice": launcher, "reason": "the accelerate config's mixed_precision"}
    decided = [choose(cfg, model_config, state.device) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(decided)
    return decided[0]


def allow_tf32() -> None:
    """fp32 matmuls and convolutions on CUDA in TF32 (10-bit mantissa inputs, fp32 sums),
    through transformers' switch (torch's API for it changed in 2.9)."""
    from transformers.utils import enable_tf32

    enable_tf32(True)
