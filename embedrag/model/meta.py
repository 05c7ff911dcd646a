"""Loading a model that FSDP2 will shard without every process reading it.

With `fsdp_cpu_ram_efficient_loading: true` only the main process reads the weights; every
other process builds the same network on the meta device (no memory, no disk reads) and gets
its shards when Accelerate shards the model: it broadcasts the main process's state dict into
each shard (`fsdp2_load_full_state_dict`). What that broadcast does not carry is settled here:
the dtype each tensor was loaded in, and the buffers outside the state dict (rotary
frequencies, BERT's position ids), which the other processes allocate and receive after.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class NetworkMismatch(RuntimeError):
    """A process built another network than the main process did from the same files (a
    model's own code that builds differently on the meta device, say)."""


def empty_base(config: Any, dtype: torch.dtype, device: torch.device | str,
               trust_remote_code: bool = False) -> nn.Module:
    """The AutoModel of `config` in `dtype`, every parameter on the meta device and every
    buffer allocated, uninitialized, on `device`: Accelerate moves buffers to the device as
    it shards, which a meta tensor cannot do; `share_buffers` fills them afterwards."""
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)
    return model


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def agree_with_main(model: nn.Module, main: bool) -> None:
    """Give every tensor of `model` the dtype the main process has for it (`from_pretrained`
    may keep modules in fp32 that `from_config` builds in the requested dtype; the broadcast
    would silently cast into the meta tensor's dtype), and stop if the networks differ in a
    name or a shape. Every process calls it, after LoRA is applied, before sharding."""
    import torch.distributed as dist

    spec = [[(name, str(t.dtype), tuple(t.shape)) for name, t in _tensors(model)] if main
            else None]
    dist.broadcast_object_list(spec, src=0)
    if main:
        return
    theirs = {name: (dtype, shape) for name, dtype, shape in spec[0]}
    mine = dict(_tensors(model))
    for name, t in mine.items():
        if name not in theirs or theirs[name][1] != tuple(t.shape):
            raise NetworkMismatch(
                f"process {dist.get_rank()} built {name} {tuple(t.shape)}, the main process "
                f"{theirs.get(name, ('', 'nothing'))[1]}")
        dtype = getattr(torch, theirs[name][0].replace("torch.", ""))
        if t.dtype != dtype:
            t.data = t.data.to(dtype)
    if len(mine) != len(theirs):
        missing = sorted(set(theirs) - set(mine))
        raise NetworkMismatch(f"process {dist.get_rank()} has no {missing[0]} "
                              f"({len(missing)} tensor(s) the main process has)")


def share_buffers(model: nn.Module) -> None:
    """Broadcast the main process's buffers outside the state dict to every process (every
    process calls it once the model is sharded): the others allocated them without values;
    the state dict's own came with the shards."""
    import torch.distributed as dist

    for module in model.modules():  # the same order on every process
        for name in sorted(module._non_persistent_buffers_set):
            if module._buffers.get(name) is not None:
                dist.broadcast(module._buffers[name], src=0)


def loaded_values(model: nn.Module) -> int:
    """Parameter values this process holds in memory (not on the meta device)."""
    return sum(p.numel() for p in model.parameters() if not p.is_meta)
