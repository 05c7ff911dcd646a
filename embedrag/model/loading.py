"""Turning a model path into a model ready to train or to embed with.

Everything that decides *which* network a path becomes lives here: the model's own
configuration (with the attention and dropout EmbedRAG was asked for), its shipped code (never
run, nor silently replaced, unless asked), quantization, and the LoRA/QLoRA/full set-up.
`load_backbone` builds what train.py trains; `load_embedder` builds, from any folder EmbedRAG
meets, the model that embeds the way training did — the same settings, head, attention and
length limits in every script (evaluate.py, mine_negatives.py, merge.py, the notebook).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from embedrag import quiet
from embedrag.config import TrainConfig
from embedrag.cpu import kernels
from embedrag.io import read_json
from embedrag.model import varlen
from embedrag.model.embedding import EmbeddingModel, EmbedSettings, find_lora_targets
from embedrag.model.meta import empty_base
from embedrag.model.recipe import decide, load_head, model_file, read_recipe
from embedrag.model.tokens import load_tokenizer, resolve_append_eos


class ModelError(ValueError):
    """The model cannot be used as asked (shipped code not trusted, or failing); one line."""


def shipped_code(path: str) -> dict[str, str]:
    """Classes the model's repository ships as code for AutoModel / AutoTokenizer."""
    found = {}
    for name, keys in (("config.json", ("AutoModel",)),
                       ("tokenizer_config.json", ("AutoTokenizer",))):
        file = model_file(path, name)
        if file is None:
            continue
        auto_map = read_json(file).get("auto_map") or {}
        for key in keys:
            target = auto_map.get(key)
            target = [t for t in target if t][0] if isinstance(target, list) else target
            if target:
                found[key] = target
    return found


def check_remote_code(path: str, trust_remote_code: bool) -> None:
    """Refuse a model whose repository maps AutoModel (or its tokenizer) to its own code when
    that code is not trusted: transformers would silently load its stock class instead — for
    gte-Qwen2-7B-instruct, causal Qwen2 in place of its bidirectional model, whose embeddings
    then degrade to noise."""
    shipped = shipped_code(path)
    if not shipped or trust_remote_code:
        return
    key, target = next(iter(shipped.items()))
    instead = "its stock tokenizer"
    if key == "AutoModel":
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        model_type = (read_json(model_file(path, "config.json")) or {}).get("model_type")
        instead = f"the stock {MODEL_MAPPING_NAMES.get(model_type, 'class of its model type')}"
    raise ModelError(f"{path} ships its own code for {key} ({target}); without "
                     f"--trust_remote_code, {instead} would be loaded instead and may embed "
                     f"differently. Read that code, then pass --trust_remote_code")


@contextmanager
def shipped_code_errors(path: str, trust_remote_code: bool):
    """Code shipped for older transformers versions fails deep in a forward pass; say so in
    one line instead."""
    try:
        yield
    except Exception as e:
        if not (trust_remote_code and shipped_code(path)):
            raise
        import transformers

        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"the code shipped with {path} fails on transformers "
                         f"{transformers.__version__}: {type(e).__name__}: {first}") from e


def model_config(path: str, *, attention: str = "model", attention_dropout: float = -1.0,
                 trust_remote_code: bool = False) -> Any:
    """The model's config with the attention EmbedRAG was asked for.

    bidirectional: Gemma 3 has its own switch (`use_bidirectional_attention`, EmbeddingGemma's
    recipe, which also opens its sliding windows both ways); other architectures transformers
    ships take `is_causal = False`, which its mask functions read to build a bidirectional
    mask. Both are saved with the config, so a full fine-tune or merged folder reloads with
    the attention it was trained with. attention_dropout >= 0 replaces the model's dropout on
    attention probabilities."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if attention == "bidirectional":
        if hasattr(config, "use_bidirectional_attention"):
            config.use_bidirectional_attention = True  # and nothing else: the model's own
        else:
            config.is_causal = False
    if attention_dropout >= 0:
        # Dropout on attention probabilities keeps CPUs and GPUs off their fused attention
        # kernels and draws a (batch, heads, length, length) random mask per layer.
        for name in ("attention_probs_dropout_prob", "attention_dropout"):
            if hasattr(config, name):
                setattr(config, name, attention_dropout)
    return config


def routes_experts(config: Any) -> bool:
    """A mixture-of-experts model leaves different experts without gradient on different steps,
    which no one-time check can foresee; DDP must then look for unused parameters every step."""
    names = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    return any(isinstance(getattr(config, n, None), int) and getattr(config, n) > 1
               for n in names)


def quantized_device(device: torch.device) -> int | str:
    """Where bitsandbytes should place this process's quantized weights: its own GPU (an index,
    never None: Accelerate's single-GPU device is plain "cuda"), else the device type."""
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return device.type


def max_model_length(path: str, tokenizer: Any, trust_remote_code: bool = False) -> int | None:
    """The most tokens the model can take (position embeddings), if it says."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    limits = [getattr(config, "max_position_embeddings", None)]
    if 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:
        limits.append(tokenizer.model_max_length)
    limits = [n for n in limits if isinstance(n, int) and n > 0]
    return min(limits) if limits else None


def clamped_lengths(query_max_len: int, passage_max_len: int,
                    limit: int | None) -> dict[str, int]:
    """The lengths the model cannot take (see `max_model_length`), each cut to `limit`."""
    lengths = {"query_max_len": query_max_len, "passage_max_len": passage_max_len}
    return {name: limit for name, value in lengths.items() if limit and value > limit}


def autocast_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype --mixed_precision computes in (float32 for "no")."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def autocast(model: nn.Module, mixed_precision: str) -> torch.autocast:
    """Autocast to --mixed_precision's dtype on the device `model` is on. Forwards outside the
    prepared model (the trace, probes, evaluation) use it, not the accelerator's autocast,
    which is its device's: torch.autocast("cuda") leaves a model still on the CPU in its own
    dtypes, and a bf16 base then meets fp32 LoRA weights."""
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=autocast_dtype(mixed_precision),
                          enabled=mixed_precision in ("bf16", "fp16"))


def quantization_config(bits: int, compute_dtype: torch.dtype, sharded: bool = False) -> Any:
    """QLoRA's bitsandbytes settings: 4-bit NF4 with double quantization, or LLM.int8. Sharded
    (FSDP2): the packed 4-bit codes are stored in the compute dtype instead of uint8, which
    FSDP2 can shard (the same bytes, read as another type; it computes the same)."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        storage = {"bnb_4bit_quant_storage": compute_dtype} if sharded else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, **storage)
    return BitsAndBytesConfig(load_in_8bit=True)


def _as_in_training(module: nn.Module, args: tuple) -> None:
    module.training = True  # only picks bitsandbytes' kernel: an 8-bit layer has no dropout


def match_training_kernels(model: nn.Module) -> int:
    """Make quantized layers compute in eval mode exactly as they do in training; returns how
    many layers it changed. Call it on every quantized model EmbeddingModel trains or embeds
    with, so training, in-training evaluation, evaluate.py and merge.py see one model.

    4-bit: on a CPU with AVX-512 BF16, bitsandbytes (0.49+) repacks a `Linear4bit` weight in
    place the first time the layer runs in eval mode without gradients (any evaluation), and
    never packs it back. From then on every forward pass, in training too, goes through that
    inference kernel (`gemv_4bit`): it computes in bfloat16 and has no backward, so no gradient
    flows through the frozen 4-bit weights to the layers below — QLoRA stopped learning after
    the first evaluation. Its inverse re-quantizes the block scales, so it cannot be undone
    exactly either. The repack is switched off.

    8-bit on a CPU: bitsandbytes trains with the dequantized weights (`MatMul8bitFp`) but in
    eval mode rounds activations to int8 (`MatMul8bitLt`), another model by up to ~1e-2 in the
    embeddings. The layers are kept on the training kernel. (On GPUs both modes use the int8
    kernel, and 4-bit weights are never repacked: nothing to change there.)"""
    count = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
        if type(module).__name__ == "Linear8bitLt" and module.weight.device.type == "cpu":
            module.register_forward_pre_hook(_as_in_training)
            count += 1
    return count


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass, through transformers' current name for it
    (`gradient_checkpointing_enable` is deprecated from 5.x, with a FutureWarning), and without
    the KV cache, which an embedding never reads and which checkpointing turns off anyway
    (with a warning on the first forward pass)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False


def load_base(path: str, *, dtype: torch.dtype, config: Any, device: torch.device | str,
              bits: int | None = None, compute_dtype: torch.dtype | None = None,
              trust_remote_code: bool = False, sharded: bool = False,
              read_weights: bool = True) -> nn.Module:
    """A base model as training loads it, for training, evaluation and merging alike: in
    `dtype`, with `config` (the training's attention; see `model_config`), quantized to `bits`
    as QLoRA does (computing in `compute_dtype`), its quantized layers on their training
    kernels; on `device`, before anything runs a forward through it. Without `read_weights`,
    the network on the meta device, for FSDP2 to fill from the main process (model/meta.py)."""
    from transformers import AutoModel

    if not read_weights:
        return empty_base(config, dtype, device, trust_remote_code)

    kwargs: dict[str, Any] = {"dtype": dtype, "config": config,
                              "trust_remote_code": trust_remote_code}
    if bits:
        kwargs["quantization_config"] = quantization_config(bits, compute_dtype or dtype,
                                                            sharded)
        kwargs["device_map"] = {"": quantized_device(torch.device(device))}
    with shipped_code_errors(path, trust_remote_code):
        model = AutoModel.from_pretrained(path, **kwargs)
    if not bits:  # quantized weights were placed as they loaded
        model.to(device)
    match_training_kernels(model)
    return model


def apply_adapter(backbone: nn.Module, folder: str) -> nn.Module:
    """The backbone with the LoRA adapter saved in `folder` applied (PEFT)."""
    from peft import PeftModel

    with quiet.peft_model_construction():
        return PeftModel.from_pretrained(backbone, folder)


@dataclass(frozen=True)
class ModelSettings:
    """How the backbone is loaded for training and what in it trains."""

    path: str
    finetune_type: str = "lora"         # lora, qlora or full
    quantization_bits: int = 4          # qlora only
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = ()  # () finds every linear layer of the blocks
    attention: str = "model"            # or "bidirectional"
    attention_dropout: float = -1.0     # -1: the model's own
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"         # resolved: no, fp16 or bf16
    cpu_kernels: str = "auto"
    trust_remote_code: bool = False
    sharded: bool = False               # FSDP2 will shard the weights
    read_weights: bool = True           # False: on meta, filled from the main process

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> ModelSettings:
        return cls(path=cfg.model_name_or_path, finetune_type=cfg.finetune_type,
                   quantization_bits=cfg.quantization_bits, lora_r=cfg.lora_r,
                   lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                   target_modules=tuple(cfg.target_modules() or ()), attention=cfg.attention,
                   attention_dropout=cfg.attention_dropout,
                   gradient_checkpointing=bool(cfg.gradient_checkpointing),
                   mixed_precision=cfg.mixed_precision, cpu_kernels=cfg.cpu_kernels,
                   trust_remote_code=cfg.trust_remote_code)


def load_backbone(cfg: ModelSettings, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The AutoModel for cfg.finetune_type, ready to train, and facts for training_config.json."""
    compute_dtype = autocast_dtype(cfg.mixed_precision)
    # The frozen base of lora/qlora may sit in the autocast dtype; trained weights stay fp32.
    base_dtype = torch.float32 if cfg.finetune_type == "full" else compute_dtype
    config = model_config(cfg.path, attention=cfg.attention,
                          attention_dropout=cfg.attention_dropout,
                          trust_remote_code=cfg.trust_remote_code)
    model = load_base(cfg.path, dtype=base_dtype, config=config, device=device,
                      bits=cfg.quantization_bits if cfg.finetune_type == "qlora" else None,
                      compute_dtype=compute_dtype, trust_remote_code=cfg.trust_remote_code,
                      sharded=cfg.sharded, read_weights=cfg.read_weights)
    info: dict[str, Any] = {"base_dtype": str(base_dtype).replace("torch.", ""),
                            **varlen.install(model, device)}  # packed rows on a GPU
    swap = kernels.install if cfg.cpu_kernels == "auto" else (lambda *_: {})
    if cfg.finetune_type == "full":
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(model)
        return model, {**info, **swap(model, device)}

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets, excluded = find_lora_targets(model)
    if cfg.target_modules:
        targets, excluded = list(cfg.target_modules), []
    if cfg.finetune_type == "qlora":  # checkpointing below, not through PEFT's deprecated call
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.enable_input_require_grads()  # the frozen embeddings' output carries gradients
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, exclude_modules=excluded or None, bias="none")
    with quiet.peft_model_construction():
        model = get_peft_model(model, lora)
    info.update(lora_target_modules=targets, lora_excluded_modules=excluded)
    return model, {**info, **swap(model, device)}


def lora_input_casts(model: nn.Module, enabled: bool) -> None:
    """Switch PEFT's cast of each adapter's input to the adapter weights' dtype (fp32).

    Under autocast that cast is undone at once — the adapter's matmul casts its input back to
    bf16 — so it only copies every LoRA input twice and runs its dropout in fp32, a visible
    share of a bf16 LoRA step on a CPU. Training and its evaluation always run under
    autocast, so casts are off there; a model handed out afterwards gets them back, since a
    bf16 base needs them outside autocast."""
    if "peft" not in sys.modules:  # no adapter anywhere; PEFT's import takes seconds
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled


SETTINGS = ("pooling", "query_instruction", "passage_instruction", "query_max_len",
            "passage_max_len")


def load_embedder(path: str, *, dtype: torch.dtype = torch.float32, device: str | None = None,
                  trust_remote_code: bool = False, overrides: dict[str, Any] | None = None,
                  ) -> tuple[EmbeddingModel, Any, EmbedSettings]:
    """(model, tokenizer, settings) for any model folder EmbedRAG meets, in eval mode:

    - an adapter folder (train.py's final/ or a checkpoint under lora/qlora): its base, from
      training_config.json (or adapter_config.json), loaded with the training's attention and
      the adapter applied; a QLoRA adapter's base is quantized as in training, so it embeds as
      the trained model did;
    - a full fine-tune or merged folder: loaded as it is (its config carries the attention);
    - any other model: with its own sentence-transformers recipe (pooling, prompts, length,
      Dense layers), EmbedRAG's defaults where it has none.
    `overrides` (pooling, query_instruction, passage_instruction, query_max_len,
    passage_max_len, append_eos; None = keep) win over both. Lengths are clamped to what the
    model takes, whatever asked for more.
    """

    check_remote_code(path, trust_remote_code)
    config = read_json(os.path.join(path, "training_config.json"))
    adapter = read_json(os.path.join(path, "adapter_config.json"))
    tokenizer = load_tokenizer(path, trust_remote_code)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if config:
        settings = EmbedSettings.from_training_config(config)
        head = load_head(path, config.get("dense_modules") or [])
    else:
        recipe = read_recipe(path)
        values, _ = decide({}, recipe)
        settings = EmbedSettings(**values)
        head = load_head(path, recipe.dense)
    for name in SETTINGS:
        if name in overrides:
            setattr(settings, name, overrides[name])
    if "append_eos" in overrides or not config:
        settings.append_eos = resolve_append_eos(overrides.get("append_eos", "auto"),
                                                 settings.pooling, tokenizer)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base_path = ((config or {}).get("base_model") or adapter["base_model_name_or_path"]
                 if adapter else path)
    check_remote_code(base_path, trust_remote_code)  # an adapter's base may ship code too
    bits = (config["quantization_bits"]
            if adapter and (config or {}).get("finetune_type") == "qlora" else None)
    backbone = load_base(base_path, dtype=dtype, device=device, bits=bits,
                         config=model_config(base_path,
                                             attention=(config or {}).get("attention", "model"),
                                             trust_remote_code=trust_remote_code),
                         trust_remote_code=trust_remote_code)
    if adapter:
        backbone = apply_adapter(backbone, path)
    limit = max_model_length(base_path, tokenizer, trust_remote_code)
    for name, value in clamped_lengths(settings.query_max_len, settings.passage_max_len,
                                       limit).items():
        setattr(settings, name, value)
    model = EmbeddingModel(backbone, settings.pooling, head,
                           (config or {}).get("dense_modules") or (
                               [] if config else read_recipe(path).dense)).eval()
    if not bits:  # quantized weights were placed when loaded
        model.to(device)
    else:
        model.head.to(device) if model.head is not None else None
    return model, tokenizer, settings
