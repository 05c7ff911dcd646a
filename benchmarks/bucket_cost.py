#!/usr/bin/env python
"""What a length bucket costs: one forward+backward call of the real model, fitted, and what
that says about the bucket plan's per-call overhead (embedrag.cpu.packing.BUCKET_OVERHEAD).

    python benchmarks/bucket_cost.py --job gemma --precision bf16
    python benchmarks/bucket_cost.py --job minilm --precision fp32

The model is loaded as train.py loads it (LoRA or full, base dtype, CPU kernels) and each
(rows x length) call is timed after a warm-up pass, on random ids with no padding. The fit is
seconds = a + b * positions + c * rows * length^2 (attention); a / b is a call's cost in token
positions, the unit of the bucket plan. It is an upper bound: each timed call starts its own
backward pass and autocast's weight casts, which a training step pays once, not per bucket.

Then the batches of st_compare's job (its defaults: the first 96 Traditional Chinese rows,
batch 8, 2 hard negatives, queries 64 / passages 256 tokens, in train.py's order) are planned
with several overheads, and for each plan the fit predicts the seconds of the epoch's
forward+backward calls and the share of padding computed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import gemma, minilm  # noqa: E402
from benchmarks.st_compare import JOBS  # noqa: E402
from benchmarks.st_compare import parse as job_settings  # noqa: E402

SHAPES = [(4, 32), (8, 32), (16, 32), (4, 64), (8, 64), (16, 64), (4, 128), (8, 128), (2, 256),
          (4, 256)]
OVERHEADS = (0, 32, 64, 100, 150, 256)


def call_seconds(model, dtype, vocab: int, rows: int, length: int) -> float:
    import torch

    ids = torch.randint(0, vocab, (rows, length))
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        emb = model(ids, torch.ones_like(ids))
    emb.square().sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def fit(model, dtype, vocab: int, repeats: int) -> tuple[float, float, float, float]:
    """(a, b, c) of seconds = a + b * n * L + c * n * L^2, least squares over SHAPES, and the
    fit's largest relative miss on a timed call."""
    import numpy as np

    for n, length in SHAPES:  # warm-up
        call_seconds(model, dtype, vocab, n, length)
    rows, secs = [], []
    for _ in range(repeats):
        for n, length in SHAPES:
            rows.append([1.0, n * length, n * length * length])
            secs.append(call_seconds(model, dtype, vocab, n, length))
    x, y = np.array(rows), np.array(secs)
    a, b, c = np.linalg.lstsq(x, y, rcond=None)[0]
    miss = float(np.max(np.abs(x @ np.array([a, b, c]) - y) / y))
    return float(a), float(b), float(c), miss


def job_masks(job, tokenizer, append_eos: bool) -> list:
    """The attention masks of one epoch of st_compare's job, queries and passages apart."""
    import torch

    from embedrag.data.dataset import Collator, EpochShuffle, TrainingSet
    from embedrag.data.rows import read_jsonl

    data = TrainingSet(read_jsonl(job.train)[: job.limit_train or None], tokenizer,
                       neg_nums=job.neg_nums, query_max_len=job.query_max_len,
                       passage_max_len=job.passage_max_len, query_instruction="",
                       append_eos=append_eos, seed=job.seed)
    data.set_epoch(1)
    loader = torch.utils.data.DataLoader(  # rows in train.py's order
        data, batch_size=job.batch_size, sampler=EpochShuffle(len(data), job.seed),
        collate_fn=Collator(data, tokenizer.pad_token_id, tokenizer.padding_side))
    return [m for b in loader for m in (b["query_attention_mask"], b["passage_attention_mask"])]


def main() -> None:
    import torch

    from embedrag.cpu.packing import length_buckets
    from embedrag.model.embedding import EmbeddingModel
    from embedrag.model.loading import ModelSettings, load_backbone, lora_input_casts
    from embedrag.model.tokens import load_tokenizer, resolve_append_eos
    from embedrag.train.checks import parse_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", choices=sorted(JOBS), default="gemma")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--repeats", type=int, default=2, help="timed passes over the shapes")
    args = p.parse_args()
    job = job_settings(["--job", args.job])
    finetune, pooling = JOBS[args.job]["finetune_type"], JOBS[args.job]["pooling"]
    path = minilm() if args.job == "minilm" else gemma()
    cfg = parse_args(["--model_name_or_path", path, "--train_dataset", job.train,
                      "--output_dir", "unused", "--batch_size", str(job.batch_size),
                      "--finetune_type", finetune,
                      "--pooling", pooling, "--mixed_precision",
                      {"fp32": "no"}.get(args.precision, args.precision)])
    torch.manual_seed(0)
    backbone, _ = load_backbone(ModelSettings.from_config(cfg), torch.device("cpu"))
    if finetune != "full":
        lora_input_casts(backbone, enabled=cfg.mixed_precision == "no")  # as train.py does
    model = EmbeddingModel(backbone, pooling).train()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    vocab = backbone.get_input_embeddings().num_embeddings
    a, b, c, miss = fit(model, dtype, vocab, args.repeats)
    print(f"{args.job} {finetune} {args.precision}, {torch.get_num_threads()} threads: a call "
          f"costs {a * 1e3:.1f} ms + {b * 1e3:.3f} ms per position + {c * 1e6:.2f} us per "
          f"position x length: a call = {a / b:.0f} positions (largest miss of the fit on a "
          f"timed call: {miss:.0%})")

    tokenizer = load_tokenizer(path)
    masks = job_masks(job, tokenizer, resolve_append_eos("auto", pooling, tokenizer))
    print(f"{'overhead':>9}{'calls':>7}{'padding':>9}{'predicted s':>13}")
    for overhead in OVERHEADS:
        calls = computed = real = 0
        seconds = 0.0
        for mask in masks:
            for bucket in length_buckets(mask, overhead):
                n, width = len(bucket.rows), bucket.window[1] - bucket.window[0]
                calls, computed = calls + 1, computed + n * width
                seconds += a + b * n * width + c * n * width * width
            real += int(mask.sum())
        print(f"{overhead:>9}{calls:>7}{1 - real / computed:>9.1%}{seconds:>13.1f}")


if __name__ == "__main__":
    main()
