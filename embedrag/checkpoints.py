"""Saving models and adapters so that a folder that looks complete is complete.

Each save goes to `<name>.tmp/` first and is renamed into place only when every file is written;
a run killed mid-save leaves at most a `.tmp` folder, never a half-written `final/`.
Only safetensors weights are written.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from embedrag.config import write_json


def atomic_dir(path: str) -> str:
    """A fresh temporary sibling of `path` to write into before `commit_dir`."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit_dir(tmp: str, path: str) -> None:
    """Move a finished temporary folder into place, replacing an older one at `path`."""
    old = path.rstrip("/") + ".old"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_model(accelerator: Any, model: Any, tokenizer: Any, training_config: dict[str, Any],
               path: str) -> None:
    """Write the adapter (lora/qlora) or the full backbone, the tokenizer and
    training_config.json to `path`. Call on every process: gathering the weights is collective
    under DeepSpeed ZeRO-3 and FSDP; only the main process writes."""
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        backbone = accelerator.unwrap_model(model).backbone
        prefix = "backbone."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        tmp = atomic_dir(path)
        backbone.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(os.path.join(tmp, "training_config.json"), training_config)
        commit_dir(tmp, path)
    accelerator.wait_for_everyone()
