"""Files written whole or not at all: JSON through a temporary file, folders committed by rename."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any


def write_json(path: str, obj: Any) -> None:
    """Write through a temporary file, so a reader never sees half a file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def read_json(path: str) -> Any:
    """A JSON file's content, or None when there is no such file."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_training_config(model_dir: str) -> dict[str, Any] | None:
    """The training_config.json of a training output folder, or None for a plain model."""
    return read_json(os.path.join(model_dir, "training_config.json"))


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
