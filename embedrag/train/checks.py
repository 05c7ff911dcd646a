"""The flags checked before anything loads: one line per problem, exit code 2."""

from __future__ import annotations

import os
import re
import sys

from embedrag.config import TrainConfig, build_parser, parse_dims
from embedrag.data.formats import exists
from embedrag.data.mixture import expand, parse_weights
from embedrag.data.rows import DataError
from embedrag.model.loading import ModelError, check_remote_code
from embedrag.model.recipe import RecipeError, read_recipe
from embedrag.train.launch import check_world_size


def check(cfg: TrainConfig, argv: list[str]) -> list[str]:
    """Problems with the flags as given, one line each (an empty list means fine)."""
    problems = []
    positive = ["batch_size", "epochs", "query_max_len", "passage_max_len", "lora_r",
                "lora_alpha", "gradient_accumulation_steps", "logging_steps", "eval_batch_size",
                "shuffle_buffer"]
    for name in positive:
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            problems.append(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ["neg_nums", "max_steps", "num_workers", "max_grad_norm", "weight_decay",
                 "save_steps", "save_total_limit", "grad_cache_chunk_size", "num_processes",
                 "preprocessing_num_workers"]:
        if getattr(cfg, name) < 0:
            problems.append(f"--{name} must not be negative, got {getattr(cfg, name)}")
    if cfg.streaming and not cfg.max_steps:
        problems.append("--streaming needs --max_steps (a stream's length is not known)")
    if cfg.streaming and (cfg.save_steps or cfg.resume_from_checkpoint):
        problems.append("--streaming has no exact resume: drop --save_steps and "
                        "--resume_from_checkpoint, or train without --streaming")
    if cfg.kd_temperature <= 0:
        problems.append(f"--kd_temperature must be > 0, got {cfg.kd_temperature}")
    if cfg.kd_weight < 0:
        problems.append(f"--kd_weight must not be negative, got {cfg.kd_weight}")
    try:
        parse_dims(cfg.matryoshka_dims)
    except ValueError as e:
        problems.append(f"--matryoshka_dims {cfg.matryoshka_dims!r}: {e}")

    try:
        files = expand([f for f in cfg.train_files() if os.path.exists(f)])
        parse_weights(cfg.dataset_weights)
    except DataError as e:
        problems.append(str(e))
        files = []
    if len(set(map(os.path.realpath, files))) < len(files):
        problems.append("--train_dataset: a file is given twice")
    if len(files) == 1 and (cfg.dataset_weights or cfg.dataset_instructions):
        problems.append("--dataset_weights and --dataset_instructions are for several "
                        "--train_dataset files; one file takes --query_instruction")
    if cfg.streaming and (len(files) > 1 or cfg.kd_weight):
        problems.append("--streaming reads one file without teacher scores: drop it to train "
                        "on several files or with --kd_weight")
    if cfg.temperature <= 0:
        problems.append(f"--temperature must be > 0, got {cfg.temperature}")
    if cfg.lr <= 0:
        problems.append(f"--lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.warmup_proportion < 1:
        problems.append(f"--warmup_proportion must be in [0, 1), got {cfg.warmup_proportion}")
    if not (cfg.attention_dropout == -1 or 0 <= cfg.attention_dropout < 1):
        problems.append(f"--attention_dropout must be -1 or in [0, 1), got {cfg.attention_dropout}")
    if not 0 <= cfg.lora_dropout < 1:
        problems.append(f"--lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.finetune_type != "qlora" and any(a.startswith("--quantization_bits") for a in argv):
        problems.append(f"--quantization_bits applies to qlora only, not {cfg.finetune_type}")

    if (problem := check_world_size(cfg.num_processes)) is not None:
        problems.append(problem)

    for spec in cfg.train_files():
        if not exists(spec):
            problems.append(f"--train_dataset {spec}: no such file or folder")
    if cfg.eval_dataset and not os.path.isfile(cfg.eval_dataset):
        problems.append(f"--eval_dataset {cfg.eval_dataset}: no such file")
    model = cfg.model_name_or_path
    hub_id = re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", model) is not None
    if not os.path.isdir(model) and not hub_id:
        problems.append(f"--model_name_or_path {model}: no such folder")
    else:  # a recipe we cannot honour, or code the model ships and nobody trusted: stop now

        try:
            read_recipe(model)
            check_remote_code(model, cfg.trust_remote_code)
        except (RecipeError, ModelError) as e:
            problems.append(str(e))
    return problems


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse and check flags; on a problem print one line per problem and exit with code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    problems = check(cfg, argv)
    if problems:
        parser.exit(2, "".join(f"train.py: error: {p}\n" for p in problems))
    return cfg
