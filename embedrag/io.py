"""Files and folders written whole or not at all: a file through a temporary one that then takes
its place, a folder committed by rename; and reading JSON back."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def replacing(path: str) -> Iterator[str]:
    """A temporary path to write `path`'s new content to; it takes `path`'s place only when the
    block ends without an error (else it is removed), so a reader never sees half a file. Each
    process writes its own, so processes writing the same file do not clobber each other."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


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
