"""Loading the backbone (full, LoRA or QLoRA), setting up its tokenizer, pooling, encoding.

`EmbeddingModel` wraps a transformers `AutoModel` (no LM head) and turns token states into one
L2-normalised vector per text. The same class embeds during training, after reloading a saved
adapter, and in evaluation, so "embeds as in training" holds by construction.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from embedrag import kernels
from embedrag.config import read_json
from embedrag.data import pad, tokenize


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of the last real token of each row, whatever the padding side.

    hidden: (N, L, H), mask: (N, L) with 1 on real tokens. The index of the last 1 in each row
    is found directly, so left padding, right padding and a mix in one batch all work.
    """
    positions = torch.arange(mask.shape[1], device=mask.device)          # (L,)
    last = (mask.bool() * positions).amax(dim=1)                          # (N,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, H)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the real tokens' states. hidden (N, L, H), mask (N, L) -> (N, H)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)                               # (N, L, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of the first real token (the [CLS] of BERT-style encoders), whatever the padding."""
    first = mask.bool().int().argmax(dim=1)                               # (N,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


POOLERS = {"last": last_token_pool, "mean": mean_pool, "cls": cls_pool}


@dataclass
class EmbedSettings:
    """How texts become vectors; training_config.json records these for a trained model."""

    pooling: str = "last"
    query_instruction: str = ""
    query_max_len: int = 256
    passage_max_len: int = 1024
    append_eos: bool = False

    @classmethod
    def from_training_config(cls, config: dict[str, Any]) -> EmbedSettings:
        return cls(**{k: config[k] for k in cls.__dataclass_fields__ if k in config})


class EmbeddingModel(nn.Module):
    """backbone -> pooled -> L2-normalised embeddings (float32)."""

    def __init__(self, backbone: nn.Module, pooling: str):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = POOLERS[self.pooling](hidden, attention_mask)            # (N, H)
        return F.normalize(pooled.float(), p=2, dim=-1)

    @torch.no_grad()
    def encode(self, tokenizer: Any, texts: list[str], **kwargs: Any) -> torch.Tensor:
        """Embed texts exactly as training does; see `encode_with`."""
        return encode_with(self, tokenizer, texts, **kwargs)


@torch.no_grad()
def encode_with(model: nn.Module, tokenizer: Any, texts: list[str], *, max_len: int,
                append_eos: bool, batch_size: int = 32, instruction: str = "",
                progress: str = "", accelerator: Any = None) -> torch.Tensor:
    """Embed texts with `model` — an EmbeddingModel, or one wrapped by Accelerate (DDP, FSDP,
    DeepSpeed), whose forward maps (input_ids, attention_mask) to embeddings — tokenized,
    padded and pooled exactly as in training.

    Texts are embedded longest first so each batch pads little; rows come back in input
    order. (N, D) float32 on the CPU. `progress` names a progress bar (none when empty).

    With an `accelerator` of W processes, process r embeds batches r, r+W, ... and the results
    are gathered, so each process holds all N rows after doing 1/W of the work; the batches are
    the single-process ones, so the rows are the same to the last bit. Every process must call
    it (the gather is collective); the model must not be one whose forward is collective
    (FSDP, DeepSpeed ZeRO-3), since processes run different numbers of batches.
    """
    from tqdm.auto import tqdm

    ids = tokenize(tokenizer, [instruction + t for t in texts], max_len, append_eos)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator \
        else (0, 1)
    device = next(model.parameters()).device
    chunks = []
    for idx in tqdm(batches[rank::world], desc=progress, disable=not progress, leave=False):
        input_ids, mask = pad([ids[i] for i in idx], tokenizer.pad_token_id,
                              tokenizer.padding_side)
        chunks.append(model(input_ids.to(device), mask.to(device)).float())
    local = torch.cat(chunks) if chunks else torch.zeros((0, 0), device=device)   # (n_r, D)
    rows = [[i for b in batches[r::world] for i in b] for r in range(world)]
    if world > 1:  # pad every process's rows to the same count, gather, drop the padding
        width = max(len(r) for r in rows)
        dim = int(accelerator.gather(torch.tensor([local.shape[1]], device=device)).max())
        padded = torch.zeros((width, dim), device=device)
        padded[: local.shape[0]] = local
        every = accelerator.gather(padded).view(world, width, dim)           # (W, width, D)
        local = torch.cat([every[r, : len(rows[r])] for r in range(world)])
    if not ids:
        return torch.empty((0, 0))
    out = torch.empty((len(ids), local.shape[1]))
    out[torch.tensor([i for r in rows for i in r])] = local.cpu()
    return out


def freeze_unreached(model: nn.Module, tokenizer: Any) -> list[str]:
    """Freeze the trainable parameters that the embedding does not depend on; return their names.

    `AutoModel` builds parts an embedding never uses — BERT's pooler, a vision tower, LoRA put
    on such modules by name. They get no gradient, and data-parallel training (DDP) waits for
    gradients of every trainable parameter: it stops at step 2 with "Expected to have finished
    reduction in the prior iteration". They are found by walking the autograd graph of one
    forward pass of a short text — what DDP's find_unused_parameters does on every step — with
    no backward pass and no gradient memory. Dropout's random draws are undone."""
    ids = torch.tensor([tokenizer("a b", add_special_tokens=True)["input_ids"]])
    device = next(model.parameters()).device
    was_training = model.training
    model.train()  # as in training: some quantized layers repack their weights in eval mode
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch.enable_grad():
        out = model(ids.to(device), torch.ones_like(ids).to(device))       # (1, D)
    model.train(was_training)
    reached, seen, stack = set(), set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):  # AccumulateGrad: the node that writes a parameter's .grad
            reached.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    unused = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in reached]
    for name, p in model.named_parameters():
        if name in unused:
            p.requires_grad_(False)
    return unused


def routes_experts(config: Any) -> bool:
    """A mixture-of-experts model leaves different experts without gradient on different steps,
    which no one-time check can foresee; DDP must then look for unused parameters every step."""
    names = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    return any(isinstance(getattr(config, n, None), int) and getattr(config, n) > 1
               for n in names)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer with a pad token: its own, else EOS, else UNK."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise ValueError(f"{path}: the tokenizer has no pad, EOS or UNK token to pad with")
        tok.pad_token = fallback
    return tok


def tokenizer_adds_eos(tok: Any) -> bool:
    """Does the tokenizer already end every text with EOS (as Qwen3-Embedding's does)?"""
    if tok.eos_token_id is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[-1] == tok.eos_token_id


def resolve_append_eos(mode: str, pooling: str, tok: Any) -> bool:
    """auto: append EOS for last-token pooling when the tokenizer has one and does not add it."""
    if mode == "yes":
        if tok.eos_token_id is None:
            raise ValueError("--append_eos yes, but the tokenizer has no EOS token")
        return not tokenizer_adds_eos(tok)
    if mode == "no":
        return False
    return pooling == "last" and tok.eos_token_id is not None and not tokenizer_adds_eos(tok)


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit and Linear8bitLt subclass nn.Linear.
    return isinstance(module, nn.Linear)


def find_lora_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """Every linear layer inside the numbered transformer blocks (attention and MLP).

    Returns (target names, excluded full module paths): the targets are the distinct leaf names
    (q_proj, up_proj, query, dense, ...); linear layers outside the blocks that share a leaf name
    (BERT's pooler.dense, say) are excluded by their full path, since they get no gradient from
    the embedding and an adapter on them would never train.
    """
    inside, outside = set(), []
    for name, module in model.named_modules():
        if not _is_linear(module):
            continue
        if re.search(r"\.\d+\.", f".{name}"):
            inside.add(name.rsplit(".", 1)[-1])
        else:
            outside.append(name)
    if not inside:
        raise ValueError("found no linear layers inside transformer blocks; "
                         "name them with --lora_target_modules")
    excluded = [n for n in outside if n.rsplit(".", 1)[-1] in inside]
    return sorted(inside), excluded


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


def autocast_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype --mixed_precision computes in (float32 for "no")."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def quantization_config(bits: int, compute_dtype: torch.dtype) -> Any:
    """QLoRA's bitsandbytes settings: 4-bit NF4 with double quantization, or LLM.int8."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
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


def load_backbone(cfg: Any, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The AutoModel for cfg.finetune_type, ready to train, and facts for training_config.json."""
    from transformers import AutoModel

    compute_dtype = autocast_dtype(cfg.mixed_precision)
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    # The frozen base of lora/qlora may sit in the autocast dtype; trained weights stay fp32.
    base_dtype = torch.float32 if cfg.finetune_type == "full" else compute_dtype
    kwargs["dtype"] = base_dtype
    if cfg.finetune_type == "qlora":
        kwargs["quantization_config"] = quantization_config(cfg.quantization_bits, compute_dtype)
        # Quantized weights are placed at load time, on this process's own device.
        kwargs["device_map"] = {"": quantized_device(device)}
    if cfg.attention_dropout >= 0:
        # Dropout on attention probabilities keeps CPUs and GPUs off their fused attention
        # kernels and draws a (batch, heads, length, length) random mask per layer.
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(cfg.model_name_or_path,
                                            trust_remote_code=cfg.trust_remote_code)
        for name in ("attention_probs_dropout_prob", "attention_dropout"):
            if hasattr(config, name):
                setattr(config, name, cfg.attention_dropout)
        kwargs["config"] = config
    model = AutoModel.from_pretrained(cfg.model_name_or_path, **kwargs)
    match_training_kernels(model)
    info: dict[str, Any] = {"base_dtype": str(base_dtype).replace("torch.", "")}
    if cfg.finetune_type == "full":
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, {**info, **kernels.install(model, device)}

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets, excluded = find_lora_targets(model)
    if cfg.target_modules():
        targets, excluded = cfg.target_modules(), []
    if cfg.finetune_type == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, exclude_modules=excluded or None, bias="none")
    model = get_peft_model(model, lora)
    info.update(lora_target_modules=targets, lora_excluded_modules=excluded)
    return model, {**info, **kernels.install(model, device)}


def load_embedder(path: str, *, dtype: torch.dtype = torch.float32, device: str | None = None,
                  trust_remote_code: bool = False) -> tuple[EmbeddingModel, Any, EmbedSettings]:
    """(model, tokenizer, settings) for any model folder EmbedRAG meets, in eval mode:

    - an adapter folder (train.py's final/ or a checkpoint under lora/qlora): its base, from
      training_config.json (or adapter_config.json), with the adapter applied; a QLoRA adapter's
      base is quantized as in training, so it embeds as the trained model did;
    - a full fine-tune or merged folder, or any plain model: loaded as it is.
    Settings come from training_config.json when there is one; otherwise last-token pooling
    with EOS handled as `--append_eos auto` would.
    """
    from transformers import AutoModel

    config = read_json(os.path.join(path, "training_config.json"))
    adapter = read_json(os.path.join(path, "adapter_config.json"))
    tokenizer = load_tokenizer(path, trust_remote_code)
    settings = (EmbedSettings.from_training_config(config) if config else
                EmbedSettings(append_eos=resolve_append_eos("auto", "last", tokenizer)))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if adapter:
        from peft import PeftModel

        base_path = (config or {}).get("base_model") or adapter["base_model_name_or_path"]
        if (config or {}).get("finetune_type") == "qlora":
            kwargs["quantization_config"] = quantization_config(config["quantization_bits"],
                                                                dtype)
            kwargs["device_map"] = {"": quantized_device(torch.device(device))}
        base = AutoModel.from_pretrained(base_path, **kwargs)
        match_training_kernels(base)
        backbone = PeftModel.from_pretrained(base, path)
    else:
        backbone = AutoModel.from_pretrained(path, **kwargs)
    model = EmbeddingModel(backbone, settings.pooling).eval()
    if "device_map" not in kwargs:  # quantized weights were placed when loaded
        model.to(device)
    return model, tokenizer, settings


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count as the parameters they stand for."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
