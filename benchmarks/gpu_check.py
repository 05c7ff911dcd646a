#!/usr/bin/env python
"""EmbedRAG on a GPU, in one command: does it run, does it compute what the CPU computes, does
it wait on the host, and how fast is it next to sentence-transformers.

    python benchmarks/gpu_check.py [--out /tmp/gpu_check] [--steps 30]
    python benchmarks/gpu_check.py --device cpu --size tiny   # the same plumbing on a CPU

Offline: the models are random Qwen2s built on the spot (a 2-layer one, and one of
gte-Qwen2-1.5B's shape for the speed table) with a byte-level BPE tokenizer trained here; the
data are synthetic rows of random words, queries and passages of many lengths. It prints:

1. smoke: 3-step train.py runs of lora, qlora (4-bit) and full fine-tuning in bf16 and fp32, and
   with GradCache: exit codes and losses;
2. agreement: embeddings and LoRA gradients on CUDA against the CPU in fp32 (TF32 off; within
   1e-4) and under bf16 autocast (within 2e-2; gradients within 2e-2 of the largest one);
3. GradCache against plain backpropagation on CUDA with dropout 0.1 (RNG replayed; 1e-4);
4. syncs: host synchronisations counted by torch.cuda.set_sync_debug_mode in the steps that do
   not log, and in those that do;
5. speed: samples/s, tokens/s, MFU and peak memory of full fine-tuning of the 1.5B-shaped model
   (batch 16, 1 positive + 3 negatives, 256 tokens, bf16) by EmbedRAG packed, EmbedRAG padded
   (variable-length attention off) and sentence-transformers (MultipleNegativesRankingLoss).

Needs datasets and bitsandbytes besides torch/transformers/peft/accelerate/
sentence-transformers (`pip install --no-index --find-links WHEELS datasets bitsandbytes` on an
offline machine). Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ("apple banana cherry delta eagle falcon garnet harbor island jungle kettle lemon "
         "marble nickel orange pepper quartz river saddle tiger umber violet walnut xenon "
         "yellow zebra").split()
SHAPES = {  # Qwen2 configs: the tiny test model, and gte-Qwen2-1.5B-instruct's shape
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2},
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def build_model(path: str, shape: str, dropout: float = 0.0) -> str:
    """A random Qwen2 of `shape` (bf16 weights on disk for the big one) and a tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   unk_token="<unk>")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(fast) if shape == "tiny" else 151646,
                         max_position_embeddings=1024, attention_dropout=dropout,
                         **SHAPES[shape])
    device = "cuda" if torch.cuda.is_available() and shape != "tiny" else "cpu"
    with torch.device(device):  # initialising 1.5B weights on a CPU takes minutes
        model = Qwen2Model(config).to(torch.bfloat16 if shape != "tiny" else torch.float32)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def write_rows(path: str, rows: int, negatives: int, longest: int, seed: int = 0) -> str:
    """Rows of random words, every text of its own length (3 to `longest` words)."""
    rng = random.Random(seed)

    def text(lo: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, longest)))

    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps({"query": text(3)[:200], "pos": [text(8)],
                                "neg": [text(8) for _ in range(negatives)]}) + "\n")
    return path


def train_py(flags: list[str], out: str, prelude: str = "") -> tuple[int, dict, str]:
    """train.py in its own process, after `prelude` (Python); returns (exit code, summary
    report or {}, last stderr line)."""
    argv = ["train.py", *flags, "--output_dir", out]
    code = (f"{prelude}\nimport runpy, sys\nsys.argv = {argv!r}\n"
            f"runpy.run_path({os.path.join(ROOT, 'train.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                          text=True)
    report = os.path.join(out, "training_summary_report.json")
    summary = json.load(open(report)) if done.returncode == 0 and os.path.isfile(report) else {}
    last = (done.stderr.strip().splitlines() or [""])[-1]
    return done.returncode, summary, last


def smoke(args: argparse.Namespace, model: str, data: str) -> None:
    print("1. smoke: 3 steps of train.py", flush=True)
    runs = [(kind, precision, 0) for kind in ("lora", "qlora", "full")
            for precision in ("bf16", "no")] + [("lora", "bf16", 4), ("full", "bf16", 4)]
    for kind, precision, chunk in runs:
        name = f"{kind} {'fp32' if precision == 'no' else precision}" + \
            (f" GradCache {chunk}" if chunk else "")
        out = os.path.join(args.out, "smoke", name.replace(" ", "_"))
        code, summary, last = train_py(
            ["--model_name_or_path", model, "--train_dataset", data, "--finetune_type", kind,
             "--mixed_precision", precision, "--batch_size", "4", "--neg_nums", "3",
             "--max_steps", "3", "--save_on_epoch_end", "0", "--overwrite_output_dir",
             "--grad_cache_chunk_size", str(chunk)], out)
        losses = [r["loss"] for r in json.load(open(os.path.join(
            out, "detailed_training_logs.json")))] if code == 0 else []
        check(name, code == 0, f"exit {code}, losses {[round(x, 4) for x in losses]}"
              + ("" if code == 0 else f" ({last})"))


def embedder(model: str, device: str, dropout: float = 0.0):
    """The tiny model with LoRA (non-zero B, so every adapter weight has a gradient) as
    training builds it, in fp32, on `device`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from embedrag.model import varlen
    from embedrag.model.embedding import EmbeddingModel

    backbone = AutoModel.from_pretrained(model, attn_implementation="sdpa",
                                         attention_dropout=dropout).to(device)
    varlen.install(backbone, torch.device(device))
    torch.manual_seed(0)
    backbone = get_peft_model(backbone, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                   target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False))
    return EmbeddingModel(backbone, "last").train(dropout > 0)


def batch_of(model: str, device: str) -> dict:
    from embedrag.data.tokens import pad, tokenize
    from embedrag.model.tokens import load_tokenizer

    rng = random.Random(1)
    tok = load_tokenizer(model)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40))) for _ in range(12)]
    ids, mask = pad(tokenize(tok, texts, 64, True), tok.pad_token_id, tok.padding_side)
    return {"ids": ids.to(device), "mask": mask.to(device), "lengths": mask.sum(1).tolist()}


def outputs_and_grads(model, batch, autocast: str | None = None):
    import torch

    model.zero_grad(set_to_none=True)
    device = batch["ids"].device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast is not None):
        out = model(batch["ids"], batch["mask"], batch["lengths"])
    target = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    (out.float() * target).sum().backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()
             if p.grad is not None}
    return out.detach().float().cpu(), grads


def largest(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a) if isinstance(a, dict) \
        else (a - b).abs().max().item()


def agreement(args: argparse.Namespace, model: str) -> None:
    print("2. agreement with the CPU (tiny model, LoRA)", flush=True)
    from transformers.utils import enable_tf32

    enable_tf32(False)  # fp32 as fp32 (through the API `auto` uses to switch it on)
    cpu_out, cpu_grads = outputs_and_grads(embedder(model, "cpu"), batch_of(model, "cpu"))
    gpu = embedder(model, args.device)
    out, grads = outputs_and_grads(gpu, batch_of(model, args.device))
    check("fp32 embeddings", largest(out, cpu_out) <= 1e-4,
          f"max |diff| {largest(out, cpu_out):.2e}")
    check("fp32 LoRA gradients", largest(grads, cpu_grads) <= 1e-4,
          f"max |diff| {largest(grads, cpu_grads):.2e} over {len(grads)} tensors")
    out, grads = outputs_and_grads(gpu, batch_of(model, args.device), autocast="bf16")
    check("bf16 embeddings", largest(out, cpu_out) <= 2e-2,
          f"max |diff| {largest(out, cpu_out):.2e}")
    scale = max(g.abs().max().item() for g in cpu_grads.values())
    check("bf16 LoRA gradients", largest(grads, cpu_grads) <= 2e-2 * scale,
          f"max |diff| {largest(grads, cpu_grads):.2e} (largest gradient {scale:.2e})")


def grad_cache(args: argparse.Namespace, model: str) -> None:
    """The same chunks from the same RNG state through one graph (the reference) and through
    GradCache (embed without a graph, then replay each chunk's dropout)."""
    import torch

    from embedrag.losses import embedding_loss
    from embedrag.train.step import grad_cache_step

    print("3. GradCache vs plain backpropagation, dropout 0.1", flush=True)
    net = embedder(model, args.device, dropout=0.1)
    b = batch_of(model, args.device)
    n = b["ids"].shape[0] // 2
    batch = {"query_input_ids": b["ids"][:n], "query_attention_mask": b["mask"][:n],
             "query_lengths": b["lengths"][:n], "passage_input_ids": b["ids"][n:],
             "passage_attention_mask": b["mask"][n:], "passage_lengths": b["lengths"][n:]}
    index = torch.arange(n, device=args.device)
    ids = torch.arange(n, device=args.device)

    def loss_of(q, p):
        return embedding_loss(q, p[index], ids[:, None], ids, 0.05)

    chunk = 2
    torch.manual_seed(123)
    reps = {}
    for kind in ("query", "passage"):
        x, m, ls = (batch[f"{kind}_{k}"] for k in ("input_ids", "attention_mask", "lengths"))
        reps[kind] = torch.cat([net(x[s:s + chunk], m[s:s + chunk], ls[s:s + chunk])
                                for s in range(0, x.shape[0], chunk)])
    net.zero_grad(set_to_none=True)
    loss_of(reps["query"], reps["passage"]).backward()
    want = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    grad_cache_step(net, batch, chunk, loss_of, lambda s: s.backward())
    got = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
    check("GradCache gradients", got.keys() == want.keys() and largest(got, want) <= 1e-4,
          f"max |diff| {largest(got, want):.2e} over {len(got)} tensors")


def syncs(args: argparse.Namespace, model: str, data: str) -> None:
    """Host synchronisations in a real run (in this process): inside steps, at logging points
    (the loss read back, the non-finite check), and outside the loop (setup, saving)."""
    import torch

    from embedrag.data.formats import load_rows
    from embedrag.train import loop
    from embedrag.train.checks import parse_args

    print("4. host synchronisations (20 steps, logging every 5th)", flush=True)
    if args.device != "cuda":
        print("  (not on CUDA: torch.cuda.set_sync_debug_mode has nothing to count)")
        return
    counts = {"outside": 0, "step": 0, "logging": 0}
    where = {"now": "outside"}
    real = {"fb": loop.forward_backward, "end_step": loop.Progress.end_step,
            "end_epoch": loop.end_epoch}

    def forward_backward(*a, **k):
        where["now"] = "step"
        return real["fb"](*a, **k)

    def end_step(self, lr):
        step = self.state.step + 1
        if step % self.job.cfg.logging_steps == 0 or step == self.job.total_steps:
            where["now"] = "logging"
        real["end_step"](self, lr)
        where["now"] = "step"

    def end_epoch(*a, **k):
        where["now"] = "logging"
        real["end_epoch"](*a, **k)
        where["now"] = "outside"

    def count(message, *rest, **kw):
        if "synchroniz" in str(message):
            counts[where["now"]] += 1

    cfg = parse_args(["--model_name_or_path", model, "--train_dataset", data, "--output_dir",
                      os.path.join(args.out, "syncs"), "--overwrite_output_dir",
                      "--batch_size", "4", "--neg_nums", "3", "--max_steps", "20",
                      "--logging_steps", "5", "--save_on_epoch_end", "0",
                      "--mixed_precision", "bf16", "--num_processes", "1"])
    rows = load_rows(data)
    loop.forward_backward, loop.Progress.end_step, loop.end_epoch = \
        forward_backward, end_step, end_epoch
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = count
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loop.train(cfg, rows)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            loop.forward_backward, loop.Progress.end_step, loop.end_epoch = \
                real["fb"], real["end_step"], real["end_epoch"]
    check("no host sync inside a step", counts["step"] == 0,
          f"{counts['step']} inside the 20 steps, {counts['logging']} at the 4 logging points "
          f"and epoch ends, {counts['outside']} in setup and saving")


def st_speed(args: argparse.Namespace, model: str, data: str, out: str) -> dict:
    """sentence-transformers in its own process: the same model, rows, batch and length."""
    os.makedirs(out, exist_ok=True)
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--st_worker", model, data,
                           out, "--device", args.device, "--steps", str(args.steps)],
                          env=ENV, capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or [""])[-1]}
    return json.load(open(os.path.join(out, "st.json")))


def st_worker(args: argparse.Namespace) -> None:
    """Full fine-tuning by sentence-transformers' trainer: MultipleNegativesRankingLoss over
    (anchor, positive, negative_1..3), last-token pooling, bf16 on CUDA."""
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
    from embedrag.hardware import utilisation

    model, data, out = args.st_worker
    cuda = args.device == "cuda"
    word = models.Transformer(model, max_seq_length=256)
    word.tokenizer.pad_token = word.tokenizer.eos_token
    pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="lasttoken")
    st = SentenceTransformer(modules=[word, pool], device=args.device)
    rows = read_jsonl(data)
    columns = {"anchor": [r.query for r in rows], "positive": [r.pos[0] for r in rows]}
    for k in range(3):
        columns[f"negative_{k + 1}"] = [r.neg[k] for r in rows]
    counts = {"tokens": 0, "slots": 0}

    def count(_module, inputs):  # what ST feeds its transformer, padding included
        mask = inputs[0]["attention_mask"]
        counts["tokens"] += int(mask.sum())
        counts["slots"] += mask.numel()

    word.register_forward_pre_hook(count)
    targs = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=16,
        learning_rate=1e-5, max_steps=args.steps, save_strategy="no", report_to="none",
        bf16=cuda, use_cpu=not cuda, logging_steps=10)
    trainer = SentenceTransformerTrainer(
        model=st, args=targs, train_dataset=Dataset.from_dict(columns),
        loss=losses.MultipleNegativesRankingLoss(st, scale=20.0))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    samples = 16 * args.steps
    speed = utilisation(word.auto_model, word.auto_model.config, True, counts["tokens"],
                        samples * 5, seconds, torch.device(args.device),
                        torch.bfloat16 if cuda else torch.float32)
    stats = {"samples_per_second": samples / seconds,
             "tokens_per_second": counts["tokens"] / seconds, "mfu": speed["mfu"],
             "padding_share": 1 - counts["tokens"] / counts["slots"],
             "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    with open(os.path.join(out, "st.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f)


def speed(args: argparse.Namespace, model: str, data: str) -> None:
    print(f"5. speed: full fine-tuning, {args.size} model, batch 16, 1 + 3 passages, 256 tokens",
          flush=True)
    flags = ["--model_name_or_path", model, "--train_dataset", data, "--finetune_type", "full",
             "--batch_size", "16", "--neg_nums", "3", "--query_max_len", "256",
             "--passage_max_len", "256", "--max_steps", str(args.steps), "--logging_steps",
             "10", "--save_on_epoch_end", "0", "--overwrite_output_dir", "--lr", "1e-5",
             "--attention_dropout", "0"]
    off = "import embedrag.model.varlen as v\nv.install = lambda model, device: {}"
    table = {}
    for name, prelude in (("EmbedRAG packed", ""), ("EmbedRAG padded", off)):
        code, summary, last = train_py(flags, os.path.join(args.out, name.replace(" ", "_")),
                                       prelude)
        if code:
            table[name] = {"error": last}
            continue
        totals, memory = summary["totals"], summary.get("peak_memory", {})
        table[name] = {"samples_per_second": totals["samples_per_second"],
                       "tokens_per_second": totals["tokens_per_second"],
                       "mfu": summary["throughput"]["mfu"],
                       "padding_share": totals["padding_share"],
                       "peak_memory_gib": (memory.get("peak_gpu_memory_mib") or 0) / 1024 or None,
                       "varlen": summary["embedding"].get("varlen_attention", False)}
    table["sentence-transformers"] = st_speed(args, model, data, os.path.join(args.out, "st"))
    print(f"  {'':24} {'samples/s':>10} {'tokens/s':>10} {'MFU':>7} {'padding':>8} {'peak GiB':>9}")
    for name, r in table.items():
        if "error" in r:
            print(f"  {name:24} failed: {r['error']}")
            continue
        peak = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") else "-"
        print(f"  {name:24} {r['samples_per_second']:10.1f} {r['tokens_per_second']:10.0f} "
              f"{r['mfu']:7.1%} {r['padding_share']:8.1%} {peak:>9}")
    ours, theirs = table.get("EmbedRAG packed", {}), table["sentence-transformers"]
    if "samples_per_second" in ours and "samples_per_second" in theirs:
        ratio = ours["samples_per_second"] / theirs["samples_per_second"]
        print(f"  EmbedRAG packed / sentence-transformers: {ratio:.2f}x samples/s")
    json.dump(table, open(os.path.join(args.out, "speed.json"), "w"), indent=2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "embedrag_gpu_check"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--size", default="1.5b", choices=tuple(SHAPES),
                   help="the model of the speed table")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of each speed run")
    p.add_argument("--only", nargs="*", default=["smoke", "agreement", "grad_cache", "syncs",
                                                 "speed"])
    p.add_argument("--st_worker", nargs=3, help=argparse.SUPPRESS)  # MODEL DATA OUT
    args = p.parse_args()
    if args.st_worker:
        st_worker(args)
        return 0
    import torch

    from embedrag.hardware import hardware

    os.makedirs(args.out, exist_ok=True)
    print(f"gpu_check {time.strftime('%Y-%m-%d %H:%M')} on {hardware()}, torch "
          f"{torch.__version__}", flush=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for the plumbing only")
        return 2
    start = time.perf_counter()
    tiny = build_model(os.path.join(args.out, "tiny"), "tiny")
    rows = write_rows(os.path.join(args.out, "rows.jsonl"), 64, 3, 60)
    steps = {"smoke": lambda: smoke(args, tiny, rows), "agreement": lambda: agreement(args, tiny),
             "grad_cache": lambda: grad_cache(args, tiny),
             "syncs": lambda: syncs(args, tiny, rows)}
    for name in ("smoke", "agreement", "grad_cache", "syncs"):
        if name in args.only:
            steps[name]()
    if "speed" in args.only:
        big = build_model(os.path.join(args.out, args.size), args.size)
        speed(args, big, write_rows(os.path.join(args.out, "rows_speed.jsonl"),
                                    16 * args.steps, 3, 300, seed=1))
    print(f"done in {time.perf_counter() - start:.0f} s; "
          + (f"FAILED: {', '.join(FAILED)}" if FAILED else "every check passed"))
    return 1 if FAILED else 0


if __name__ == "__main__":
    raise SystemExit(main())
