"""A normal run's console holds our lines, progress bars and nothing else; each third-party
message we silence is silenced exactly, and only it."""

import logging
import re
import warnings

from embedrag import quiet

# Progress bars (tqdm, also as transformers' and datasets' bars): "desc:  50%|███  | 2/4 [..."
# or, without a known total, "desc: 24 examples [00:00, ...]".
TQDM = re.compile(r"^[\w .-]*:\s+(\d+%\|.*\|\s*\d+/\d+ \[|\d+ \w+ \[\d+:\d+)")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# What train.py itself prints on stdout, in the order a run prints it.
OURS = ("note: ", "precision: ", "embedding: ", "embedrag: ", "eval at step ", "epoch ", "done: ",
        "model card: ", "resuming from ")
TABLE = re.compile(r"^(\s+ndcg@10\s+mrr@10|(before|after)\s+\d\.\d{4}\s)")


def foreign_lines(stdout: str, stderr: str) -> list[str]:
    """Console lines that are neither ours nor a progress bar (nor blank)."""
    strange = [line for line in stdout.splitlines()
               if line.strip() and not line.startswith(OURS) and not TABLE.match(line)]
    for line in re.split(r"[\r\n]", ANSI.sub("", stderr)):
        if line.strip() and not TQDM.match(line) and not line.startswith("train.py: "):
            strange.append(line)
    return strange


def test_a_training_run_prints_only_our_lines_and_progress_bars(cli_run):
    """LoRA with an evaluation set, activation checkpointing and checkpoints: where the
    bitsandbytes kernels warning, transformers' and PEFT's deprecation warnings and the
    use_cache notice used to appear."""
    _, done = cli_run
    assert foreign_lines(done.stdout, done.stderr) == []
    assert "train: 100%" in done.stderr and "epoch 2: mean loss" in done.stdout
    # the allow-list is not a blank cheque: the old noise would not pass it
    noise = ("Failed to load CPU gemm_4bit_forward from kernels-community: No module named "
             "'kernels'. Please make sure you already `pip install kernels`\n"
             "/site-packages/transformers/modeling_utils.py:3312: FutureWarning: "
             "`is_gradient_checkpointing` is deprecated\n  warnings.warn(\n")
    assert len(foreign_lines("", noise)) == 3


def _bnb_record(cause: BaseException, msg: str = quiet.BNB_KERNELS_MESSAGE + ": %s. Please"):
    return logging.LogRecord(quiet.BNB_CPU_LOGGER, logging.WARNING, "ops.py", 1, msg,
                             (cause,), None)


def test_bitsandbytes_filter_drops_only_the_missing_kernels_package_message():
    quiet.install()
    quiet.install()  # idempotent
    logger = logging.getLogger(quiet.BNB_CPU_LOGGER)
    assert sum(isinstance(f, quiet._NoKernelsPackage) for f in logger.filters) == 1
    missing = ModuleNotFoundError("No module named 'kernels'", name="kernels")
    assert not logger.filter(_bnb_record(missing))
    # the optional package installed but failing, another missing module, another message:
    # all still shown
    assert logger.filter(_bnb_record(RuntimeError("kernel version 0.10 < 0.11.1")))
    assert logger.filter(_bnb_record(ModuleNotFoundError("x", name="torchao")))
    assert logger.filter(_bnb_record(missing, "Something else failed: %s"))
    assert logging.getLogger("bitsandbytes").filter(_bnb_record(missing))  # other loggers


def test_peft_probe_warning_is_ignored_only_inside_adapter_loading():
    probe = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet.peft_model_construction():
            warnings.warn(probe, FutureWarning, stacklevel=1)
            warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
            warnings.warn(probe, UserWarning, stacklevel=1)
        warnings.warn(probe, FutureWarning, stacklevel=1)
    assert [(str(w.message)[:20], w.category) for w in seen] == [
        ("another FutureWarnin", FutureWarning), (probe[:20], UserWarning),
        (probe[:20], FutureWarning)]
