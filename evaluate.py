#!/usr/bin/env python
"""Retrieval metrics of an embedding model on a JSONL file in the training format.

    python evaluate.py --model_path output_dir/final --eval_dataset eval.jsonl \
        [--output_file metrics.json]

The model may be a base model, a merged model, a full fine-tune, or an adapter folder (applied
on its base). The corpus is every distinct `pos` and `neg` passage of the file; a query's
relevant documents are its `pos`. Pooling, prompts, lengths and EOS handling default to the
model's training_config.json, else to its own sentence-transformers recipe. Exit codes: 0 done,
2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_path", required=True,
                   help="Model folder or hub id: base, merged, full fine-tune or adapter.")
    p.add_argument("--eval_dataset", required=True,
                   help="JSONL with query/pos/neg rows, or a folder in the BEIR layout "
                        "(corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv) as MTEB uses.")
    p.add_argument("--split", default="test", help="BEIR folders: the qrels split to score.")
    p.add_argument("--pooling", choices=["last", "mean", "cls"], default=None,
                   help="Default: training_config.json's, else the model's own "
                        "(sentence-transformers config), else last.")
    p.add_argument("--query_instruction", default=None,
                   help="Prefix for queries. Default: training_config.json's, else the "
                        "model's 'query' prompt, else none.")
    p.add_argument("--passage_instruction", default=None,
                   help="Prefix for passages. Default: training_config.json's, else the "
                        "model's 'document' prompt, else none.")
    p.add_argument("--query_max_len", type=int, default=None,
                   help="Default: training_config.json's, else the model's max_seq_length, "
                        "else 256 (never more than the model takes).")
    p.add_argument("--passage_max_len", type=int, default=None,
                   help="Default: training_config.json's, else the model's max_seq_length, "
                        "else 1024 (never more than the model takes).")
    p.add_argument("--append_eos", choices=["auto", "yes", "no"], default=None,
                   help="Append EOS to every text. Default: as in training; auto for a "
                        "plain model.")
    p.add_argument("--batch_size", type=int, default=32, help="Texts per forward pass.")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="Weights' dtype for inference.")
    p.add_argument("--dims", default=None,
                   help="Also score these prefixes of the embeddings (re-normalised), e.g. "
                        "256,128,64 (Matryoshka). Default: training_config.json's "
                        "matryoshka_dims.")
    p.add_argument("--output_file", default=None, help="Write the metrics here as JSON.")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="Run code shipped with the model repository.")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "query_max_len", "passage_max_len"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.exit(2, f"evaluate.py: error: --{name} must be positive, got {value}\n")
    from embedrag.eval.beir import evaluate_beir, is_beir

    beir = is_beir(args.eval_dataset)
    if beir and not os.path.isfile(os.path.join(args.eval_dataset, "qrels", f"{args.split}.tsv")):
        parser.exit(2, f"evaluate.py: error: --eval_dataset {args.eval_dataset}: no "
                       f"qrels/{args.split}.tsv\n")
    if not beir and not os.path.isfile(args.eval_dataset):
        parser.exit(2, f"evaluate.py: error: --eval_dataset {args.eval_dataset}: no such file "
                       "(nor a BEIR folder)\n")

    from embedrag.config import parse_dims
    from embedrag.io import read_training_config

    try:  # before any model loads
        dims = ([d for d, _ in parse_dims(args.dims)] if args.dims is not None
                else (read_training_config(args.model_path) or {}).get("matryoshka_dims") or [])
    except ValueError as e:
        parser.exit(2, f"evaluate.py: error: --dims {args.dims}: {e}\n")

    import torch

    from embedrag.data.formats import load_rows
    from embedrag.data.rows import DataError
    from embedrag.eval.evaluate import evaluate, format_table
    from embedrag.model.embedding import embedding_width as model_width
    from embedrag.model.loading import load_embedder

    try:
        examples = None if beir else load_rows(args.eval_dataset)  # memory-mapped Arrow
    except DataError as e:
        for line in str(e).splitlines():
            print(f"evaluate.py: error: {line}", file=sys.stderr)
        return 2
    overrides = {name: getattr(args, name) for name in (
        "pooling", "query_instruction", "passage_instruction", "query_max_len",
        "passage_max_len", "append_eos")}
    try:
        model, tokenizer, settings = load_embedder(
            args.model_path, dtype=getattr(torch, args.dtype),
            trust_remote_code=args.trust_remote_code, overrides=overrides)
    except (OSError, ValueError) as e:
        print(f"evaluate.py: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    width = model_width(model)
    if dims and max(dims) >= width:
        print(f"note: --dims {', '.join(str(d) for d in dims if d >= width)}: the embeddings "
              f"have {width} dimensions; scored in full only", file=sys.stderr)
    if beir:
        metrics = evaluate_beir(model, tokenizer, args.eval_dataset, settings, split=args.split,
                                batch_size=args.batch_size, progress=True, dims=dims)
    else:
        metrics = evaluate(model, tokenizer, examples, settings, batch_size=args.batch_size,
                           progress=True, dims=dims)
    print(format_table({os.path.basename(os.path.normpath(args.model_path)): metrics}))
    if args.output_file:
        with open(args.output_file, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
