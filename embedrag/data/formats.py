"""Where rows come from: JSONL, Parquet, a `save_to_disk` folder or a hub dataset, as
memory-mapped Arrow through Hugging Face datasets.

Reading a large JSONL into Python objects costs memory in the most expensive form there is (a
few hundred thousand rows of mined negatives fill tens of GB). Here every input becomes an
Arrow table on disk that the process maps rather than holds: a JSONL file is checked and
converted in one streaming pass (cached by its path, size and modification time, so a second
run starts from the cache), the other formats are checked in Arrow batches. Every problem is
reported as `file:line: what is wrong` for JSONL and `source: row N: what is wrong` for the
others, the first five of them, before any model is loaded.

    --train_dataset data.jsonl                 JSONL, one {"query", "pos", "neg"} per line
    --train_dataset data.parquet               Parquet with those columns
    --train_dataset path/to/saved              a folder written by Dataset.save_to_disk
    --train_dataset hub:org/name[:split]       a dataset on the hub (split "train" by default)
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

from embedrag.data.passages import text_hash
from embedrag.data.rows import MAX_REPORTED_PROBLEMS, OPTIONAL, DataError, check_row, row_features
from embedrag.io import replacing

HUB = "hub:"
COLUMNS = ("query", "pos", "neg")


def _raise(problems: list[str], total: int, source: str) -> None:
    shown = problems[:MAX_REPORTED_PROBLEMS]
    if total > len(shown):
        shown.append(f"{source}: ... and {total - len(shown)} more problem(s)")
    raise DataError("\n".join(shown))


def _jsonl_rows(path: str):
    """Checked rows of a JSONL file, streamed; DataError at the end if any line was bad."""
    problems, count, rows = [], 0, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                problem = f"not UTF-8 text (byte {e.start} of the line)"
            else:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    problem = f"not valid JSON ({e.msg} at column {e.colno})"
                else:
                    problem = check_row(obj)
            if problem:
                count += 1
                if len(problems) < MAX_REPORTED_PROBLEMS:
                    problems.append(f"{path}:{lineno}: {problem}")
                continue
            rows += 1
            yield {"query": obj["query"], "pos": list(obj["pos"]),
                   "neg": list(obj.get("neg") or []), "line": lineno,
                   **{k: obj.get(k) for k in OPTIONAL}}
    if count:
        _raise(problems, count, path)
    if not rows:
        raise DataError(f"{path}:1: the file holds no training rows")


def jsonl_objects(path: str):
    """The JSON objects of a JSONL file with their line number in 'line', streamed; DataError
    at the first line that is not a JSON object (for --streaming, which cannot read ahead)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                obj = json.loads(line) if line.strip() else None
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the "
                                f"line)") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column "
                                f"{e.colno})") from None
            if obj is None:
                continue
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got "
                                f"{type(obj).__name__}")
            yield {**{k: obj[k] for k in (*COLUMNS, "prompt") if k in obj}, "line": lineno}


def _from_jsonl(path: str) -> Any:
    return _arrow(_jsonl_rows, path, row_features())


def _arrow(generator: Any, path: str, features: Any) -> Any:
    """The rows `generator(path)` yields, as a memory-mapped Arrow dataset cached in datasets'
    cache folder. The cache key is the file's identity (path, size, modification time): a
    changed file is read and checked again. Rows are written in record batches of BATCH_ROWS,
    straight from Python lists (datasets' `from_generator` encodes row by row, several times
    slower); the file appears whole or not at all."""
    import datasets

    stat = os.stat(path)
    stamp = _stamp(generator.__name__, os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    folder = os.path.join(datasets.config.HF_DATASETS_CACHE, "embedrag")
    target = os.path.join(folder, f"{generator.__name__.strip('_')}-{stamp}.arrow")
    if not os.path.isfile(target):
        from filelock import FileLock

        os.makedirs(folder, exist_ok=True)
        # The processes of a run on one machine: one converts, the others wait for its file
        # (or, if it found bad rows, check the file themselves and say the same).
        with FileLock(target + ".lock"):
            if not os.path.isfile(target):
                _write_arrow(generator(os.path.abspath(path)), target,
                             features.arrow_schema)
    ds = datasets.Dataset.from_file(target)
    ds._fingerprint = stamp  # what later cached steps (hashing) key on
    return ds


BATCH_ROWS = 10_000


def _write_arrow(rows: Any, target: str, schema: Any) -> None:
    """`rows` (dicts) as an Arrow stream file at `target`, whole or not at all."""
    import pyarrow as pa

    with replacing(target) as tmp, pa.OSFile(tmp, "wb") as sink, \
            pa.ipc.new_stream(sink, schema) as writer:
        while batch := list(itertools.islice(rows, BATCH_ROWS)):
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))


def _stamp(*parts: Any) -> str:
    import hashlib

    return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()


def _check_arrow(ds: Any, source: str) -> Any:
    """Columns and rows of a non-JSONL input, checked batch by batch (row indices, 0-based)."""
    missing = [c for c in ("query", "pos") if c not in ds.column_names]
    if missing:
        raise DataError(f"{source}: no '{missing[0]}' column (columns: "
                        f"{', '.join(ds.column_names)})")
    features = row_features()
    if "neg" not in ds.column_names:
        ds = ds.add_column("neg", [[]] * len(ds), feature=features["neg"])
    for name in OPTIONAL:
        if name not in ds.column_names:
            ds = ds.add_column(name, [None] * len(ds), feature=features[name])
    names = [*COLUMNS, *OPTIONAL]
    ds = ds.select_columns(names)
    problems, count = [], 0
    for start in range(0, len(ds), 10_000):
        batch = ds[start:start + 10_000]
        for offset, row in enumerate(zip(*(batch[c] for c in names), strict=True)):
            problem = check_row({k: v for k, v in zip(names, row, strict=True)
                                 if v is not None or k not in OPTIONAL})
            if problem:
                count += 1
                if len(problems) < MAX_REPORTED_PROBLEMS:
                    problems.append(f"{source}: row {start + offset}: {problem}")
    if count:
        _raise(problems, count, source)
    if not len(ds):
        raise DataError(f"{source}: no training rows")
    ds = ds.add_column("line", list(range(len(ds))), feature=features["line"])
    # a full rewrite only when a column's type differs (e.g. float32 scores)
    return ds if ds.features == features else ds.cast(features)


def kind_of(spec: str) -> str:
    """Which reader an input needs: "hub" (hub:ORG/NAME[:SPLIT]), "saved" (a folder written by
    datasets' save_to_disk), "folder" (a folder of data files), "parquet" or "jsonl"."""
    if spec.startswith(HUB):
        return "hub"
    if os.path.isdir(spec):
        saved = any(os.path.isfile(os.path.join(spec, f))
                    for f in ("state.json", "dataset_dict.json"))
        return "saved" if saved else "folder"
    return "parquet" if spec.endswith(".parquet") else "jsonl"


def hub_name(spec: str) -> tuple[str, str]:
    """hub:ORG/NAME[:SPLIT] -> (ORG/NAME, SPLIT or "train")."""
    name, _, split = spec[len(HUB):].partition(":")
    return name, split or "train"


_ROWS: dict[tuple[str, float, int], int | None] = {}


def count_rows(spec: str) -> int | None:
    """Rows of a training-format input (JSONL: non-empty lines; Parquet; a save_to_disk
    folder), or None when it cannot be told cheaply (a Hub dataset, a stream, gone)."""
    if not spec or not os.path.exists(spec):
        return None
    stat = os.stat(spec)
    key = (os.path.abspath(spec), stat.st_mtime, stat.st_size)
    if key not in _ROWS:  # checkpoints of one run count once
        try:
            kind = kind_of(spec)
            if kind in ("saved", "folder"):
                from datasets import load_from_disk

                _ROWS[key] = load_from_disk(spec).num_rows
            elif kind == "parquet":
                import pyarrow.parquet as pq

                _ROWS[key] = pq.ParquetFile(spec).metadata.num_rows
            else:
                with open(spec, "rb") as f:
                    _ROWS[key] = sum(1 for line in f if line.strip())
        except Exception:  # a card never fails a save over a row count
            _ROWS[key] = None
    return _ROWS[key]


def load_rows(spec: str) -> Any:
    """A checked `datasets.Dataset` with columns query, pos, neg and line (the JSONL line, or
    the row index for other formats); DataError naming the problems otherwise."""
    import datasets

    kind = kind_of(spec)
    if kind == "hub":
        name, split = hub_name(spec)
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # not reachable offline, no such dataset or split
            raise DataError(f"{spec}: cannot load ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
        return _check_arrow(ds, spec)
    if kind in ("saved", "folder"):
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{spec}: a DatasetDict without a 'train' split "
                                f"({', '.join(ds)}); save the split you mean")
            ds = ds["train"]
        return _check_arrow(ds, spec)
    if kind == "parquet":
        return _check_arrow(datasets.load_dataset("parquet", data_files=spec, split="train"),
                            spec)
    return _from_jsonl(spec)


def exists(spec: str) -> bool:
    """Whether the flag names something loadable at all (hub ids are checked when loaded)."""
    return spec.startswith(HUB) or os.path.isfile(spec) or os.path.isdir(spec)


def _corpus_lines(path: str):
    """Passages of a corpus file: JSONL with a 'text' field, or one passage a line."""
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj.get("text"), str) or not obj["text"].strip():
                    raise DataError(f"{path}:{lineno}: needs a non-empty 'text' string")
                line = obj["text"]
            yield {"text": line}


class TextColumn:
    """The distinct passages of a corpus file, in memory-mapped Arrow: a sequence of strings
    read one at a time, so a million passages never sit in Python at once."""

    def __init__(self, path: str):
        import datasets
        import numpy as np

        ds = _arrow(_corpus_lines, path, datasets.Features({"text": datasets.Value("string")}))
        self.dataset = ds
        self._column = ds.data.column("text")
        hashes = np.fromiter((text_hash(t) for batch in ds.iter(10_000) for t in batch["text"]),
                             dtype=np.int64, count=len(ds))
        _, first = np.unique(hashes, return_index=True)
        self.rows = np.sort(first)                     # distinct texts, in first-seen order

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> str:
        return self._column[int(self.rows[i])].as_py()

    def __iter__(self):
        return (self[i] for i in range(len(self)))
