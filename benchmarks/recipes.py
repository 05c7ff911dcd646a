#!/usr/bin/env python
"""Training recipes on real held-out data: Matryoshka, distillation, several files.

    python benchmarks/recipes.py [--parts matryoshka kd files] [--workdir DIR]

all-MiniLM-L6-v2, full fine-tuning, one epoch, batch 8, 2 hard negatives, lr 2e-5,
temperature 0.02, queries 64 / passages 128 tokens, on the man-page sets (datasets/):

- matryoshka: English; trained plainly, with --matryoshka_dims 384,256,128,64 and with the
  64-dimension prefix weighted 4x; held-out nDCG@10 of each at every prefix (the share of full
  quality kept at 64 dimensions). `--matryoshka_epochs 3 --matryoshka_lr 5e-5` gives the
  README's longer runs.
- kd: Traditional Chinese; the teacher is Gemma-3-270M LoRA-trained on it as the quick start
  does (40 steps), which scores every training row (score_teacher.py); the MiniLM student
  trains with --kd_weight 1 --kd_temperature 0.05 against the same student without it.
- files: English + Traditional Chinese as two files, one file per step, against the same rows
  in one file (mixed batches), the same number of steps; held-out nDCG@10 on each language.
Prints a table per part and writes results.json in the workdir.
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
from benchmarks.common import OFFLINE, gemma, minilm, train  # noqa: E402

DATA = os.path.join(ROOT, "datasets")
EN = (os.path.join(DATA, "manpages_en_train.jsonl"), os.path.join(DATA, "manpages_en_eval.jsonl"))
ZH = (os.path.join(DATA, "manpages_zh_tw_train.jsonl"),
      os.path.join(DATA, "manpages_zh_tw_eval.jsonl"))
MINILM_FLAGS = ["--finetune_type", "full", "--epochs", "1", "--batch_size", "8", "--neg_nums",
                "2", "--lr", "2e-5", "--temperature", "0.02", "--query_max_len", "64",
                "--passage_max_len", "128", "--save_on_epoch_end", "0", "--logging_steps", "10",
                "--mixed_precision", "no", "--seed", "42"]


def ndcg(model_dir: str, eval_file: str, dims: list[int] | None = None) -> dict[str, float]:
    """nDCG@10 on eval_file, embedded as the model was trained (and at each prefix)."""
    from embedrag.data.formats import load_rows
    from embedrag.eval.evaluate import evaluate
    from embedrag.model.loading import load_embedder

    model, tok, settings = load_embedder(model_dir)
    metrics = evaluate(model, tok, load_rows(eval_file), settings, batch_size=64, dims=dims)
    return {k: v for k, v in metrics.items() if k.endswith("ndcg@10")}


def run_train(name: str, work: str, flags: list[str]) -> str:
    out = os.path.join(work, name)
    if not os.path.isfile(os.path.join(out, "training_summary_report.json")):
        summary = train([*flags, "--overwrite_output_dir"], out)
        print(f"  {name}: {summary['totals']['steps']} steps in "
              f"{summary['totals']['seconds']:.0f} s", flush=True)
    return os.path.join(out, "final")


def matryoshka(work: str, epochs: int = 1, lr: str = "2e-5") -> dict:
    dims = [384, 256, 128, 64]
    flags = list(MINILM_FLAGS)
    flags[flags.index("--epochs") + 1], flags[flags.index("--lr") + 1] = str(epochs), lr
    base = [*flags, "--model_name_or_path", minilm(), "--train_dataset", EN[0]]
    tag = "" if (epochs, lr) == (1, "2e-5") else f"_{epochs}ep_lr{lr}"
    runs = {"plain": run_train(f"mrl_plain{tag}", work, base),
            "matryoshka": run_train(f"mrl{tag}", work,
                                    [*base, "--matryoshka_dims", "384,256,128,64"]),
            "64 weighted x4": run_train(f"mrl_weighted{tag}", work, [
                *base, "--matryoshka_dims", "384:1,256:1,128:2,64:4"])}
    rows = {name: ndcg(path, EN[1], dims) for name, path in runs.items()}
    rows["base model"] = ndcg(minilm(), EN[1], dims)
    print(f"{'nDCG@10 (en)':<14}" + "".join(f"{d:>10}" for d in dims) + f"{'64/384':>10}")
    for name, m in rows.items():
        values = [m["ndcg@10"]] + [m[f"dim{d}/ndcg@10"] for d in dims[1:]]
        print(f"{name:<14}" + "".join(f"{v:>10.4f}" for v in values)
              + f"{values[-1] / values[0]:>10.1%}")
    return rows


def kd(work: str) -> dict:
    teacher = run_train("kd_teacher", work, [
        "--model_name_or_path", gemma(), "--finetune_type", "lora", "--train_dataset", ZH[0],
        "--batch_size", "8", "--neg_nums", "1", "--query_max_len", "32", "--passage_max_len",
        "128", "--epochs", "1", "--max_steps", "40", "--lr", "2e-4", "--temperature", "0.05",
        "--warmup_proportion", "0.1", "--mixed_precision", "no", "--save_on_epoch_end", "0"])
    scored = os.path.join(work, "zh_scored.jsonl")
    if not os.path.isfile(scored):
        subprocess.run([sys.executable, os.path.join(ROOT, "score_teacher.py"), "--teacher",
                        teacher, "--input", ZH[0], "--output", scored, "--overwrite"],
                       check=True, env=OFFLINE)
    base = [*MINILM_FLAGS, "--model_name_or_path", minilm(), "--train_dataset", scored]
    runs = {"student, no KD": run_train("kd_student_plain", work, base),
            "student, KD": run_train("kd_student", work, [*base, "--kd_weight", "1",
                                                          "--kd_temperature", "0.05"])}
    rows = {name: ndcg(path, ZH[1]) for name, path in runs.items()}
    rows["teacher"] = ndcg(teacher, ZH[1])
    rows["base MiniLM"] = ndcg(minilm(), ZH[1])
    for name, m in rows.items():
        print(f"{name:<16} nDCG@10 (zh) {m['ndcg@10']:.4f}")
    return rows


def files(work: str, max_steps: int = 0) -> dict:
    mixed = os.path.join(work, "en_zh_mixed.jsonl")
    if not os.path.isfile(mixed):
        lines = [line for path in (EN[0], ZH[0]) for line in open(path, encoding="utf-8")]
        random.Random(0).shuffle(lines)
        with open(mixed, "w", encoding="utf-8") as f:
            f.writelines(lines)
    base = [*MINILM_FLAGS, "--model_name_or_path", minilm()]
    tag = ""
    if max_steps:  # the same number of steps for both, a part of the epoch
        base, tag = [*base, "--max_steps", str(max_steps)], f"_{max_steps}"
    runs = {"one file per step": run_train(f"files_split{tag}", work,
                                           [*base, "--train_dataset", EN[0], ZH[0]]),
            "mixed batches": run_train(f"files_mixed{tag}", work,
                                       [*base, "--train_dataset", mixed])}
    rows = {name: {"en": ndcg(path, EN[1])["ndcg@10"], "zh": ndcg(path, ZH[1])["ndcg@10"]}
            for name, path in runs.items()}
    rows["base model"] = {"en": ndcg(minilm(), EN[1])["ndcg@10"],
                          "zh": ndcg(minilm(), ZH[1])["ndcg@10"]}
    print(f"{'nDCG@10':<20}{'en':>10}{'zh':>10}")
    for name, m in rows.items():
        print(f"{name:<20}{m['en']:>10.4f}{m['zh']:>10.4f}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["matryoshka", "kd", "files"],
                   choices=["matryoshka", "kd", "files"])
    p.add_argument("--workdir", default=None)
    p.add_argument("--matryoshka_epochs", type=int, default=1)
    p.add_argument("--matryoshka_lr", default="2e-5")
    p.add_argument("--files_max_steps", type=int, default=0,
                   help="files: stop both runs after this many steps (0 = one epoch)")
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="recipes_")
    os.makedirs(work, exist_ok=True)
    results = {}
    for part in args.parts:
        print(f"== {part}", flush=True)
        run = {"matryoshka": lambda w: matryoshka(w, args.matryoshka_epochs, args.matryoshka_lr),
               "kd": kd,
               "files": lambda w: files(w, args.files_max_steps)}[part]
        results[part] = run(work)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
