"""Every train.py flag, defined once.

`TrainConfig` is the single source of truth: the argparse parser, `--help`, the checks of flag
combinations and the `training_config.json` written beside every saved model all come from it.
The seed's flags keep the seed's names and defaults; ours follow them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from embedrag import __version__

FINETUNE_TYPES = ("lora", "qlora", "full")
POOLINGS = ("last", "mean", "cls")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
MIXED_PRECISIONS = ("no", "fp16", "bf16", "auto")
APPEND_EOS = ("auto", "yes", "no")
ATTENTIONS = ("model", "bidirectional")


def _flag(help: str, **kw: Any) -> Any:
    """A dataclass field carrying its --help text (and choices/required) for the parser."""
    default = kw.pop("default", dataclasses.MISSING)
    if isinstance(default, list):  # a fresh list per instance
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- the seed's flags (names and defaults as the user wrote them) ---
    model_name_or_path: str = _flag("Base model: a local Hugging Face folder or a hub id.")
    train_dataset: list[str] = _flag(
        'Training rows {"query", "pos": [...], "neg": [...]}: a JSONL file (one per line), a '
        "Parquet file, a folder written by datasets' save_to_disk, or hub:ORG/NAME[:SPLIT]. "
        "Several (or a folder of .jsonl/.parquet files): every optimizer step then draws all of "
        "its queries from one of them (see --dataset_weights, --dataset_instructions).")
    output_dir: str = _flag("Where final/, checkpoints, JSON logs and runs/ (TensorBoard) go.")
    batch_size: int = _flag("Queries per optimizer micro-step on each process.")
    finetune_type: str = _flag(
        "lora: PEFT adapters on a frozen base; qlora: the same on a 4/8-bit quantized base "
        "(bitsandbytes); full: every weight trains.",
        default="qlora",
        choices=FINETUNE_TYPES,
    )
    quantization_bits: int = _flag(
        "QLoRA only: 4 (NF4, double quantization) or 8 (LLM.int8).", default=4, choices=(4, 8)
    )
    lr: float = _flag("Peak learning rate (the seed suggests 1e-4 for LoRA/QLoRA, 1e-5 for full).",
                      default=1e-4)
    epochs: int = _flag("Passes over the training data.", default=2)
    neg_nums: int = _flag(
        "Hard negatives per query, drawn from its `neg` list each epoch (topped up from other "
        "rows' passages when a row has fewer).", default=2)
    temperature: float = _flag("InfoNCE temperature; scores are cosine / temperature.",
                               default=0.02)
    gte_negatives: int = _flag(
        "1: GTE's improved contrastive loss: each query's denominator also holds the other "
        "queries, and its positive against the other queries and passages (Li et al., 2023).",
        default=0, choices=(0, 1))
    false_negative_margin: float = _flag(
        "When >= 0: a candidate whose cosine with the query is above the positive's minus this "
        "margin is dropped as a probable unlabelled positive instead of pushed away "
        "(NV-Retriever). -1: only exact-text false negatives are dropped.", default=-1.0)
    query_max_len: int | None = _flag(
        "Max tokens of a query, instruction and EOS included. Default: the model's "
        "max_seq_length (sentence-transformers config), else 256.", default=None)
    passage_max_len: int | None = _flag(
        "Max tokens of a passage, EOS included. Default: the model's max_seq_length "
        "(sentence-transformers config), else 1024.", default=None)
    lora_r: int = _flag("LoRA rank (size of the low-rank update).", default=8)
    lora_alpha: int = _flag("LoRA alpha (scaling = alpha / r).", default=32)
    lora_dropout: float = _flag("Dropout on the LoRA branch.", default=0.1)
    save_on_epoch_end: int = _flag("1: write checkpoint-epoch-N/ after every epoch; 0: don't.",
                                   default=1, choices=(0, 1))
    warmup_proportion: float = _flag(
        "Share of optimizer steps spent warming the learning rate up linearly from 0; "
        "it then decays linearly to 0.", default=0.05)
    # --- ours ---
    pooling: str | None = _flag(
        "How token states become one vector: last (last real token; decoders such as gte-Qwen2), "
        "mean (encoders such as MiniLM), cls. Default: the model's own (its sentence-"
        "transformers Pooling config), else last.", default=None, choices=POOLINGS)
    query_instruction: str | None = _flag(
        "Prefix added to every query, e.g. 'Instruct: Given a question, retrieve passages that "
        "answer it\\nQuery: '. Default: the model's 'query' prompt, else none.", default=None)
    passage_instruction: str | None = _flag(
        "Prefix added to every passage. Default: the model's 'document' prompt (as "
        "EmbeddingGemma's 'title: none | text: '), else none.", default=None)
    attention: str = _flag(
        "model: the model's own attention (causal for decoders); bidirectional: every token "
        "attends to every other, through transformers' own mask machinery (decoders such as "
        "Qwen2/3, Llama, Mistral, Gemma 3).", default="model", choices=ATTENTIONS)
    cpu_kernels: str = _flag(
        "auto: when training on a CPU, faster dropout masks, RMSNorm and attention "
        "(embedrag/cpu/kernels.py) where they compute what the model's own would, and each "
        "batch's texts packed into one row with no padding; off: the model's own operations "
        "only (padding cut by length buckets).", default="auto", choices=("auto", "off"))
    append_eos: str = _flag(
        "Append the EOS token to every text. auto: yes for last pooling when the tokenizer does "
        "not add it itself (how gte-Qwen2 and Qwen3-Embedding were trained).",
        default="auto", choices=APPEND_EOS)
    lora_target_modules: str = _flag(
        "Comma-separated module names to adapt. Default: every linear layer inside the "
        "transformer blocks (attention and MLP), found from the model.", default="")
    gradient_accumulation_steps: int = _flag(
        "Micro-steps per optimizer step. It does not add in-batch negatives.", default=1)
    max_grad_norm: float = _flag("Clip the global gradient norm to this (0 = no clipping).",
                                 default=1.0)
    weight_decay: float = _flag("AdamW weight decay (not applied to biases and norms).",
                                default=0.0)
    optim: str = _flag(
        "adamw: PyTorch's (fused); adamw_8bit: bitsandbytes' AdamW with 8-bit moments, a "
        "quarter of the optimizer memory (tensors under 4096 values keep 32-bit moments); "
        "paged_adamw_8bit: the same, its state paged out of GPU memory under pressure.",
        default="adamw", choices=OPTIMIZERS)
    seed: int = _flag("Seed for initialisation, shuffling and negative sampling.", default=42)
    num_workers: int = _flag("DataLoader worker processes.", default=0)
    dataset_weights: str = _flag(
        "Several --train_dataset files: how often each is picked for a step, e.g. '2,1' "
        "(one number per file, in order). Default: in proportion to their rows.", default="")
    dataset_instructions: list[str] = _flag(
        "Several --train_dataset files: the query instruction of each, in order ('' = "
        "--query_instruction). A row's own 'prompt' field overrides either.", default=[])
    kd_weight: float = _flag(
        "Distillation: add this times KL(teacher || student) over each query's own candidates "
        "(its positive and negatives) to InfoNCE; the teacher's scores come from the rows' "
        "pos_scores/neg_scores (see score_teacher.py). 0 = off.", default=0.0)
    kd_temperature: float = _flag("Distillation: the teacher scores' softmax temperature.",
                                  default=1.0)
    matryoshka_dims: str = _flag(
        "Matryoshka: train every listed prefix of the embedding as an embedding of its own, "
        "e.g. '384,256,128,64' or weighted '384:1,64:0.5' (the loss is the weighted sum over "
        "the prefixes, each re-normalised). '' = off.", default="")
    streaming: bool = _flag(
        "Read the training rows as they stream (a shuffle buffer, tokenized on the fly) instead "
        "of converting them first: for inputs too large even to convert. Needs --max_steps; "
        "no exact resume (see README).", default=False)
    shuffle_buffer: int = _flag("--streaming: rows in the shuffle buffer.", default=10000)
    preprocessing_num_workers: int = _flag(
        "Processes that number the training rows' passages (datasets' map over text "
        "hashes; cached, so a second run with the same data skips it). 0: every core for "
        "large sets, this process for small ones. Texts are tokenized per batch.", default=0)
    max_steps: int = _flag("Stop after this many optimizer steps (0 = run all epochs).", default=0)
    logging_steps: int = _flag("Write a log record every N optimizer steps.", default=1)
    eval_dataset: str = _flag(
        "JSONL in the training format to evaluate on before training and after every epoch "
        "(nDCG@10, MRR@10, recall@1/10/100, MAP@100; corpus = its distinct passages).",
        default="")
    eval_batch_size: int = _flag("Texts per forward pass when evaluating.", default=32)
    save_steps: int = _flag(
        "Every N optimizer steps write checkpoint-step-N/ (model or adapter, optimizer, "
        "scheduler, RNG states, data position) to resume from exactly (0 = off).", default=0)
    save_total_limit: int = _flag("Keep only the newest N step checkpoints (0 = keep all).",
                                  default=0)
    resume_from_checkpoint: str = _flag(
        "Continue a run from a step checkpoint: a checkpoint-step-N folder, or 'latest' for "
        "the newest complete one in --output_dir. The result equals an uninterrupted run.",
        default="")
    mixed_precision: str = _flag(
        "Autocast: no (fp32), fp16 or bf16. auto: the accelerate config's bf16/fp16 under "
        "accelerate launch; else bf16 on GPUs that run it natively (TF32 for the rest), on a "
        "CPU bf16 or fp32, whichever a short probe of this model measures faster (cached per "
        "machine and shape), fp32 elsewhere. Under lora/qlora the frozen base is also loaded "
        "in that dtype, and QLoRA computes in it.", default="auto",
        choices=MIXED_PRECISIONS)
    grad_cache_chunk_size: int = _flag(
        "GradCache: embed the batch in chunks of this many texts without a graph, then "
        "backpropagate chunk by chunk. Same loss and gradients, memory of one chunk: big "
        "batches (more in-batch negatives) on small GPUs (0 = off).", default=0)
    ddp_timeout: int = _flag(
        "Seconds a process waits for the others at a collective (the process group's "
        "timeout) before the run fails; raise it when one process has long work of its own "
        "(a first pass over a large training set on a slow disk).", default=1800)
    num_processes: int = _flag(
        "Worker processes to train with, one per device, started by train.py itself. 0: one per "
        "visible CUDA device (1 without a GPU); 1: this process only; N: N workers (on a CPU "
        "they use gloo). Under accelerate launch or torchrun the launcher decides.", default=0)
    cross_device_negatives: int = _flag(
        "With several processes, score each query against the passages of all of them "
        "(a gather that keeps gradients), as one process with the whole batch would: 1 on, 0 off.",
        default=1, choices=(0, 1))
    attention_dropout: float = _flag(
        "Dropout on attention probabilities during training; -1 keeps the model's own (BERT-"
        "style encoders use 0.1). 0 lets attention run through fused kernels, which is faster.",
        default=-1.0)
    gradient_checkpointing: bool = _flag(
        "Recompute activations in the backward pass: less memory, more time.", default=False)
    overwrite_output_dir: bool = _flag(
        "Allow writing into a non-empty --output_dir (its old contents are removed first).",
        default=False)
    trust_remote_code: bool = _flag("Run the model repository's own Python code. Off unless asked.",
                                    default=False)

    def train_files(self) -> list[str]:
        """--train_dataset as a list (a plain string counts as one file)."""
        return [self.train_dataset] if isinstance(self.train_dataset, str) else \
            list(self.train_dataset)

    def matryoshka(self) -> list[tuple[int, float]]:
        """--matryoshka_dims as (dimension, weight) pairs, largest first; [] when off."""
        return parse_dims(self.matryoshka_dims)

    def target_modules(self) -> list[str] | None:
        names = [n.strip() for n in self.lora_target_modules.split(",") if n.strip()]
        return names or None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Parser(argparse.ArgumentParser):
    """argparse, but `error` exits with code 2 and one line, without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="train.py",
        description="Contrastive (InfoNCE) fine-tuning of a text-embedding model by LoRA, QLoRA "
        "or full fine-tuning.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        kwargs: dict[str, Any] = {"help": meta.pop("help")}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        if f.type in ("bool", bool):
            kwargs["action"] = "store_true"
        elif str(f.type) == "list[str]":
            kwargs.update(nargs="*" if "default" in kwargs else "+", type=str,
                          metavar=f.name.upper())
        else:
            kind = str(f.type).removesuffix(" | None")
            kwargs["type"] = {"int": int, "float": float, "str": str}[kind]
            kwargs["metavar"] = f.name.upper()
        if "choices" in meta:
            kwargs["choices"] = meta.pop("choices")
            kwargs.pop("metavar", None)
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_dims(spec: str) -> list[tuple[int, float]]:
    """'384,64' or '384:1,64:0.5' -> [(384, 1.0), (64, 0.5)], largest first; ValueError."""
    pairs = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        dim, _, weight = part.partition(":")
        try:
            pairs.append((int(dim), float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"'{part}' is not DIM or DIM:WEIGHT") from None
        if pairs[-1][0] <= 0 or not 0 < pairs[-1][1] < float("inf"):
            raise ValueError(f"'{part}': dimension and weight must be positive and finite")
    if len({d for d, _ in pairs}) < len(pairs):
        raise ValueError("a dimension is listed twice")
    return sorted(pairs, reverse=True)


def embedding_config(cfg: TrainConfig, tokenizer: Any, append_eos: bool,
                     info: dict[str, Any]) -> dict[str, Any]:
    """training_config.json: all that merge/evaluate need to embed exactly as training did."""
    base = cfg.model_name_or_path
    return {
        "embedrag_version": __version__,
        "base_model": os.path.abspath(base) if os.path.isdir(base) else base,
        "finetune_type": cfg.finetune_type,
        "quantization_bits": cfg.quantization_bits if cfg.finetune_type == "qlora" else None,
        "pooling": cfg.pooling,
        "normalize": True,
        "query_instruction": cfg.query_instruction,
        "passage_instruction": cfg.passage_instruction,
        "query_max_len": cfg.query_max_len,
        "passage_max_len": cfg.passage_max_len,
        "append_eos": append_eos,
        "eos_token": tokenizer.eos_token,
        "padding_side": tokenizer.padding_side,
        "temperature": cfg.temperature,
        "mixed_precision": cfg.mixed_precision,
        **info,
        "train_args": cfg.to_dict(),
    }
