"""FSDP2's sharded weights and optimizer state in a step checkpoint, through PyTorch's
distributed checkpoint (DCP): every process writes and reads its own shards of one
`sharded/` folder (so all machines must see the output folder), no process gathers them."""

from __future__ import annotations

import os
import shutil
from typing import Any

SHARDS = "sharded"


def save(model: Any, optimizer: Any, folder: str, main: bool, barrier: Any) -> None:
    """Write the shards of `model` (the prepared FSDP2 module) and `optimizer` to `folder`,
    which must not exist yet; every process calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if main:
        shutil.rmtree(folder, ignore_errors=True)
    barrier()
    weights, moments = get_state_dict(model, getattr(optimizer, "optimizer", optimizer))
    dcp.save({"model": weights, "optimizer": moments}, checkpoint_id=folder)


def load(model: Any, optimizer: Any, folder: str) -> None:
    """Read `save`'s shards back into the prepared model and optimizer (the optimizer's state
    is made first, as its first step would make it); every process calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    weights, moments = get_state_dict(model, inner)
    state = {"model": weights, "optimizer": moments}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, inner, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def present(checkpoint: str) -> bool:
    return os.path.isdir(os.path.join(checkpoint, SHARDS))
