"""Several training files, one per optimizer step.

Users mix retrieval, QA and paraphrase sets, each with its own instruction. Negatives from
another task are trivially easy, so a batch mixing tasks teaches little; FlagEmbedding
(`same_dataset_within_batch`), sentence-transformers' round-robin/proportional batch samplers
and GritLM fill each batch from one set. Here every optimizer step — all its micro-batches, on
every process — draws its queries from one file:

    block = processes x batch size x accumulation steps   (the rows of one optimizer step)

`FileBatches` orders an epoch's rows block by block, each block from one file, and Accelerate's
batch sharding (process r takes batches r, W + r, ...) hands each process its share of the
block. The order is a function of (seed, epoch) alone, so a resumed run replays it, and an
epoch has a whole number of blocks, so no step straddles two files. Files are picked in
proportion to their rows (each contributes ceil(rows / block) blocks an epoch), or by
weights (the same number of blocks in all, shared out by weight; a file then repeats rows or
leaves some for the next epoch, drawn through a reshuffled cycle of its own rows).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from embedrag.config import TrainConfig
from embedrag.data.dataset import EpochShuffle, TextSettings, TrainingSet
from embedrag.data.formats import kind_of
from embedrag.data.rows import DataError

DATA_SUFFIXES = (".jsonl", ".parquet")


def expand(specs: list[str]) -> list[str]:
    """--train_dataset as files: a folder that is not a save_to_disk folder stands for the
    data files in it (sorted by name)."""
    files = []
    for spec in specs:
        if kind_of(spec) == "folder":
            found = sorted(os.path.join(spec, f) for f in os.listdir(spec)
                           if f.endswith(DATA_SUFFIXES))
            if not found:
                raise DataError(f"{spec}: a folder without .jsonl or .parquet files (nor one "
                                "written by save_to_disk)")
            files += found
        else:
            files.append(spec)
    return files


def _permutation(n: int, *key: Any) -> list[int]:
    seed = random.Random(":".join(map(str, key))).getrandbits(63)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class FileBatches(torch.utils.data.Sampler):
    """Indices into a MixedSet, `block` consecutive ones at a time from one file."""

    def __init__(self, sizes: list[int], block: int, seed: int,
                 weights: list[float] | None = None):
        self.sizes, self.block, self.seed, self.epoch = sizes, block, seed, 1
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        blocks = [math.ceil(n / block) for n in sizes]
        if weights:  # the epoch's blocks shared out by weight (at least one each)
            total = sum(blocks)
            blocks = [max(1, round(total * w / sum(weights))) for w in weights]
        self.blocks = blocks

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self.blocks) * self.block

    def plan(self) -> list[int]:
        """The file of each block of this epoch."""
        files = [f for f, k in enumerate(self.blocks) for _ in range(k)]
        return [files[i] for i in _permutation(len(files), self.seed, "files", self.epoch)]

    def __iter__(self):
        cursors, orders = [0] * len(self.sizes), [None] * len(self.sizes)
        for f in self.plan():
            for _ in range(self.block):  # the file's rows in a reshuffled cycle
                turn, at = divmod(cursors[f], self.sizes[f])
                if at == 0:
                    orders[f] = _permutation(self.sizes[f], self.seed, "rows", self.epoch, f, turn)
                cursors[f] += 1
                yield self.offsets[f] + orders[f][at]


class MixedSet(torch.utils.data.Dataset):
    """Several TrainingSets as one: rows and passages numbered file after file."""

    def __init__(self, parts: list[Any]):
        self.parts = parts
        self.row_offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).tolist()
        self.passage_offsets = np.concatenate(
            [[0], np.cumsum([p.table.size for p in parts])]).tolist()
        self.short_rows = sum(p.short_rows for p in parts)
        self.passages = self.passage_offsets[-1]

    def __len__(self) -> int:
        return self.row_offsets[-1]

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            part.set_epoch(epoch)

    def _where(self, offsets: list[int], number: int) -> tuple[int, int]:
        f = int(np.searchsorted(offsets, number, side="right")) - 1
        return f, number - offsets[f]

    def _by_file(self, offsets: list[int], numbers: list[int], kind: str) -> list[list[int]]:
        """Token ids of rows or passages (`kind`) numbered over all files, each file's
        tokenized in one call."""
        out: list[Any] = [None] * len(numbers)
        wanted: dict[int, list[tuple[int, int]]] = {}
        for i, number in enumerate(numbers):
            f, local = self._where(offsets, number)
            wanted.setdefault(f, []).append((i, local))
        for f, pairs in wanted.items():
            found = getattr(self.parts[f], f"{kind}_token_lists")([n for _, n in pairs])
            for (i, _), ids in zip(pairs, found, strict=True):
                out[i] = ids
        return out

    def query_token_lists(self, rows: list[int]) -> list[list[int]]:
        return self._by_file(self.row_offsets, rows, "query")

    def passage_token_lists(self, numbers: list[int]) -> list[list[int]]:
        return self._by_file(self.passage_offsets, numbers, "passage")

    def query_tokens(self, row: int) -> list[int]:
        return self.query_token_lists([row])[0]

    def passage_tokens(self, number: int) -> list[int]:
        return self.passage_token_lists([number])[0]

    def __getitem__(self, row: int) -> dict[str, Any]:
        f, local = self._where(self.row_offsets, row)
        item = self.parts[f][local]
        shift = self.passage_offsets[f]
        return {**item, "row": row, "pos": item["pos"] + shift,
                "negs": [n + shift for n in item["negs"]],
                "pos_set": [n + shift for n in item["pos_set"]], "file": f}


@dataclass(frozen=True)
class DataSettings:
    """How training rows become a dataset and an order, resolved once from the flags."""

    texts: TextSettings
    files: tuple[str, ...]              # --train_dataset, folders expanded to their files
    instructions: tuple[str, ...] = ()  # a query instruction per file ("" keeps the common one)
    weights: str = ""                   # --dataset_weights, as given
    teacher: bool = False               # rows carry teacher scores for distillation
    num_proc: int | None = None         # processes that tokenize

    @classmethod
    def from_config(cls, cfg: TrainConfig, texts: TextSettings) -> DataSettings:
        return cls(texts=texts, files=tuple(expand(cfg.train_files())),
                   instructions=tuple(cfg.dataset_instructions or ()),
                   weights=cfg.dataset_weights, teacher=cfg.kd_weight > 0,
                   num_proc=cfg.preprocessing_num_workers or None)


def training_data(rows: Any, tokenizer: Any, settings: DataSettings,
                  block: int) -> tuple[Any, Any, list[dict[str, Any]]]:
    """(dataset, sampler, what each file is) for one file (`rows`: a dataset or Examples) or
    several (`rows`: {file: dataset}). One file is a TrainingSet in EpochShuffle order;
    several are a MixedSet in FileBatches order, `block` rows of one file at a time."""
    texts = settings.texts
    if not isinstance(rows, dict):
        path = settings.files[0]
        data = TrainingSet(rows, tokenizer, source=path, num_proc=settings.num_proc,
                           **dataclasses.asdict(texts))
        data.teacher = settings.teacher  # items then carry their teacher scores
        if settings.teacher:
            _check_scored(path, data)
        return data, EpochShuffle(len(data), texts.seed), [_describe(
            path, data, texts.query_instruction, 1.0)]
    files = list(rows)
    instructions = list(settings.instructions) or [""] * len(files)
    weights = parse_weights(settings.weights)
    for name, values in (("--dataset_instructions", instructions),
                         ("--dataset_weights", weights)):
        if values and len(values) != len(files):
            raise DataError(f"{name}: {len(values)} given for {len(files)} training files "
                            f"({', '.join(files)})")
    parts = []
    for path, instruction in zip(files, instructions, strict=True):
        own = dataclasses.replace(texts, query_instruction=instruction or texts.query_instruction)
        parts.append(TrainingSet(rows[path], tokenizer, source=path, num_proc=settings.num_proc,
                                 **dataclasses.asdict(own)))
    for path, part in zip(files, parts, strict=True):
        part.teacher = settings.teacher
        if settings.teacher:
            _check_scored(path, part)
    small = [f"{path} ({len(part)} rows)" for path, part in zip(files, parts, strict=True)
             if len(part) < block]
    if small:  # a step takes `block` rows from one file: a smaller one repeats its rows
        print(f"note: {', '.join(small)} hold fewer rows than one step takes ({block} = "
              "processes x batch x accumulation); their steps repeat rows", file=sys.stderr)
    sampler = FileBatches([len(p) for p in parts], block, texts.seed, weights or None)
    share = np.array(sampler.blocks) / sum(sampler.blocks)
    described = [_describe(path, part, instruction or texts.query_instruction, float(s))
                 for path, part, instruction, s in zip(files, parts, instructions, share,
                                                       strict=True)]
    return MixedSet(parts), sampler, described


def parse_weights(spec: str) -> list[float]:
    """--dataset_weights '2,1' -> [2.0, 1.0]; DataError unless finite and positive."""

    try:
        weights = [float(w) for w in spec.split(",")] if spec else []
    except ValueError:
        raise DataError(f"--dataset_weights {spec}: not a list of numbers") from None
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise DataError(f"--dataset_weights {spec}: weights must be finite and positive")
    return weights


def where(path: str, line: int) -> str:
    """How a row is named in messages: file:line for JSONL, 'source: row N' otherwise."""
    return f"{path}:{line}" if path.endswith(".jsonl") else f"{path}: row {line}"


def _check_scored(path: str, data: Any) -> None:
    """Distillation needs a teacher score for every passage of every row: DataError naming
    the first row without them."""
    import pyarrow.compute as pc

    table = data.rows.data
    missing = pc.or_(pc.is_null(table.column("pos_scores")),
                     pc.and_(pc.is_null(table.column("neg_scores")),
                             pc.greater(pc.list_value_length(table.column("neg")), 0)))
    if pc.any(missing).as_py():
        row = int(pc.index(missing, True).as_py())
        raise DataError(f"{where(path, data.rows[row]['line'])}: no teacher scores "
                        "('pos_scores' and 'neg_scores'); --kd_weight needs one for every "
                        "passage (score_teacher.py writes them)")


def _describe(path: str, data: Any, instruction: str, share: float) -> dict[str, Any]:
    """What training_config.json records of a file."""
    prompts = data.rows.data.column("prompt")
    return {"path": path, "rows": len(data), "passages": data.table.size,
            "query_instruction": instruction, "rows_with_own_prompt": len(prompts)
            - prompts.null_count, "share_of_steps": round(share, 4),
            "rows_with_teacher_scores": len(data) - data.rows.data.column("pos_scores").null_count}
