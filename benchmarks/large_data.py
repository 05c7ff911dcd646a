#!/usr/bin/env python
"""Large training sets: time to the first step, and peak RSS, of a one-step run, by size.

    python benchmarks/large_data.py [--rows 10000 200000] [--old_commit 3fe819a]

Synthetic rows like mined retrieval data (a query, 1 positive and 7 negatives of ~600
characters: ~5 KB a row) go to a tiny LoRA model for one optimizer step. Each run is
`train.py --max_steps 1` in its own process; the figures are the time from its start to the
end of its first optimizer step (imports, load, check, convert, hash, the model, the step), its
wall time to exit (saving included) and its peak RSS. The current loader runs twice — first
with an empty datasets cache, then with the cache of the first run — and the loader of
--old_commit (from a git worktree) once, for sizes up to --old_up_to.

Peak RSS counts the pages of memory-mapped Arrow files the run has read, which are page cache
the kernel drops when memory is short; the anonymous peak is what the process itself holds.
--memory_limit_mib runs the larger first runs under a hard cgroup memory limit (page cache
included), which shows what the run needs rather than what it was allowed to keep.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Runs the command, sampling its /proc status every 0.2 s: peak RSS (kernel's own figure), and
# the peaks of its anonymous memory (what only the process holds) and of its file-backed pages
# (memory-mapped Arrow files: page cache the kernel may drop and re-read at will). Its progress
# bar (stderr) tells when the first optimizer step finished: "train: ... 1/1".
RUNNER = """
import resource, subprocess, sys, threading, time
def status(pid):
    try:
        lines = open(f"/proc/{pid}/status").read().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, v in (l.split(":", 1) for l in lines)
            if k in ("RssAnon", "RssFile")}
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
first = [float("nan")]
def watch():
    seen = b""
    while chunk := proc.stderr.read1(65536):
        seen = (seen + chunk)[-4096:]
        if first[0] != first[0] and b"1/1 [" in seen:
            first[0] = time.perf_counter() - start
threading.Thread(target=watch, daemon=True).start()
anon = files = 0
while proc.poll() is None:
    now = status(proc.pid)
    anon, files = max(anon, now.get("RssAnon", 0)), max(files, now.get("RssFile", 0))
    time.sleep(0.2)
print(proc.returncode, time.perf_counter() - start,
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, anon, files, first[0])
"""


def cgroup(limit_mib: int, name: str) -> str | None:
    """A cgroup-v1 memory group capped at limit_mib (page cache included), or None where
    this machine offers none; the run then goes in it."""
    root = "/sys/fs/cgroup/memory"
    path = os.path.join(root, name)
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit_mib * 2**20))
    except OSError:
        return None
    return path


def synthesize(path: str, rows: int, seed: int = 0) -> None:
    """Random texts over the tiny tokenizer's words: every passage distinct, ~600 characters
    (~95 words of ~6.3 characters), queries ~60."""
    import numpy as np

    from tests.conftest import WORDS

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for _ in range(0, rows, 1000):
            picks = words[rng.integers(0, len(words), size=(1000, 8 * 95 + 10))]
            for r in picks:
                texts = [" ".join(r[10 + 95 * k: 10 + 95 * (k + 1)]) for k in range(8)]
                f.write(json.dumps({"query": " ".join(r[:10]), "pos": texts[:1],
                                    "neg": texts[1:]}) + "\n")
    os.replace(path + ".tmp", path)


def measure(train_py: str, model: str, data: str, out: str, env: dict,
            group: str | None = None) -> dict:
    cmd = [sys.executable, train_py, "--model_name_or_path", model, "--train_dataset", data,
           "--output_dir", out, "--overwrite_output_dir", "--batch_size", "8",
           "--finetune_type", "lora", "--max_steps", "1", "--save_on_epoch_end", "0",
           "--query_max_len", "64", "--passage_max_len", "256"]
    enter = None
    if group:  # this child joins the memory-capped group before it starts the run
        def enter():
            with open(os.path.join(group, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
    done = subprocess.run([sys.executable, "-c", RUNNER, *cmd], env=env, capture_output=True,
                          text=True, preexec_fn=enter)
    code, seconds, rss_kib, anon_kib, file_kib, first = done.stdout.split()
    return {"exit": int(code), "seconds": float(seconds), "first_step_s": float(first),
            "peak_rss_mib": int(rss_kib) / 1024, "peak_anon_mib": int(anon_kib) / 1024,
            "peak_file_mib": int(file_kib) / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 200_000])
    p.add_argument("--old_commit", default="3fe819a",
                   help="the loader to compare with (3fe819a tokenized every row up front; "
                        "7b4946b held the rows in Python)")
    p.add_argument("--old_up_to", type=int, default=20_000,
                   help="run the old loader only up to this many rows")
    p.add_argument("--workdir", default=None)
    p.add_argument("--memory_limit_mib", type=int, default=0,
                   help="run the new loader's first run of sizes above 10k rows inside a "
                        "cgroup with this hard memory limit (page cache included); 0 = none")
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="large_data_")
    os.makedirs(work, exist_ok=True)
    from tests.conftest import build_tiny_decoder

    model = os.path.join(work, "model")
    if not os.path.isdir(model):
        build_tiny_decoder(model)
    old = os.path.join(work, "old")
    if not os.path.isdir(old):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", old, args.old_commit],
                       check=True, capture_output=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = []
    for n in args.rows:
        data = os.path.join(work, f"rows_{n}.jsonl")
        if not os.path.isfile(data):
            t = time.perf_counter()
            synthesize(data, n)
            print(f"{n} rows: {os.path.getsize(data) / 2**20:.0f} MiB of JSONL "
                  f"({time.perf_counter() - t:.0f} s to write)", flush=True)
        cache = os.path.join(work, f"cache_{n}")
        subprocess.run(["rm", "-rf", cache], check=True)
        runs = [("new, first run", os.path.join(ROOT, "train.py"), cache),
                ("new, cached", os.path.join(ROOT, "train.py"), cache)]
        if n <= args.old_up_to:
            runs.append((f"before ({args.old_commit})", os.path.join(old, "train.py"), cache))
        for name, train_py, cache_dir in runs:
            group = None
            if args.memory_limit_mib and n > 10_000 and name == "new, first run":
                group = cgroup(args.memory_limit_mib, "embedrag_large_data")
                name += f" (limit {args.memory_limit_mib} MiB)" if group else " (no cgroup)"
            r = measure(train_py, model, data, os.path.join(work, "out"),
                        {**env, "HF_DATASETS_CACHE": cache_dir}, group)
            results.append({"rows": n, "loader": name, **r})
            print(f"{n:>9} rows  {name:34} exit {r['exit']}  first step at "
                  f"{r['first_step_s']:6.1f} s, exit at {r['seconds']:6.1f} s  "
                  f"peak RSS {r['peak_rss_mib']:6.0f} MiB (anonymous {r['peak_anon_mib']:6.0f}, "
                  f"file-backed {r['peak_file_mib']:6.0f})", flush=True)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
