#!/usr/bin/env python
"""One attention layer's forward+backward: EmbedRAG's CPU attention against transformers' SDPA.

    python benchmarks/attention_kernels.py [--rows 8] [--length 128] [--repeats 9]

Heads as in real models' layers (query heads / key-value heads x head size), bf16 inputs under
bf16 autocast as a LoRA step on a bf16 base computes them, a padding mask (rows of lengths
spread over [length/2, length]) plus causality for decoders. Three columns, median
milliseconds after a warm-up call:

- transformers' SDPA on the bf16 inputs;
- the same on the inputs cast to fp32: what EmbedRAG ran before grouped-query heads were passed
  through (transformers copies every key/value head out per query head when there is a mask);
- EmbedRAG's attention (`embedrag/cpu/kernels.py`): fp32, grouped heads passed to SDPA as they
  are, and for all-MiniLM-L6-v2 (attention dropout 0.1) its own dropout path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name: (query heads, key-value heads, head size, causal, attention dropout)
LAYERS = {"Gemma-3-270M": (4, 1, 256, True, 0.0), "Qwen2-1.5B (gte-Qwen2)": (12, 2, 128, True, 0.0),
          "Qwen3-0.6B": (16, 8, 128, True, 0.0), "Llama-3-8B": (32, 8, 128, True, 0.0),
          "all-MiniLM-L6-v2": (12, 12, 32, False, 0.1)}


def main() -> None:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from embedrag.cpu import kernels

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()

    class Layer(torch.nn.Module):
        def __init__(self, causal: bool, groups: int):
            super().__init__()
            self.is_causal, self.num_key_value_groups = causal, groups

    def in_fp32(module, q, k, v, mask, **kw):  # transformers' SDPA on fp32 copies
        with torch.autocast("cpu", enabled=False):
            out, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), mask, **kw)
        return out.to(q.dtype), None

    n, length = args.rows, args.length
    lengths = torch.linspace(length // 2, length, n).round().long()
    allowed = torch.arange(length)[None, :] < lengths[:, None]                 # (N, L) right-padded
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n} rows of "
          f"{length // 2}-{length} tokens, bf16 autocast; forward+backward, median ms")
    print(f"{'layer':<24} {'heads':>9} {'tf bf16':>8} {'tf fp32':>8} {'EmbedRAG':>9} "
          f"{'vs fp32':>8}")
    for name, (heads, kv_heads, size, causal, dropout) in LAYERS.items():
        mask = allowed[:, None, None, :].expand(n, 1, length, length)          # (N, 1, L, L)
        if causal:
            mask = mask & torch.ones(length, length, dtype=torch.bool).tril()
        layer = Layer(causal, heads // kv_heads)

        times = {}
        for label, attend in (("tf bf16", sdpa_attention_forward), ("tf fp32", in_fp32),
                              ("EmbedRAG", kernels.attention)):
            runs = []
            for _ in range(args.repeats + 1):  # the first is a warm-up
                q = torch.randn(n, heads, length, size, dtype=torch.bfloat16, requires_grad=True)
                k, v = (torch.randn(n, kv_heads, length, size, dtype=torch.bfloat16,
                                    requires_grad=True) for _ in range(2))
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out, _ = attend(layer, q, k, v, mask, dropout=dropout)
                out.float().sum().backward()
                runs.append(time.perf_counter() - start)
            times[label] = statistics.median(runs[1:]) * 1000
        print(f"{name:<24} {f'{heads}/{kv_heads}x{size}':>9} {times['tf bf16']:>8.1f} "
              f"{times['tf fp32']:>8.1f} {times['EmbedRAG']:>9.1f} "
              f"{times['tf fp32'] / times['EmbedRAG']:>7.2f}x")


if __name__ == "__main__":
    main()
