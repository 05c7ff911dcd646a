#!/usr/bin/env python
"""One forward+backward call of a real decoder with transformers' RMSNorm and with EmbedRAG's
(`embedrag/cpu/kernels.py`), everything else as train.py sets it up.

    python benchmarks/rms_norm.py [--rows 8] [--length 256] [--repeats 5]

The model (Gemma-3-270M unless --model names a folder) is loaded by `load_backbone` as train.py
loads it: LoRA, the base in bf16 under bf16 autocast, the CPU dropout and attention. The two
norms alternate call by call on the same random ids with no padding, after one warm-up call
each. Printed per norm: the median seconds of a call and the bytes the call keeps for its
backward pass (counted with saved-tensor hooks; a tensor kept by two operations counts twice).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import gemma  # noqa: E402


def main() -> None:
    import torch

    from embedrag.cpu import kernels
    from embedrag.model.embedding import EmbeddingModel
    from embedrag.model.loading import ModelSettings, load_backbone, lora_input_casts
    from embedrag.train.checks import parse_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a decoder's folder (default Gemma-3-270M)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    path = args.model or gemma()
    cfg = parse_args(["--model_name_or_path", path, "--output_dir", "unused", "--train_dataset",
                      os.path.join(ROOT, "datasets/sample_data.jsonl"), "--batch_size",
                      str(args.rows), "--finetune_type", "lora", "--mixed_precision", "bf16"])
    torch.manual_seed(0)
    backbone, info = load_backbone(ModelSettings.from_config(cfg), torch.device("cpu"))
    lora_input_casts(backbone, enabled=False)  # as train.py does under autocast
    model = EmbeddingModel(backbone, "last").train()
    norms = [m for m in model.modules() if "forward" in vars(m)
             and type(m).__name__ in kernels.RMS_NORMS]
    ours = {m: vars(m)["forward"] for m in norms}
    assert len(norms) == info["cpu_rms_norm_modules"] > 0, "no RMSNorm was swapped"
    ids = torch.randint(0, backbone.get_input_embeddings().num_embeddings,
                        (args.rows, args.length))

    def call(which: str) -> tuple[float, int]:
        for m in norms:  # the instance's forward is EmbedRAG's; without it, the class's own
            if which == "EmbedRAG":
                m.forward = ours[m]
            else:
                vars(m).pop("forward", None)
        kept = [0]

        def count(t: torch.Tensor) -> torch.Tensor:
            kept[0] += t.numel() * t.element_size()
            return t

        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                emb = model(ids, torch.ones_like(ids))                          # (rows, D)
        emb.float().square().sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start, kept[0]

    runs: dict[str, list[float]] = {"transformers": [], "EmbedRAG": []}
    kept: dict[str, int] = {}
    for i in range(args.repeats + 1):  # the first round warms up
        for which in runs:
            seconds, kept[which] = call(which)
            if i:
                runs[which].append(seconds)
    print(f"{os.path.basename(path.rstrip('/'))}, LoRA, bf16 autocast, {len(norms)} RMSNorms, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; one call of "
          f"{args.rows} x {args.length} tokens, forward+backward")
    print(f"{'RMSNorm':<14}{'median s':>10}{'kept for backward':>20}  runs (s)")
    for which, secs in runs.items():
        print(f"{which:<14}{statistics.median(secs):>10.3f}{kept[which] / 2**30:>16.2f} GiB  "
              + ", ".join(f"{s:.2f}" for s in secs))
    ratio = statistics.median(runs["transformers"]) / statistics.median(runs["EmbedRAG"])
    print(f"EmbedRAG's norms: {ratio:.3f}x the speed, "
          f"{1 - kept['EmbedRAG'] / kept['transformers']:.0%} less kept for backward")


if __name__ == "__main__":
    main()
