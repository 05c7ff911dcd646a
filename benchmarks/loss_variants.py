#!/usr/bin/env python
"""Which loss trains the better model? Every variant, both man-page sets, several seeds.

    python benchmarks/loss_variants.py [--models minilm gemma] [--sets en zh] [--seeds 1 2 3]
                                       [--variants ...] [--workdir DIR]

Each variant trains the same model on the same rows with the same settings and seed; held-out
nDCG@10 is printed as mean ± standard deviation over the seeds, beside sentence-transformers'
MultipleNegativesRankingLoss with the same rows, batch, negatives, lengths, learning rate,
warm-up, steps and scale (1 / temperature), trained by benchmarks/st_compare.py's worker.

- minilm: all-MiniLM-L6-v2, full fine-tuning, mean pooling, lr 2e-5, fp32;
- gemma:  Gemma-3-270M, LoRA (r 8, alpha 32, dropout 0.1), last-token pooling, lr 2e-4, bf16
  autocast with the frozen base in bf16 (both tools; what `auto` picks on a CPU with native
  bf16, and ~1.4x faster than fp32 here).
Both: one epoch, batch 8, 2 hard negatives, queries 64 / passages 128 tokens.

Variants (flags added to train.py): infonce (today's loss), gte (--gte_negatives 1),
margin (--false_negative_margin 0.1), gte+margin, and temperature 0.05 instead of 0.02.
Ablations, run only when named in --variants: "cpu_kernels off" (torch's dropout and attention
instead of embedrag/cpu/kernels.py's).
Results are cached per run in the workdir, so an interrupted benchmark resumes and several
invocations (say one per core, each with its own --sets) can share one workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import gemma, minilm, score, train  # noqa: E402

DATA = os.path.join(ROOT, "datasets")
SETS = {name: (os.path.join(DATA, f"manpages_{stem}_train.jsonl"),
               os.path.join(DATA, f"manpages_{stem}_eval.jsonl"))
        for name, stem in (("en", "en"), ("zh", "zh_tw"))}
MODELS = {"minilm": {"finetune_type": "full", "pooling": "mean", "lr": "2e-5",
                     "append_eos": False, "precision": "fp32"},
          "gemma": {"finetune_type": "lora", "pooling": "last", "lr": "2e-4", "append_eos": True,
                    "precision": "bf16"}}
VARIANTS = {"infonce": [], "gte": ["--gte_negatives", "1"],
            "margin": ["--false_negative_margin", "0.1"],
            "gte+margin": ["--gte_negatives", "1", "--false_negative_margin", "0.1"],
            "temperature 0.05": ["--temperature", "0.05"]}
# Not loss variants, run only when named: does a speed feature cost quality?
ABLATIONS = {"cpu_kernels off": ["--cpu_kernels", "off"]}
FLAGS = {**VARIANTS, **ABLATIONS}  # what each named run adds to train.py's command
TEMPERATURE, BATCH, NEGS, QLEN, PLEN = 0.02, 8, 2, 64, 128


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["minilm", "gemma"])
    p.add_argument("--sets", nargs="+", choices=sorted(SETS), default=["en", "zh"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--variants", nargs="+",
                   choices=[*FLAGS, "sentence-transformers"],
                   default=[*VARIANTS, "sentence-transformers"])
    p.add_argument("--workdir", default=None)
    return p.parse_args(argv)


def model_path(name: str) -> str:
    return minilm() if name == "minilm" else gemma()


def ours(model: str, data: str, variant: str, seed: int, out: str) -> str:
    spec = MODELS[model]
    if not os.path.isfile(os.path.join(out, "training_summary_report.json")):
        train(["--model_name_or_path", model_path(model), "--train_dataset", SETS[data][0],
               "--finetune_type", spec["finetune_type"], "--pooling", spec["pooling"],
               "--lr", spec["lr"], "--epochs", "1", "--batch_size", str(BATCH),
               "--neg_nums", str(NEGS), "--temperature", str(TEMPERATURE),
               "--query_max_len", str(QLEN), "--passage_max_len", str(PLEN),
               "--warmup_proportion", "0.1", "--seed", str(seed),
               "--mixed_precision", "bf16" if spec["precision"] == "bf16" else "no",
               "--save_on_epoch_end", "0", "--logging_steps", "10", "--overwrite_output_dir",
               *FLAGS[variant]], out)
    return os.path.join(out, "final")


def theirs(model: str, data: str, seed: int, out: str) -> str:
    from benchmarks import st_compare

    spec = MODELS[model]
    args = st_compare.parse(["--job", model, "--model", model_path(model), "--train",
                             SETS[data][0], "--batch_size", str(BATCH), "--neg_nums", str(NEGS),
                             "--query_max_len", str(QLEN), "--passage_max_len", str(PLEN),
                             "--lr", spec["lr"], "--temperature", str(TEMPERATURE),
                             "--seed", str(seed), "--limit_train", "0"])
    if not os.path.isfile(os.path.join(out, "st_stats.json")):
        st_compare.run_sentence_transformers(args, out, spec["precision"])
    return os.path.join(out, "final")


def cached(folder: str, setup: dict[str, Any], measure: Callable[..., dict[str, float]],
           *args: Any) -> float:
    """nDCG@10 from folder/heldout_ndcg.json, measured (measure(*args)) and written there the
    first time, with the `setup` it was measured under. A result measured under another setup
    (an older version of this benchmark) is refused rather than reported as this one."""
    done = os.path.join(folder, "heldout_ndcg.json")
    if not os.path.isfile(done):
        found = {**measure(*args), "setup": setup}
        os.makedirs(folder, exist_ok=True)
        with open(done + f".{os.getpid()}", "w") as f:  # whole or absent for a parallel reader
            json.dump(found, f)
        os.replace(done + f".{os.getpid()}", done)
    with open(done) as f:
        found = json.load(f)
    if found.get("setup", setup) != setup:
        raise SystemExit(f"{done}: measured under {found['setup']}, not {setup}; "
                         "delete that folder to run it again")
    return found["ndcg@10"]


def trained(model: str, data: str, variant: str, seed: int, out: str,
            rows: list) -> dict[str, float]:
    """Train one variant (or sentence-transformers) and score it on the held-out rows."""
    spec = MODELS[model]
    folder = (theirs(model, data, seed, out) if variant == "sentence-transformers"
              else ours(model, data, variant, seed, out))
    return score(folder, rows, spec["pooling"], PLEN, spec["append_eos"])


def main() -> None:
    from embedrag.data.rows import read_jsonl

    args = parse()
    work = args.workdir or tempfile.mkdtemp(prefix="loss_variants_")
    os.makedirs(work, exist_ok=True)
    results = {}
    for model in args.models:
        spec = MODELS[model]
        for data in args.sets:
            rows = read_jsonl(SETS[data][1])
            results[f"{model}/{data}/base"] = cached(
                os.path.join(work, f"{model}_{data}_base"), {"len": PLEN, **spec}, score,
                model_path(model), rows, spec["pooling"], PLEN, spec["append_eos"])
            for variant in args.variants:
                for seed in args.seeds:
                    key = f"{model}/{data}/{variant}/{seed}"
                    out = os.path.join(work, key.replace("/", "_").replace(" ", "_"))
                    # One result file per run, so several invocations (other --sets or --seeds,
                    # one per core) can share a workdir and an interrupted one resumes.
                    setup = {**spec, "variant": FLAGS.get(variant),
                             "temperature": TEMPERATURE, "batch": BATCH, "negatives": NEGS,
                             "lengths": [QLEN, PLEN], "st_eos": "tokenizer, after truncation"}
                    results[key] = cached(out, setup, trained, model, data, variant, seed, out,
                                          rows)
                    print(f"{key}: nDCG@10 {results[key]:.4f}", flush=True)
    report(results, args)


def report(results: dict[str, float], args: argparse.Namespace) -> None:
    """Mean ± sample standard deviation per variant, and each variant's lead over
    sentence-transformers, called a win only when it exceeds both spreads."""
    print(f"\nheld-out nDCG@10, mean ± std over seeds {args.seeds}")
    for model in args.models:
        for data in args.sets:
            print(f"{model} / {data}  (base model {results[f'{model}/{data}/base']:.4f})")
            stats = {}
            for variant in args.variants:
                values = [results[f"{model}/{data}/{variant}/{s}"] for s in args.seeds]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                stats[variant] = (statistics.mean(values), spread)
                print(f"  {variant:<24}{stats[variant][0]:.4f} ± {spread:.4f}  "
                      f"({', '.join(f'{v:.4f}' for v in values)})")
            if "sentence-transformers" not in stats:
                continue
            theirs_mean, theirs_spread = stats.pop("sentence-transformers")
            for variant, (mean, spread) in stats.items():
                lead = mean - theirs_mean
                verdict = ("ahead" if lead > max(spread, theirs_spread) else
                           "behind" if -lead > max(spread, theirs_spread) else "within spread")
                print(f"  {variant:<24}vs sentence-transformers {lead:+.4f} ({verdict})")


if __name__ == "__main__":
    main()
