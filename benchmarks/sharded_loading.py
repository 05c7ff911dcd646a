#!/usr/bin/env python
"""Peak memory of each process of an FSDP2 run, with every process reading the weights and
with the main process alone reading them (`fsdp_cpu_ram_efficient_loading`).

    python benchmarks/sharded_loading.py [--model DIR] [--kinds full lora] [--processes 2]

Default model: Gemma-3-270M prepared by scripts/prepare_gemma.py. Each run is train.py for one
optimizer step on `--processes` CPU processes over gloo, with Accelerate's FSDP2 switched on
the way tests/fsdp2.py does it (Accelerate keeps FSDP off for CPU processes); on GPUs the same
runs come from `accelerate launch --config_file configs/accelerate/fsdp2.yaml`. The table shows
each process's peak RSS up to its first training step (loading and sharding: what reading on
the main process alone saves) and over the run (the step gathers each block's weights, and
Accelerate keeps the embeddings gathered), and the parameter values it held before sharding
(the summary's `sharding.per_process[].loaded_before_sharding`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import OFFLINE, gemma  # noqa: E402

# Runs a script as a process of the launch and writes, when it exits, its peak RSS (KiB) up to
# its first training step (loading, sharding) and over the whole run.
PEAK = """import atexit, os, resource, runpy, sys
sys.path.insert(0, os.environ["EMBEDRAG_ROOT"])
import embedrag.train.loop as loop
def hwm():
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    return int(status.split()[0])
setup = []
step = loop.forward_backward
def first_step(*args, **kwargs):
    if not setup:
        setup.append(hwm())
    return step(*args, **kwargs)
loop.forward_backward = first_step
def report():
    with open(os.path.join(os.environ["PEAK_RSS_DIR"], os.environ["RANK"]), "w") as f:
        f.write(f"{setup[0]} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(model: str, data: str, kind: str, main_loads: bool, processes: int,
        work: str) -> dict:
    name = f"{kind}-{'main' if main_loads else 'every'}"
    out, peaks = os.path.join(work, name), os.path.join(work, name + ".rss")
    os.makedirs(peaks, exist_ok=True)
    wrapper = os.path.join(work, "peak.py")
    with open(wrapper, "w") as f:
        f.write(PEAK)
    env = {**OFFLINE, "PEAK_RSS_DIR": peaks, "OMP_NUM_THREADS": "1", "EMBEDRAG_ROOT": ROOT,
           "FSDP_CPU_RAM_EFFICIENT_LOADING": str(main_loads).lower()}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                    str(processes), wrapper, "tests/fsdp2.py", "train.py",
                    "--model_name_or_path", model, "--train_dataset", data, "--output_dir", out,
                    "--overwrite_output_dir", "--finetune_type", kind, "--batch_size", "2",
                    "--max_steps", "1", "--save_on_epoch_end", "0", "--mixed_precision", "no",
                    "--query_max_len", "32", "--passage_max_len", "64"],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "training_summary_report.json"), encoding="utf-8") as f:
        sharding = json.load(f)["sharding"]
    rss = [[int(k) / 1024 for k in open(os.path.join(peaks, str(r))).read().split()]
           for r in range(processes)]
    return {"run": name, "total": sharding["total_parameters"],
            "setup_mib": [r[0] for r in rss], "peak_rss_mib": [r[1] for r in rss],
            "loaded": [h["loaded_before_sharding"] for h in sharding["per_process"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: Gemma-3-270M)")
    p.add_argument("--kinds", nargs="+", default=["full", "lora"])
    p.add_argument("--processes", type=int, default=2)
    args = p.parse_args()
    from tests.helpers import learnable_rows, write_jsonl

    work = tempfile.mkdtemp(prefix="sharded_loading_")
    data = str(write_jsonl(os.path.join(work, "d.jsonl"), learnable_rows(16)))
    model = args.model or gemma()
    print(f"model {model}, {args.processes} processes, fp32, one step")
    print(f"{'run':<12} {'parameters':>11}  {'peak RSS to step 1 (MiB)':<26} "
          f"{'peak RSS (MiB)':<18} values read before sharding")
    for kind in args.kinds:
        for main_loads in (False, True):
            r = run(model, data, kind, main_loads, args.processes, work)
            print(f"{r['run']:<12} {r['total']:>11,}  "
                  f"{', '.join(f'{m:,.0f}' for m in r['setup_mib']):<26} "
                  f"{', '.join(f'{m:,.0f}' for m in r['peak_rss_mib']):<18} "
                  + ", ".join(f"{n:,}" for n in r["loaded"]))


if __name__ == "__main__":
    main()
