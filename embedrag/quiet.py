"""Third-party console lines that look like failures but are not, silenced one by one.

A user reads a run's console to learn whether it is healthy. Lines a library prints about its
own internals, which nothing the user does can change, teach them to skim past warnings, and
the next real one is missed. Each message here is matched exactly, for the one place it comes
from; everything else (every other warning, and these same messages in other circumstances)
still shows. What we can fix at its cause is fixed where it arises instead: activation
checkpointing through its current name (`embedrag.model.loading`), the cross-process gather
through torch's functional collective (`embedrag.losses`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# bitsandbytes (0.49+) tries, when imported on a CPU with AVX-512 BF16, to fetch an optional
# 4-bit inference kernel through the `kernels` package and logs a warning when that package
# is not installed, then uses its own kernel. PEFT imports bitsandbytes whenever it is
# installed, so every LoRA run (and merge.py, evaluate.py) printed it. EmbedRAG does not use
# that kernel at all: `loading.match_training_kernels` keeps 4-bit layers on the training
# kernel. Only the missing-package case is dropped; any other failure to load still shows.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _NoKernelsPackage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        missing = isinstance(cause, ModuleNotFoundError) and cause.name == "kernels"
        return not (str(record.msg).startswith(BNB_KERNELS_MESSAGE) and missing)


def install() -> None:
    """Attach the filters (before bitsandbytes is imported; idempotent)."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _NoKernelsPackage) for f in logger.filters):
        logger.addFilter(_NoKernelsPackage())


@contextmanager
def peft_model_construction() -> Iterator[None]:
    """Around get_peft_model / PeftModel.from_pretrained: PEFT (0.17-0.21) probes
    `model.is_gradient_checkpointing`, which transformers 5 deprecated (a FutureWarning on
    every adapter load). The probe is PEFT's, not ours or the user's; only that message, only
    during these calls, is ignored."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield
