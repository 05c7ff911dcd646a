"""The embedding model: backbone, pooling, the model's Dense head, normalisation; encoding.

`EmbeddingModel` wraps a transformers `AutoModel` (no LM head) and turns token states into one
L2-normalised vector per text. The same class embeds during training, after reloading a saved
adapter, and in evaluation, so "embeds as in training" holds by construction. How a path
becomes one is in `embedrag/model/loading.py`.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from embedrag.cpu import packing
from embedrag.cpu.kernels import ATTENTION, PACKED_CALLS
from embedrag.cpu.packing import length_buckets, pack_chunks
from embedrag.data.tokens import pad, tokenize
from embedrag.model.varlen import VARLEN, stop_using


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
    passage_instruction: str = ""
    query_max_len: int = 256
    passage_max_len: int = 1024
    append_eos: bool = False

    @classmethod
    def from_training_config(cls, config: dict[str, Any]) -> EmbedSettings:
        return cls(**{k: config[k] for k in cls.__dataclass_fields__ if k in config})


class EmbeddingModel(nn.Module):
    """backbone -> pooled -> the model's Dense layers, if any -> L2-normalised (float32).

    `head` holds the sentence-transformers Dense modules a model ships after its pooling
    (EmbeddingGemma has two); `head_names` are their folders, under which they are saved."""

    def __init__(self, backbone: nn.Module, pooling: str, head: nn.Module | None = None,
                 head_names: list[str] | None = None):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.head = head
        self.head_names = list(head_names or [])
        self.packing: bool | None = None  # decided at the first batch (`packs`)
        # Weights sharded over the processes (FSDP2): every backbone call is a collective, so
        # a batch takes the same number of calls on every process — one per kind of text.
        self.sharded = False

    @property
    def _no_split_modules(self) -> list[str]:
        """The backbone's transformer-block classes, which FSDP wraps (shards) one by one."""
        base = (self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model")
                else self.backbone)
        return list(getattr(base, "_no_split_modules", None) or [])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                lengths: Sequence[int] | None = None) -> torch.Tensor:
        """(N, L) token ids and mask, padded to the batch's longest text -> (N, D) embeddings.
        `lengths`: each text's real tokens, where the caller has them on the host (the
        collator does); packing then reads nothing back from the device.

        Padding is not computed on: the texts are packed into one row (`packs`), else embedded
        a length bucket at a time (`length_buckets`), each bucket cut to its own longest text.
        A text's embedding does not depend on the padding around it, so the result — and its
        gradient — is the padded batch's, row for row."""
        if self.packs(attention_mask, lengths):
            return self._embed_packed(input_ids, attention_mask, lengths)
        if self.sharded:  # one padded call
            return self._embed(input_ids, attention_mask)
        buckets = length_buckets(attention_mask)
        if len(buckets) == 1 and buckets[0].window == (0, attention_mask.shape[1]):
            return self._embed(input_ids, attention_mask)
        out = []
        for b in buckets:
            rows = torch.tensor(b.rows, device=input_ids.device)
            lo, hi = b.window
            out.append(self._embed(input_ids[rows, lo:hi], attention_mask[rows, lo:hi]))
        order = torch.tensor([i for b in buckets for i in b.rows], device=input_ids.device)
        return torch.cat(out)[torch.argsort(order)]                      # (N, D), input order

    def computed_positions(self, mask: torch.Tensor, lengths: Sequence[int] | None = None
                           ) -> int:
        """Token positions `forward` computes for this padded batch (padding included)."""
        if self.packs(mask, lengths):
            return int(sum(lengths) if lengths is not None else mask.sum())
        if self.sharded:
            return mask.numel()
        return sum(len(b.rows) * (b.window[1] - b.window[0]) for b in length_buckets(mask))

    def packs(self, mask: torch.Tensor, lengths: Sequence[int] | None = None) -> bool:
        """Whether `forward` packs this batch's texts into rows with no padding at all.

        Packing needs an attention that keeps the texts of a row apart: EmbedRAG's CPU
        attention (`kernels.install`) or its variable-length GPU attention (`varlen`), which
        read the boundaries from the `cu_seq_lens_q` the model passes to every layer, as
        transformers' models pass flash-attention's. Whether this model does — and takes
        per-text `position_ids` — is checked once, on two short texts embedded packed and
        apart (`_packing_agrees`); a model that fails it leaves the GPU attention for SDPA."""
        config = getattr(self.backbone, "config", None)
        attention = getattr(config, "_attn_implementation", None)
        if attention not in (ATTENTION, VARLEN) or mask.numel() == 0:
            return False
        if self.packing is None:
            self.adopt_packing(self._packing_agrees())
        if not self.packing:
            return False
        # The GPU attention builds no masks: a batch with an empty text is packed too (the
        # text embeds as zeros); the CPU one takes such a batch in length buckets.
        return attention == VARLEN or (min(lengths) > 0 if lengths is not None
                                       else bool(mask.any(1).all()))

    def adopt_packing(self, verdict: bool | None) -> None:
        """Take `packs`' verdict (also one another process's copy of this model reached: under
        FSDP2 a process that read no weights cannot probe before sharding, nor alone after)."""
        self.packing = verdict
        config = getattr(self.backbone, "config", None)
        if verdict is False and getattr(config, "_attn_implementation", None) == VARLEN:
            stop_using(self.backbone)  # padded calls need transformers' masks

    def _packing_agrees(self) -> bool:
        """Two texts of 7 and 3 random tokens, embedded packed and one at a time in eval mode
        (no dropout; the random stream is left as it was), agree, and every attention call
        of the packed pass saw the texts' boundaries."""
        device = next(self.parameters()).device
        # A half-precision base (LoRA's frozen weights in bf16) runs only under autocast, as
        # training runs it; the probe does too, whatever the caller's context.
        half = next((p.dtype for p in self.parameters()
                     if p.dtype in (torch.float16, torch.bfloat16)), None)
        cast = half is not None and not torch.is_autocast_enabled(device.type)
        was_training = self.training
        self.eval()
        try:
            vocab = self.backbone.get_input_embeddings().num_embeddings
            ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
            mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4])
            ids, mask = ids.to(device), mask.to(device)
            # (autocast(enabled=False) would switch off the caller's autocast)
            with torch.no_grad(), torch.random.fork_rng(devices=[]), (
                    torch.autocast(device.type, dtype=half) if cast else nullcontext()):
                apart = torch.cat([self._embed(ids[i:i + 1, :n], mask[i:i + 1, :n])
                                   for i, n in enumerate((7, 3))])        # (2, D)
                before = dict(PACKED_CALLS)
                packed = self._embed_packed(ids, mask)                    # (2, D)
        except Exception:  # a model whose forward (or embedding module) does not fit
            return False
        finally:
            self.train(was_training)
        calls = PACKED_CALLS["attention"] - before["attention"]
        marked = PACKED_CALLS["segments"] - before["segments"]
        rounded = half is not None or torch.is_autocast_enabled(device.type)
        return calls > 0 and marked == calls and bool(
            (apart - packed).abs().max() <= (2e-2 if rounded else 1e-4))

    def _embed_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      lengths: Sequence[int] | None = None) -> torch.Tensor:
        """The rows' real tokens one after another in one row, each text with its own
        positions from 0, and their boundaries for the attention; pooled as `_embed` pools.
        Without a cache (use_cache=False), transformers reads the position ids as packed
        texts. Rows of more than PACK_TOKENS tokens in all go in several calls."""
        if lengths is None:
            lengths = attention_mask.sum(1).tolist()
        lengths = [int(n) for n in lengths]
        limit = sum(lengths) if self.sharded else packing.PACK_TOKENS
        return torch.cat([self._embed_row(input_ids[a:b], attention_mask[a:b], lengths[a:b])
                          for a, b in pack_chunks(lengths, limit)])       # (N, D)

    def _embed_row(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   lengths: list[int]) -> torch.Tensor:
        """One packed call. Everything its shape depends on comes from `lengths` (host), so
        nothing waits for the device."""
        n, width = attention_mask.shape
        device = input_ids.device
        total, widest = sum(lengths), max(lengths)
        starts = [0, *itertools.accumulate(lengths)]
        bounds = torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True)
        bounds.host_starts = starts  # an attention that needs them on the host reads these
        positions = torch.cat([torch.arange(k) for k in lengths])        # (T,)
        # The real tokens' places in the flattened (N*L) batch, in row order: a stable sort
        # puts the 1s of the mask first, in order, whatever side the padding is on.
        flat = attention_mask.reshape(-1)                                 # (N*L,)
        where = torch.argsort(flat == 0, stable=True)[:total]             # (T,)
        hidden = self.backbone(
            input_ids=input_ids.reshape(-1)[where][None],
            position_ids=positions.to(device, non_blocking=True)[None],
            cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=widest,
            max_length_k=widest, use_cache=False).last_hidden_state[0]    # (T, H)
        padded = hidden.new_zeros((n * width, hidden.shape[-1]))          # (N*L, H)
        padded = padded.index_copy(0, where, hidden).view(n, width, -1)   # (N, L, H)
        return self._finish(padded, attention_mask)

    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._finish(hidden, attention_mask)

    def _finish(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, L, H) token states -> pooled, the Dense head, L2-normalised: (N, D) in float32
        (float64 for a float64 model)."""
        pooled = POOLERS[self.pooling](hidden, attention_mask)            # (N, H)
        if self.head is not None:
            pooled = self.head(pooled.to(next(self.head.parameters()).dtype))  # (N, D)
        return F.normalize(pooled.to(torch.promote_types(pooled.dtype, torch.float32)),
                           p=2, dim=-1)

    def save_head(self, folder: str, state: dict[str, torch.Tensor] | None = None) -> None:
        """The Dense modules, each in its sentence-transformers folder under `folder`; with
        `state` (this model's whole state dict, gathered from sharded weights under FSDP2)
        the weights come from there rather than from the local parameters."""
        for i, (name, module) in enumerate(zip(self.head_names, self.head or [], strict=True)):
            prefix = f"head.{i}."
            own = None if state is None else {k[len(prefix):]: v for k, v in state.items()
                                               if k.startswith(prefix)}
            module.save(os.path.join(folder, name), own)

    @torch.no_grad()
    def encode(self, tokenizer: Any, texts: list[str], **kwargs: Any) -> torch.Tensor:
        """Embed texts exactly as training does; see `encode_with`."""
        return encode_with(self, tokenizer, texts, **kwargs)


@torch.no_grad()
def encode_with(model: nn.Module, tokenizer: Any, texts: list[str], *, max_len: int,
                append_eos: bool, batch_size: int = 32, instruction: str = "",
                progress: str = "", accelerator: Any = None) -> torch.Tensor:
    """Embed texts with `model` — an EmbeddingModel, or one wrapped by Accelerate (DDP, FSDP,
    FSDP2), whose forward maps (input_ids, attention_mask) to embeddings — tokenized,
    padded and pooled exactly as in training. (N, D) float32 on the CPU; see `encode_ids`."""
    ids = tokenize(tokenizer, [instruction + t for t in texts], max_len, append_eos)
    return encode_ids(model, tokenizer, lambda rows: [ids[i] for i in rows],
                      [len(i) for i in ids], batch_size=batch_size, progress=progress,
                      accelerator=accelerator)


@torch.no_grad()
def encode_ids(model: nn.Module, tokenizer: Any, get_ids: Callable[[list[int]], list],
               lengths: Sequence[int], *, batch_size: int = 32, progress: str = "",
               accelerator: Any = None) -> torch.Tensor:
    """Embed N texts given as token ids: `get_ids(rows)` returns the ids of those rows (from a
    list, or from a memory-mapped Arrow column for corpora too big to hold as Python strings),
    `lengths` their lengths.

    Texts are embedded longest first so each batch pads little; rows come back in input
    order. (N, D) float32 (float64 for a float64 model) on the CPU. `progress` names a
    progress bar (none when empty).

    With an `accelerator` of W processes, process r embeds batches r, r+W, ... and the results
    are gathered, so each process holds all N rows after doing 1/W of the work; the batches are
    the single-process ones, so the rows are the same to the last bit. Every process must call
    it (the gather is collective); the model must not be one whose forward is collective
    (FSDP2), since processes run different numbers of batches.
    """
    import numpy as np
    from tqdm.auto import tqdm

    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist()
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator \
        else (0, 1)
    device = next(model.parameters()).device
    chunks = []
    for idx in tqdm(batches[rank::world], desc=progress, disable=not progress, leave=False):
        input_ids, mask = pad(get_ids(idx), tokenizer.pad_token_id, tokenizer.padding_side)
        chunks.append(model(input_ids.to(device), mask.to(device)))
    local = torch.cat(chunks) if chunks else torch.zeros((0, 0), device=device)   # (n_r, D)
    local = local.to(torch.promote_types(local.dtype, torch.float32))
    rows = [[i for b in batches[r::world] for i in b] for r in range(world)]
    if world > 1:  # pad every process's rows to the same count, gather, drop the padding
        width = max(len(r) for r in rows)
        dim = int(accelerator.gather(torch.tensor([local.shape[1]], device=device)).max())
        padded = torch.zeros((width, dim), dtype=local.dtype, device=device)
        if local.shape[0]:  # a process may have had no batch at all (a small eval set)
            padded[: local.shape[0]] = local
        every = accelerator.gather(padded).view(world, width, dim)           # (W, width, D)
        local = torch.cat([every[r, : len(rows[r])] for r in range(world)])
    if not len(order):
        return torch.empty((0, 0))
    out = torch.empty((len(order), local.shape[1]), dtype=local.dtype)
    out[torch.tensor([i for r in rows for i in r])] = local.cpu()
    return out


def unreached_parameters(model: nn.Module, tokenizer: Any) -> list[str]:
    """The trainable parameters that the embedding does not depend on, by name.

    `AutoModel` builds parts an embedding never uses — BERT's pooler, a vision tower, LoRA put
    on such modules by name. They get no gradient, and data-parallel training (DDP) waits for
    gradients of every trainable parameter: it stops at step 2 with "Expected to have finished
    reduction in the prior iteration"; they are frozen before it starts. They are found by
    walking the autograd graph of one forward pass of a short text — what DDP's
    find_unused_parameters does on every step — with no backward pass and no gradient memory.
    Dropout's random draws are undone."""
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
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in reached]


def freeze(model: nn.Module, names: list[str]) -> None:
    """Stop training the parameters named."""
    names = set(names)
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)


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


def embedding_width(model: EmbeddingModel) -> int:
    """Dimensions of the embeddings: the last Dense layer's outputs, else the hidden size."""
    linears = [m for m in (model.head.modules() if model.head is not None else [])
               if isinstance(m, nn.Linear)]
    return (linears[-1].out_features if linears
            else model.backbone.config.get_text_config().hidden_size)


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
