#!/usr/bin/env python
"""Does mining help? Train the same model twice, with mined and with random negatives.

    python benchmarks/mined_vs_random.py [--limit_train 320 --max_len 64]

all-MiniLM-L6-v2 (full fine-tuning, mean pooling) on the English man-page training split with
its negatives replaced: once mined by mine_negatives.py with the model itself (ranks 3-30,
false-negative filtering on), once drawn at random from the same corpus. Same steps and
settings; prints nDCG@10 on the held-out split for the base model and both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import OFFLINE, minilm, score, train  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit_train", type=int, default=0)
    p.add_argument("--max_len", type=int, default=128)
    p.add_argument("--neg_nums", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workdir", default=None)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, float]:
    from embedrag.data.rows import read_jsonl

    model = minilm()
    work = args.workdir or tempfile.mkdtemp(prefix="mined_vs_random_")
    os.makedirs(work, exist_ok=True)
    rows = read_jsonl(os.path.join(ROOT, "datasets/manpages_en_train.jsonl"))
    if args.limit_train:
        rows = rows[: args.limit_train]
    pairs = os.path.join(work, "pairs.jsonl")
    with open(pairs, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"query": r.query, "pos": r.pos}) + "\n")
    mined = os.path.join(work, "mined.jsonl")
    subprocess.run([sys.executable, os.path.join(ROOT, "mine_negatives.py"), "--input", pairs,
                    "--output", mined, "--model_name_or_path", model, "--pooling", "mean",
                    "--neg_nums", str(args.neg_nums), "--rank_start", "3", "--rank_end", "30",
                    "--overwrite"], check=True, env=OFFLINE)
    corpus = [r.pos[0] for r in rows]
    rng = random.Random(0)
    randomised = os.path.join(work, "random.jsonl")
    with open(randomised, "w", encoding="utf-8") as f:
        for r in rows:
            negs = rng.sample([c for c in corpus if c not in r.pos], args.neg_nums)
            f.write(json.dumps({"query": r.query, "pos": r.pos, "neg": negs}) + "\n")
    eval_rows = read_jsonl(os.path.join(ROOT, "datasets/manpages_en_eval.jsonl"))

    def ndcg(path: str) -> float:
        return score(path, eval_rows, "mean", args.max_len)["ndcg@10"]

    result = {"base": ndcg(model)}
    for name, data in (("mined", mined), ("random", randomised)):
        out = os.path.join(work, name)
        train(["--model_name_or_path", model, "--train_dataset", data,
               "--overwrite_output_dir", "--finetune_type", "full", "--pooling", "mean",
               "--batch_size", "16", "--lr", "5e-5", "--epochs", str(args.epochs),
               "--neg_nums", str(args.neg_nums), "--temperature", "0.05",
               "--query_max_len", str(args.max_len), "--passage_max_len", str(args.max_len),
               "--warmup_proportion", "0.1", "--save_on_epoch_end", "0",
               "--logging_steps", "10"], out)
        result[name] = ndcg(os.path.join(out, "final"))
    return result


def main() -> None:
    result = run(parse())
    for name, value in result.items():
        print(f"nDCG@10 {name:8} {value:.4f}")


if __name__ == "__main__":
    main()
