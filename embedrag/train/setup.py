"""Everything a run needs before its first step, built once from the flags: the settings the
model's recipe and size decide, the data and its loader, the model, the optimizer and its
schedule, and where the run stands (fresh, or as a step checkpoint left it)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from embedrag.config import TrainConfig, embedding_config
from embedrag.data.dataset import Collator, TextSettings
from embedrag.data.mixture import DataSettings, training_data
from embedrag.data.streaming import StreamingSet
from embedrag.losses import LossSettings
from embedrag.model.embedding import (
    EmbeddingModel,
    count_parameters,
    embedding_width,
    freeze,
    unreached_parameters,
)
from embedrag.model.loading import (
    ModelSettings,
    autocast,
    clamped_lengths,
    load_backbone,
    lora_input_casts,
    max_model_length,
    routes_experts,
    shipped_code_errors,
)
from embedrag.model.meta import agree_with_main, loaded_values, share_buffers
from embedrag.model.recipe import DEFAULTS, decide, load_head, read_recipe
from embedrag.model.tokens import load_tokenizer, resolve_append_eos
from embedrag.train.checkpoints import (
    check_output_dir,
    check_resumable,
    clear_previous_run,
    load_step_checkpoint,
    read_step_state,
    resolve_checkpoint,
)
from embedrag.train.launch import make_accelerator, process_state
from embedrag.train.logs import RunLogger
from embedrag.train.optim import linear_schedule, make_optimizer
from embedrag.train.precision import allow_tf32
from embedrag.train.precision import resolve as resolve_precision
from embedrag.train.state import RunState

PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}
SHARDED = {"DEEPSPEED": "DeepSpeed", "FSDP": "FSDP1"}  # engines refused at start


class LaunchError(RuntimeError):
    """The run was started in a way this setup cannot serve."""


@dataclass
class Job:
    """A run, set up: what the loop steps through, and what it saves and reports."""

    cfg: TrainConfig            # the flags, with what the recipe, model and probe decided
    accelerator: Any
    model: Any                  # as Accelerate prepared it (DDP, FSDP2 or itself)
    embedder: EmbeddingModel    # the module itself, inside whatever Accelerate wraps it in
    optimizer: Any
    scheduler: Any
    loader: Any
    data: Any                   # TrainingSet, MixedSet or StreamingSet
    tokenizer: Any
    loss: LossSettings
    train_config: dict[str, Any]  # training_config.json: how to embed as trained
    datasets: list[dict[str, Any]]
    total_steps: int
    warmup_steps: int
    batches_per_epoch: int | None  # None for a stream
    sharded: bool               # FSDP2: weights, gradients and optimizer state are sharded
    params: tuple[int, int]     # (trainable, total)
    state: RunState
    logger: RunLogger
    say: Callable[[str], None]  # prints on the main process only
    resume_from: str | None = None
    rngs: Any = None            # the checkpoint's RNG states, restored before the first step
    sharding: dict[str, Any] | None = None  # FSDP2: what each process holds

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def prepare(cfg: TrainConfig, rows: Any) -> Job:
    """Set up a run on `rows` (embedrag.data.formats.load_rows, or a list of Examples)."""
    from accelerate.utils import DistributedType, set_seed
    from transformers import AutoConfig

    process = process_state(cfg.ddp_timeout)  # the process group, with the run's timeout
    model_config = AutoConfig.from_pretrained(cfg.model_name_or_path,
                                              trust_remote_code=cfg.trust_remote_code)
    recipe = read_recipe(cfg.model_name_or_path)
    decided, sources = decide({name: getattr(cfg, name) for name in DEFAULTS}, recipe)
    cfg = dataclasses.replace(cfg, **decided)  # the caller's flags stay as given
    precision = None  # auto: see embedrag/train/precision.py
    if cfg.mixed_precision == "auto":
        precision = resolve_precision(cfg, model_config, process)
        cfg = dataclasses.replace(cfg, mixed_precision=precision["choice"])
        if precision.get("tf32"):
            allow_tf32()
    accelerator = make_accelerator(cfg.mixed_precision, cfg.gradient_accumulation_steps,
                                   cfg.streaming, dynamic_graph=routes_experts(model_config))
    engine = accelerator.distributed_type
    if engine == DistributedType.DEEPSPEED or (engine == DistributedType.FSDP
                                               and not accelerator.is_fsdp2):
        raise LaunchError(
            f"{SHARDED[engine.value]} is not supported (its paths stop or train wrongly here: "
            "GradCache stepping DeepSpeed once per chunk, FSDP1 and LoRA's mixed dtypes); "
            "the sharded engine is FSDP2 (fsdp_version: 2 in the accelerate config)")
    sharded = engine == DistributedType.FSDP  # FSDP2: weights, gradients, optimizer state
    say = tqdm.write if accelerator.is_main_process else (lambda *_: None)
    # fsdp_cpu_ram_efficient_loading: the main process alone reads the weights (model/meta.py);
    # Accelerate broadcasts no quantized ones, so QLoRA's 4-bit base is read everywhere.
    main_loads = sharded and bool(accelerator.state.fsdp_plugin.cpu_ram_efficient_loading)
    if main_loads and cfg.finetune_type == "qlora":
        say("note: QLoRA reads its 4-bit base on every process "
            "(fsdp_cpu_ram_efficient_loading covers lora and full)")
        main_loads = False
    set_seed(cfg.seed)
    say(f"precision: {PRECISION_NAMES[cfg.mixed_precision]} ("
        + (f"auto: {precision['reason']})" if precision else "--mixed_precision)"))
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    append_eos = resolve_append_eos(cfg.append_eos, cfg.pooling, tokenizer)
    cfg = clamp_lengths(cfg, tokenizer, sources, say)
    say("embedding: " + ", ".join(f"{name} {getattr(cfg, name)!r} ({sources[name]})"
                                  for name in DEFAULTS))

    data, loader, datasets = make_loader(cfg, rows, tokenizer, append_eos, accelerator, say)
    check_output_dir(cfg)
    resume_from = (resolve_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
                   if cfg.resume_from_checkpoint else None)
    saved = read_step_state(resume_from) if resume_from else None
    if saved:  # the same job, or refused by name before any weight is loaded
        check_resumable(cfg, saved["train_args"], accelerator.num_processes,
                        saved["state"].get("world_size", accelerator.num_processes))

    model, info = make_model(cfg, recipe, model_config, tokenizer, accelerator, say, sources,
                             sharded, main_loads)
    info.update(datasets=datasets, precision_auto=precision)
    params = count_parameters(model)
    # fp16's GradScaler lets a fused step skip itself, and Accelerate would then not see the
    # skip (and would step the schedule): fused only without fp16, nor on FSDP2's sharded
    # parameters (DTensors), where fused kernels are not known to work.
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay,
                               fused=not sharded and cfg.mixed_precision != "fp16",
                               kind=cfg.optim)
    embedder = model
    model.sharded = sharded  # every process then makes the same backbone calls (collectives)
    loaded = loaded_values(model)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if main_loads:  # the weights came with the shards; the buffers come now
        share_buffers(model)
    sharding = shard_sizes(model, optimizer, accelerator, loaded) if sharded else None
    batches_per_epoch = None if cfg.streaming else len(loader)  # a stream's length is unknown
    total_steps = count_steps(cfg, batches_per_epoch)
    warmup_steps = math.ceil(total_steps * cfg.warmup_proportion)
    # Not prepared by Accelerate: it is stepped here once per optimizer step, on every process.
    scheduler = linear_schedule(optimizer, warmup_steps, total_steps)

    state, rngs = RunState(world_size=accelerator.num_processes), None
    if saved:
        rngs = load_step_checkpoint(resume_from, accelerator.unwrap_model(model), optimizer,
                                    scheduler)
        state = RunState.from_dict(saved["state"])
        say(f"resuming from {resume_from}: step {state.step}, epoch {state.epoch}, "
            f"{state.micro} batches into it")
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)  # a resume may continue in a new folder
        if not resume_from:
            clear_previous_run(cfg.output_dir)
    accelerator.wait_for_everyone()
    logger = RunLogger(cfg.output_dir, enabled=accelerator.is_main_process,
                       resume_epoch=state.epoch, resume_step=state.step if resume_from else None)
    job = Job(cfg=cfg, accelerator=accelerator, model=model, embedder=embedder,
              optimizer=optimizer, scheduler=scheduler, loader=loader, data=data,
              tokenizer=tokenizer, loss=LossSettings.from_config(cfg),
              train_config=embedding_config(cfg, tokenizer, append_eos, info),
              datasets=datasets, total_steps=total_steps, warmup_steps=warmup_steps,
              batches_per_epoch=batches_per_epoch,
              sharded=sharded, params=params, state=state, logger=logger, say=say,
              resume_from=resume_from, rngs=rngs, sharding=sharding)
    say(banner(job, append_eos))
    if sharding:
        say("sharding: FSDP2, parameters held per process: " + ", ".join(
            f"{held['parameters']:,}" for held in sharding["per_process"])
            + f" of {sharding['total_parameters']:,}")
    return job


def clamp_lengths(cfg: TrainConfig, tokenizer: Any, sources: dict[str, str],
                  say: Callable[[str], None]) -> TrainConfig:
    """The query and passage lengths, at most what the model takes (noted in `sources`)."""
    limit = max_model_length(cfg.model_name_or_path, tokenizer, cfg.trust_remote_code)
    cut = clamped_lengths(cfg.query_max_len, cfg.passage_max_len, limit)
    for name, value in cut.items():
        say(f"note: {name} {getattr(cfg, name)} exceeds what the model takes; using {value}")
        sources[name] += f", clamped to the model's {value}"
    return dataclasses.replace(cfg, **cut)


def make_loader(cfg: TrainConfig, rows: Any, tokenizer: Any, append_eos: bool,
                accelerator: Any, say: Callable[[str], None]) -> tuple[Any, Any, list[dict]]:
    """(dataset, loader, what each file is). A table's passages are numbered once (by a hash
    of their text), an epoch re-draws the order and the negatives, and each batch is tokenized
    when it is collated; a stream is tokenized as its rows come."""
    texts = TextSettings(neg_nums=cfg.neg_nums, query_max_len=cfg.query_max_len,
                         passage_max_len=cfg.passage_max_len,
                         query_instruction=cfg.query_instruction,
                         passage_instruction=cfg.passage_instruction, append_eos=append_eos,
                         seed=cfg.seed)
    collate = Collator(None, tokenizer.pad_token_id, tokenizer.padding_side)
    if cfg.streaming:  # rows drawn through a shuffle buffer
        data = StreamingSet(rows, tokenizer, buffer=cfg.shuffle_buffer,
                            **dataclasses.asdict(texts))
        loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size,
                                             num_workers=cfg.num_workers, collate_fn=collate)
        return data, loader, [{"path": cfg.train_files()[0], "streamed": True}]
    # One file in a seeded order; several, one file per optimizer step (data/mixture.py).
    block = accelerator.num_processes * cfg.batch_size * cfg.gradient_accumulation_steps
    # One process a machine hashes and caches; the machine's others read its cache.
    with accelerator.local_main_process_first():
        data, sampler, datasets = training_data(rows, tokenizer,
                                                DataSettings.from_config(cfg, texts), block)
    collate.data = data
    if data.short_rows:
        say(f"note: {data.short_rows} of {len(data)} rows have fewer than {cfg.neg_nums} "
            "negatives; they are topped up with other rows' passages")
    # The loader's own generator only seeds its workers; keeping it off the global generator
    # leaves dropout's random stream to the model.
    loader = torch.utils.data.DataLoader(
        data, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
        collate_fn=collate, generator=torch.Generator().manual_seed(cfg.seed))
    return data, loader, datasets


def make_model(cfg: TrainConfig, recipe: Any, model_config: Any, tokenizer: Any,
               accelerator: Any, say: Callable[[str], None], sources: dict[str, str],
               sharded: bool = False, main_loads: bool = False,
               ) -> tuple[EmbeddingModel, dict[str, Any]]:
    """The embedding model on the training device, with what training_config.json says of it.
    Parameters the embedding never reaches are frozen (DDP would wait for their gradients).
    `main_loads`: only the main process reads weights, the others build the network on the
    meta device and take the main process's dtypes and frozen parameters."""
    from accelerate.utils import broadcast_object_list

    main = accelerator.is_main_process
    reads = main or not main_loads  # this process reads the weights
    settings = dataclasses.replace(ModelSettings.from_config(cfg), sharded=sharded,
                                   read_weights=reads)
    device = accelerator.device
    backbone, info = load_backbone(settings, device)
    lora_input_casts(backbone, enabled=cfg.mixed_precision == "no")  # autocast casts them
    head = load_head(cfg.model_name_or_path, recipe.dense)  # the model's Dense layers, if any
    if head is not None:
        head.to(device).requires_grad_(cfg.finetune_type == "full")
    model = EmbeddingModel(backbone, cfg.pooling, head, recipe.dense)
    if main_loads:
        agree_with_main(model, main)
    unused = []
    # Not for mixtures of experts: two tokens reach only the experts they are routed to.
    if not routes_experts(model_config) and reads:
        with shipped_code_errors(cfg.model_name_or_path, cfg.trust_remote_code), \
                autocast(model, cfg.mixed_precision):
            unused = unreached_parameters(model, tokenizer)  # also the model's first forward
    if main_loads:  # traced where the weights are; the trace's forward also decided packing
        unused, packing = broadcast_object_list([(unused, model.packing)], from_process=0)[0]
        model.adopt_packing(packing)
    freeze(model, unused)
    if unused:
        say(f"note: {len(unused)} parameter tensor(s) the embedding does not use are frozen "
            f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''})")
    width = embedding_width(model)
    dims = [d for d, _ in cfg.matryoshka()]
    if dims and dims[0] > width:
        raise LaunchError(f"--matryoshka_dims {cfg.matryoshka_dims}: the model's embeddings "
                          f"have {width} dimensions")
    info.update(frozen_unused_parameters=unused, settings_from=sources,
                dense_modules=recipe.dense, attention=cfg.attention, embedding_dim=width,
                matryoshka_dims=dims or None)
    return model, info


def count_steps(cfg: TrainConfig, batches_per_epoch: int | None) -> int:
    """Optimizer steps in the run: --max_steps, at most --epochs passes over the data."""
    accum = cfg.gradient_accumulation_steps
    if batches_per_epoch is None:  # a stream: --max_steps is required
        return cfg.max_steps
    whole = math.ceil(batches_per_epoch / accum) * cfg.epochs
    steps = cfg.max_steps or whole
    return min(steps, whole) if batches_per_epoch else steps


def banner(job: Job, append_eos: bool) -> str:
    """The run in one line: what trains on what, how it is batched, how long."""
    cfg, datasets = job.cfg, job.datasets
    rows = ("streamed rows" if cfg.streaming else f"{len(job.data)} rows, "
            f"{sum(d['passages'] for d in datasets)} passages"
            + (f" in {len(datasets)} files" if len(datasets) > 1 else ""))
    trainable, total = job.params
    return (f"embedrag: {cfg.finetune_type} on {cfg.model_name_or_path} | {rows} | "
            f"{job.world} process(es) x batch {cfg.batch_size} x accum "
            f"{cfg.gradient_accumulation_steps} | {job.total_steps} steps "
            f"({job.warmup_steps} warmup) | trainable {trainable:,} of {total:,} params | "
            f"append_eos={append_eos}")



def shard_sizes(model: Any, optimizer: Any, accelerator: Any, loaded: int) -> dict[str, Any]:
    """What each process holds under FSDP2, counted from the sharded tensors themselves:
    parameter values, trainable ones (their gradients are as large), and optimizer-state
    values (AdamW's two moments, once a step has made them), against the whole model's; and
    the parameter values it had `loaded` into memory before sharding."""
    from accelerate.utils import gather_object

    def local(t: Any) -> int:
        return t.to_local().numel() if hasattr(t, "to_local") else t.numel()

    if hasattr(model, "reshard"):  # FSDP2 leaves the root's parameters gathered after forward
        model.reshard()
    params = list(model.parameters())
    inner = getattr(optimizer, "optimizer", optimizer)
    moments = sum(local(v) for slots in inner.state.values() for v in slots.values()
                  if hasattr(v, "numel") and v.dim() > 0)
    mine = [sum(local(p) for p in params), sum(local(p) for p in params if p.requires_grad),
            moments, loaded]
    policy = accelerator.state.fsdp_plugin.mixed_precision_policy  # from the run's precision
    return {"engine": "FSDP2",
            "mixed_precision": {"param_dtype": str(policy.param_dtype).replace("torch.", ""),
                                "reduce_dtype": str(policy.reduce_dtype).replace("torch.", "")}
            if policy is not None else None,
            "total_parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
            "per_process": [{"parameters": a, "trainable": b, "optimizer_state": c,
                             "loaded_before_sharding": d}
                            for a, b, c, d in gather_object([mine])]}
