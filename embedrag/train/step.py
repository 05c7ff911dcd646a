"""One micro-batch's forward and backward pass, plainly or through GradCache.

GradCache (Gao et al., 2021) computes the same loss and gradients for batches too large to
backpropagate at once: embed in chunks without a graph, take the loss's gradient with respect
to the embeddings, then re-embed each chunk with a graph (replaying its dropout) and
backpropagate that cached gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist

from embedrag.losses import LossSettings, distributed, objective


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


_HOST_GROUPS: dict[Any, Any] = {}


def _host_group() -> Any:
    """A gloo group over the processes (the default group when it is gloo already): counts
    the host knows are agreed on between hosts, without a round trip through the devices."""
    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    if world not in _HOST_GROUPS:  # every process gets here at the same step
        _HOST_GROUPS[world] = dist.new_group(backend="gloo")
    return _HOST_GROUPS[world]


def _rows_everywhere(counts: list[int]) -> list[int]:
    """The largest of each count over all processes (the counts themselves on one)."""
    if not distributed():
        return counts
    t = torch.tensor(counts)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group())
    return t.tolist()


def grad_cache_step(encode: Callable[..., torch.Tensor],
                    batch: dict[str, torch.Tensor], chunk: int,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    backward: Callable[[torch.Tensor], None],
                    no_sync: Callable[[], AbstractContextManager] = nullcontext) -> torch.Tensor:
    """One GradCache forward/backward; returns the (detached) loss.

    encode(input_ids, mask, lengths) -> embeddings (lengths: a list on the host, or None);
    loss_fn(q, p) -> scalar loss; backward(scalar)
    backpropagates; no_sync() is the data-parallel wrapper's context that defers gradient
    synchronisation. Chunks of at most `chunk` texts.

    Several processes must issue the same collectives in the same order, or they wait on each
    other forever. Deduplicated passages make the number of texts differ between processes, so
    each process pads its batch (with copies of its first text, which get zero gradient) to
    the largest count, and all run the same number of chunks; every chunk but the last is
    re-embedded *and* backpropagated inside no_sync — DDP decides in the forward pass whether
    the backward pass synchronises — so gradients are reduced once, after the last chunk.
    """
    device = batch["query_input_ids"].device
    kinds = ("query", "passage")
    real = [batch[f"{kind}_input_ids"].shape[0] for kind in kinds]
    padded = _rows_everywhere(real)
    parts = []  # (kind, input_ids, mask, lengths) per chunk, queries first
    for kind, n in zip(kinds, padded, strict=True):
        ids, mask = batch[f"{kind}_input_ids"], batch[f"{kind}_attention_mask"]
        lengths = batch.get(f"{kind}_lengths")
        if n > ids.shape[0]:  # filler rows so that every process runs as many chunks
            extra = n - ids.shape[0]
            ids = torch.cat([ids, ids[:1].expand(extra, -1)])
            mask = torch.cat([mask, mask[:1].expand(extra, -1)])
            lengths = None if lengths is None else [*lengths, *lengths[:1] * extra]
        for start in range(0, n, chunk):
            parts.append((kind, ids[start:start + chunk], mask[start:start + chunk],
                          None if lengths is None else lengths[start:start + chunk]))
    # 1. embed every chunk without a graph, remembering the RNG state it started from
    reps, states = [], []
    with torch.no_grad():
        for _, ids, mask, lengths in parts:
            states.append(_rng_state(device))
            reps.append(encode(ids, mask, lengths))
    q = torch.cat([r for r, part in zip(reps, parts, strict=True) if part[0] == "query"])
    p = torch.cat([r for r, part in zip(reps, parts, strict=True) if part[0] == "passage"])
    q, p = q.detach().requires_grad_(), p.detach().requires_grad_()       # (B+, D), (P+, D)
    # 2. the loss (of the real rows) and its gradient with respect to the embeddings only
    loss = loss_fn(q[:real[0]], p[:real[1]])
    grad_q, grad_p = torch.autograd.grad(loss, [q, p])                    # filler rows: 0
    grads = list(grad_q.split([len(r) for r, part in zip(reps, parts, strict=True)
                               if part[0] == "query"]))
    grads += list(grad_p.split([len(r) for r, part in zip(reps, parts, strict=True)
                                if part[0] == "passage"]))
    # 3. re-embed each chunk with a graph and the same dropout, push its cached gradient back
    after = _rng_state(device)
    for n, ((_, ids, mask, lengths), state, g) in enumerate(zip(parts, states, grads,
                                                                  strict=True)):
        _set_rng_state(state, device)
        with nullcontext() if n == len(parts) - 1 else no_sync():
            rep = encode(ids, mask, lengths)
            backward((rep * g).sum())
    _set_rng_state(after, device)
    return loss.detach()


def forward_backward(accelerator: Any, model: Any, batch: dict[str, torch.Tensor],
                     loss: LossSettings, chunk_size: int, scale: float,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Embed, score and backpropagate one micro-batch (`scale` times its loss); returns the
    loss and its parts (see `objective`). chunk_size > 0: through GradCache, in chunks."""
    parts: dict[str, torch.Tensor] = {}

    def loss_of(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        value, found = objective(q, p[batch["passage_index"]], batch, loss)  # (B*G, D) slots
        parts.update(found)
        return value

    if not chunk_size:
        q = model(batch["query_input_ids"], batch["query_attention_mask"],
                  batch.get("query_lengths"))                                   # (B, D)
        p = model(batch["passage_input_ids"], batch["passage_attention_mask"],
                  batch.get("passage_lengths"))                                 # (P', D)
        value = loss_of(q, p)
        accelerator.backward(value * scale)
        return value, parts
    value = grad_cache_step(model, batch, chunk_size, loss_of,
                            backward=lambda s: accelerator.backward(s * scale),
                            no_sync=lambda: accelerator.no_sync(model))
    return value, parts
