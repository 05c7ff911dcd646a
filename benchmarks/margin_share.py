#!/usr/bin/env python
"""How much of a first batch `--false_negative_margin` drops, per model and man-page set.

    python benchmarks/margin_share.py [--rows 8] [--margins 0 0.05 0.1]

The first `rows` training rows of each set (query, positive, 2 hard negatives) are embedded
by the untrained model as train.py embeds them (all-MiniLM-L6-v2: mean pooling; Gemma-3-270M:
last token on an appended EOS; queries 64, passages 128 tokens), and `embedding_loss` scores
the batch with each margin. Printed: the share of in-batch candidates (positives aside) the
margin drops, and the mean cosine of the positives. A model that already ranks positives
first loses little; a base LM loses most of its negatives, which are its own errors.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import gemma, minilm  # noqa: E402

SETS = {"en": "datasets/manpages_en_train.jsonl", "zh": "datasets/manpages_zh_tw_train.jsonl"}


def main() -> None:
    import torch

    from embedrag.data.rows import read_jsonl
    from embedrag.losses import embedding_loss
    from embedrag.model.embedding import encode_with
    from embedrag.model.loading import load_embedder

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.05, 0.1])
    args = p.parse_args()
    print(f"first {args.rows} rows, 2 hard negatives; share of in-batch candidates dropped")
    print(f"{'model':<18}{'set':<5}{'positive cos':>13}"
          + "".join(f"{f'margin {m:g}':>12}" for m in args.margins))
    for name, path, eos in (("all-MiniLM-L6-v2", minilm(), False),
                            ("Gemma-3-270M", gemma(), True)):
        model, tokenizer, _ = load_embedder(path)
        for data, file in SETS.items():
            rows = read_jsonl(os.path.join(ROOT, file))[: args.rows]
            texts = [t for r in rows for t in [r.pos[0], *r.neg[:2]]]
            q = encode_with(model, tokenizer, [r.query for r in rows], max_len=64,
                            append_eos=eos)                                      # (B, D)
            passages = encode_with(model, tokenizer, texts, max_len=128, append_eos=eos)
            ids = torch.arange(len(texts))                                       # all distinct
            relevant = (torch.arange(len(rows)) * 3)[:, None]                    # (B, 1)
            positive = (q * passages[::3]).sum(-1).mean().item()
            shares = []
            for margin in args.margins:
                stats: dict = {}
                embedding_loss(q, passages, relevant, ids, 0.02, margin=margin, stats=stats)
                shares.append(stats["margin_dropped"].item())
            print(f"{name:<18}{data:<5}{positive:>13.3f}"
                  + "".join(f"{s:>12.0%}" for s in shares))


if __name__ == "__main__":
    main()
