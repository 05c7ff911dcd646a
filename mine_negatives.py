#!/usr/bin/env python
"""Mine hard negatives for (query, positive) rows, guarding against false negatives.

    python mine_negatives.py --input pairs.jsonl --output train.jsonl \
        --model_name_or_path MODEL [--pooling last] [--neg_nums 4]
    python mine_negatives.py --input pairs.jsonl --output train.jsonl --bm25

Reads JSONL rows (`neg` optional), ranks a corpus for each query (by default every `pos` of the
input; or --corpus: JSONL with a "text" field, or one passage a line) with an embedding model or
BM25, draws `--neg_nums` negatives from ranks --rank_start..--rank_end, never one equal to a
positive and never one scoring within the margins of the positive, and writes rows in the
training format. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mine_negatives.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL rows with query and pos (neg optional).")
    p.add_argument("--output", required=True, help="Where to write the rows with negatives.")
    p.add_argument("--corpus", default=None,
                   help="Passages to mine from: JSONL with a 'text' field, or plain text one "
                        "passage a line. Default: every distinct pos of --input.")
    p.add_argument("--model_name_or_path", default=None,
                   help="Embedding model to rank with: any model train.py accepts, or a "
                        "training output's final/ (its pooling and instruction are used).")
    p.add_argument("--pooling", choices=["last", "mean", "cls"], default=None,
                   help="Override the model's pooling (default: training_config.json's, "
                        "else last).")
    p.add_argument("--bm25", action="store_true",
                   help="Rank with BM25 (rank_bm25) instead of a model: no GPU, no model.")
    p.add_argument("--neg_nums", type=int, default=4, help="Negatives per row.")
    p.add_argument("--rank_start", type=int, default=10,
                   help="Best rank to draw from (1 = the top hit); the very top often holds "
                        "unlabeled positives.")
    p.add_argument("--rank_end", type=int, default=100, help="Worst rank to draw from.")
    p.add_argument("--relative_margin", type=float, default=0.95,
                   help="Drop candidates scoring above this fraction of the positive's score.")
    p.add_argument("--absolute_margin", type=float, default=0.0,
                   help="Drop candidates scoring above the positive's score minus this.")
    p.add_argument("--keep_existing", action="store_true",
                   help="Keep the rows' own negatives and add the mined ones to them.")
    p.add_argument("--seed", type=int, default=42, help="Seed of the draw from the window.")
    p.add_argument("--batch_size", type=int, default=64, help="Texts per forward pass.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --output.")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="Run code shipped with the model repository.")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"mine_negatives.py: error: {message}", file=sys.stderr)
        return 2

    if bool(args.bm25) == bool(args.model_name_or_path):
        return fail("give exactly one of --model_name_or_path and --bm25")
    if args.neg_nums <= 0 or not 1 <= args.rank_start <= args.rank_end:
        return fail("--neg_nums must be positive and 1 <= --rank_start <= --rank_end")
    if os.path.exists(args.output) and not args.overwrite:
        return fail(f"--output {args.output} exists; pass --overwrite to replace it")

    from embedrag.data.formats import TextColumn
    from embedrag.data.rows import DataError, read_jsonl
    from embedrag.mining.negatives import bm25_scores, embedding_ranker, mine

    try:
        examples = read_jsonl(args.input)
        corpus = (TextColumn(args.corpus) if args.corpus  # memory-mapped, read as needed
                  else list(dict.fromkeys(p for ex in examples for p in ex.pos)))
    except (DataError, ValueError, OSError) as e:
        return fail(str(e).splitlines()[0])
    queries = [ex.query for ex in examples]
    if args.bm25:
        scores = bm25_scores(queries, list(corpus))
    else:
        scores = embedding_ranker(args.model_name_or_path, args.pooling, args.batch_size,
                                  args.trust_remote_code)(queries, corpus)
    rows, report = mine(examples, corpus, scores, neg_nums=args.neg_nums,
                        rank_start=args.rank_start, rank_end=args.rank_end,
                        relative_margin=args.relative_margin,
                        absolute_margin=args.absolute_margin,
                        keep_existing=args.keep_existing, seed=args.seed)
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, args.output)  # never a half-written output
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
