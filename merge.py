#!/usr/bin/env python
"""Fold a LoRA/QLoRA adapter trained by train.py into its base model, verified.

    python merge.py --base_model_path BASE --lora_adapter_path out/final \
        --output_path merged [--training_precision float32]

The output is a plain Hugging Face model folder (AutoModel.from_pretrained) with the tokenizer,
and also a sentence-transformers model (SentenceTransformer(output_path)) that embeds as
training did. A QLoRA adapter goes into the base as training saw it (its quantized weights,
dequantized) unless --qlora_base original; --eval_dataset scores the candidates first.
Exit codes: 0 merged and verified; 1 verification failed; 2 bad input.
Nothing is written unless the merge is verified.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="merge.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base_model_path", required=True,
                   help="The base model the adapter was trained on (folder or hub id).")
    p.add_argument("--lora_adapter_path", required=True,
                   help="The adapter: its adapter_model.safetensors or the folder holding it "
                        "(e.g. output_dir/final).")
    p.add_argument("--output_path", required=True, help="Folder for the merged model.")
    p.add_argument("--training_precision", default="float32",
                   choices=["float32", "bfloat16", "float16"],
                   help="dtype to load the base in, merge and save. float32 is exact (checked "
                        "to 1e-4); bfloat16/float16 halve the size and are checked to 2e-2/5e-3.")
    p.add_argument("--qlora_base", default="dequantized", choices=["dequantized", "original"],
                   help="QLoRA adapters only: merge into the base as training saw it (its "
                        "4/8-bit weights dequantized: the model training and evaluate.py "
                        "measured) or into the original full-precision weights.")
    p.add_argument("--eval_dataset", default="",
                   help="JSONL in the training format: score the trained model and the merge "
                        "candidates on it, side by side, before writing.")
    p.add_argument("--eval_batch_size", type=int, default=32,
                   help="Texts per forward pass when scoring --eval_dataset.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace a non-empty --output_path.")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="Run code shipped with the base model's repository (a base that ships "
                        "its own modeling code is refused without it).")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    from embedrag.data.rows import DataError, read_jsonl
    from embedrag.publish.merge import MergeError, VerificationError, merge

    hf_logging.disable_progress_bar()

    try:
        examples = read_jsonl(args.eval_dataset) if args.eval_dataset else None
        merge(args.base_model_path, args.lora_adapter_path, args.output_path,
              args.training_precision, args.overwrite, qlora_base=args.qlora_base,
              eval_examples=examples, eval_batch_size=args.eval_batch_size,
              trust_remote_code=args.trust_remote_code)
    except DataError as e:
        for line in str(e).splitlines():
            print(f"merge.py: error: {line}", file=sys.stderr)
        return 2
    except MergeError as e:
        print(f"merge.py: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # e.g. a base model folder that is not a model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"merge.py: error: {first}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"merge.py: verification failed: {e}", file=sys.stderr)
        return 1
    print(f"merged model written to {args.output_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
