#!/usr/bin/env python
"""Score training rows with a teacher model, for distillation (train.py --kd_weight).

    python score_teacher.py --teacher MODEL --input train.jsonl --output train.scored.jsonl

Writes every row of --input with `pos_scores` and `neg_scores` added (one number per passage,
FlagEmbedding's format). The teacher is an embedding model (anything train.py accepts; scores
are cosines) or a cross-encoder (AutoModelForSequenceClassification; scores are its relevance
logits), told apart by its config unless --kind says. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from embedrag.mining.teacher import KINDS

    p = argparse.ArgumentParser(prog="score_teacher.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="Teacher model folder or hub id.")
    p.add_argument("--input", required=True, help="JSONL rows in the training format.")
    p.add_argument("--output", required=True, help="Where the scored rows go (JSONL).")
    p.add_argument("--kind", choices=KINDS, default="auto",
                   help="auto: a sequence classifier is a cross-encoder, anything else an "
                        "embedding model.")
    p.add_argument("--batch_size", type=int, default=32, help="Texts (pairs) per forward pass.")
    p.add_argument("--max_len", type=int, default=512, help="Cross-encoder: tokens per pair.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --output.")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="Run code shipped with the model repository.")
    args = p.parse_args(argv)

    def fail(message: str) -> int:
        print(f"score_teacher.py: error: {message}", file=sys.stderr)
        return 2

    if args.batch_size <= 0 or args.max_len <= 0:
        return fail("--batch_size and --max_len must be positive")
    if not os.path.isfile(args.input):
        return fail(f"--input {args.input}: no such file")
    if not args.input.endswith((".jsonl", ".json")):
        return fail(f"--input {args.input}: a JSONL file is expected")
    if os.path.realpath(args.output) == os.path.realpath(args.input):
        return fail("--output must not be --input")
    if os.path.exists(args.output) and not args.overwrite:
        return fail(f"--output {args.output} exists; pass --overwrite to replace it")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        return fail(f"--output {args.output}: no such folder")
    from embedrag.data.formats import load_rows
    from embedrag.data.rows import DataError

    try:
        load_rows(args.input)  # every line checked before a model loads
    except DataError as e:
        for line in str(e).splitlines():
            print(f"score_teacher.py: error: {line}", file=sys.stderr)
        return 2
    from embedrag.mining.teacher import (
        CrossEncoderTeacher,
        EmbeddingTeacher,
        score_file,
        teacher_kind,
    )

    kind = teacher_kind(args.teacher) if args.kind == "auto" else args.kind
    try:
        teacher = (CrossEncoderTeacher(args.teacher, args.batch_size, args.max_len,
                                       args.trust_remote_code) if kind == "cross-encoder"
                   else EmbeddingTeacher(args.teacher, args.batch_size, args.trust_remote_code))
    except (OSError, ValueError) as e:
        return fail(f"--teacher {args.teacher}: {str(e).strip().splitlines()[0]}")
    tmp = args.output + ".tmp"
    try:
        rows = score_file(teacher, args.input, tmp)
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"score_teacher.py: {rows} rows scored by {kind} {args.teacher} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
