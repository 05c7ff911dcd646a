"""Models in float64, for equivalence tests; in this process (`with float64():`) or around a
script in its own:  python tests/float64.py train.py ARGS...

Equivalence tests (GradCache against plain backpropagation, two processes against one with the
double batch, a mixture against its concatenation) compare runs that do the same mathematics
in another order. In float32 that order shows at ~1e-7 of a gradient's terms, and AdamW, which
divides by sqrt(v) + 1e-8, turns the rounding of a near-zero gradient into an update of up to
~lr: how far the two runs end apart is then a property of the CPU's kernels, not of the code.
In float64 the rounding is ~1e-16 of the terms, so AdamW's update moves by at most
lr * 1e-16 / 1e-8 = lr * 1e-8 a step (see TOLERANCE), while a wrong gradient still moves weights
by ~lr. The switch is made from the test side: every module built inside takes torch's default
dtype (LoRA adapters, heads), and `AutoModel.from_pretrained` is asked for float64 weights.
"""

import functools
import os
import runpy
import sys
from contextlib import contextmanager

import torch
import transformers

# Two runs' weights after a few AdamW steps at lr <= 1e-2 differ by at most ~lr * 1e-8 a step
# from rounding (above); 1e-8 leaves that a margin of 10x-100x and stays five orders of
# magnitude below what one wrong gradient does.
TOLERANCE = 1e-8


@contextmanager
def float64():
    """Inside: torch's default dtype is float64 and AutoModel loads float64 weights."""
    auto = transformers.AutoModel
    own = auto.__dict__.get("from_pretrained")  # the descriptor, to put back as it was
    load = auto.from_pretrained
    before = torch.get_default_dtype()

    def from_pretrained(*args, **kwargs):
        kwargs["dtype"] = torch.float64
        return load(*args, **kwargs)

    torch.set_default_dtype(torch.float64)
    auto.from_pretrained = from_pretrained
    try:
        yield
    finally:
        if own is None:
            del auto.from_pretrained
        else:
            auto.from_pretrained = own
        torch.set_default_dtype(before)


def rms_reference(x, weight, eps, offset):
    """RMSNorm by hand in float64 (Gemma's form, 1 + w, when `offset`)."""
    x, w = x.double(), weight.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1 + w if offset else w)


def float64_norms(model):
    """`model` (a float64 reference) with its RMSNorms computing in float64 by hand:
    transformers' cast their input to float32 whatever its dtype. Returns the model. (Its
    hub-kernel switching is turned off first, or train() would put the norms back.)"""
    from embedrag.cpu import kernels

    if getattr(model, "use_kernels", False):
        model.use_kernels = False

    for module in model.modules():
        name = type(module).__name__
        if name in kernels.RMS_NORMS:
            module.forward = functools.partial(rms_reference, weight=module.weight,
                                               eps=kernels._eps(module),
                                               offset=kernels.RMS_NORMS[name])
    return model


if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    with float64():
        runpy.run_path(script, run_name="__main__")
