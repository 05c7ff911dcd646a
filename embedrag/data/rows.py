"""Training rows: the `Example` record, its checks, and reading JSONL with file:line errors."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_REPORTED_PROBLEMS = 5


class DataError(ValueError):
    """Bad training data; the message names file:line for each problem."""


@dataclass
class Example:
    query: str
    pos: list[str]
    neg: list[str]
    line: int
    prompt: str | None = None               # this row's own query instruction
    pos_scores: list[float] | None = None   # a teacher's score of each positive
    neg_scores: list[float] | None = None   # ... and of each negative


OPTIONAL = ("prompt", "pos_scores", "neg_scores")


def row_features() -> Any:
    """The Arrow schema every loader gives the training rows."""
    import datasets

    text, score = datasets.Value("string"), datasets.Value("float64")
    return datasets.Features({
        "query": text, "pos": datasets.Sequence(text), "neg": datasets.Sequence(text),
        "line": datasets.Value("int64"), "prompt": text,
        "pos_scores": datasets.Sequence(score), "neg_scores": datasets.Sequence(score)})


def check_row(obj: Any) -> str | None:
    """What is wrong with one parsed row, or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    query = obj.get("query")
    if "query" not in obj:
        return "missing 'query'"
    if not isinstance(query, str):
        return f"'query' must be a string, got {type(query).__name__}"
    if not query.strip():
        return "'query' is empty"
    if "pos" not in obj:
        return "missing 'pos'"
    pos = obj["pos"]
    if not isinstance(pos, list):
        return f"'pos' must be a list of strings, got {type(pos).__name__}"
    if not pos:
        return "'pos' is empty"
    neg = obj.get("neg", [])
    if not isinstance(neg, list):
        return f"'neg' must be a list of strings, got {type(neg).__name__}"
    for key, items in (("pos", pos), ("neg", neg)):
        for i, item in enumerate(items):
            if not isinstance(item, str):
                return f"'{key}[{i}]' must be a string, got {type(item).__name__}"
            if not item.strip():
                return f"'{key}[{i}]' is empty"
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        return f"'prompt' must be a string, got {type(prompt).__name__}"
    for key, items in (("pos", pos), ("neg", neg)):
        scores = obj.get(f"{key}_scores")
        if scores is None:
            continue
        if not isinstance(scores, list) or len(scores) != len(items):
            return (f"'{key}_scores' must be a list of {len(items)} numbers (one per '{key}' "
                    f"passage), got {_describe(scores)}")
        for i, x in enumerate(scores):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                return f"'{key}_scores[{i}]' must be a finite number, got {x!r}"
    return None


def _describe(value: Any) -> str:
    return f"{len(value)} item(s)" if isinstance(value, list) else type(value).__name__


def read_jsonl(path: str) -> list[Example]:
    """Read and check a whole JSONL file before any model is loaded.

    Every line is checked, so a user fixing their data sees the first few problems at once
    instead of one per run. Empty lines are skipped; a UTF-8 BOM and CRLF line ends are fine.
    """
    with open(path, "rb") as f:
        raw = f.read()
    problems: list[str] = []
    examples: list[Example] = []
    for lineno, line_bytes in enumerate(raw.splitlines(), start=1):
        try:
            line = line_bytes.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line)")
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        problem = check_row(obj)
        if problem:
            problems.append(f"{path}:{lineno}: {problem}")
            continue
        examples.append(Example(obj["query"], list(obj["pos"]), list(obj.get("neg", [])), lineno,
                                **{k: obj.get(k) for k in OPTIONAL}))
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        if more:
            shown.append(f"{path}: ... and {more} more problem(s)")
        raise DataError("\n".join(shown))
    if not examples:
        raise DataError(f"{path}:1: the file holds no training rows")
    return examples
