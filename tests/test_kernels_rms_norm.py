"""The CPU RMSNorm (embedrag/cpu/kernels.py) computes what transformers' norms compute, checked
against float64 references, gradcheck and the modules themselves; install swaps only the
norms it has checked."""

from __future__ import annotations

import pytest
import torch

from embedrag.cpu import kernels
from tests.float64 import rms_reference


@pytest.mark.parametrize("offset", [True, False])
def test_rms_norm_matches_float64_reference(offset):
    torch.manual_seed(8)
    x = (torch.randn(2, 5, 16, dtype=torch.float64) * 3).requires_grad_()
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    out = kernels._RMSNorm.apply(x, w, 1e-6, offset)
    torch.testing.assert_close(out, rms_reference(x, w, 1e-6, offset), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: kernels._RMSNorm.apply(a, b, 1e-6, offset),
                                    (x, w))


def test_rms_norm_backward_is_the_same_inside_autocast():
    """A backward pass started under bf16 autocast must not run the norm's sums in bf16."""
    torch.manual_seed(10)
    x = torch.randn(4, 6, 256, requires_grad=True)
    w = torch.randn(256)
    grads = []
    for on in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            out = kernels._RMSNorm.apply(x, w, 1e-6, False)
            grads.append(torch.autograd.grad((out * w).sum(), x)[0])
    assert torch.equal(grads[0], grads[1])


HALF = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("name", ["Gemma3RMSNorm", "Qwen2RMSNorm"])
@pytest.mark.parametrize("x_dtype", HALF)
@pytest.mark.parametrize("w_dtype", HALF)
def test_rms_norm_is_transformers_norm(name, x_dtype, w_dtype):
    """The same output as transformers' module, to the bit, in every dtype (the same
    operations in the same order). Gradients: the same derivative summed in another order, so
    each is as close to the float64 reference as transformers' own: within the error theirs
    has plus what summing D = 64 terms can round by (D * eps of the dtype, relative to the
    largest value), in whichever dtype the gradient is held."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    torch.manual_seed(9)
    offset = kernels.RMS_NORMS[name]
    module = {"Gemma3RMSNorm": Gemma3RMSNorm, "Qwen2RMSNorm": Qwen2RMSNorm}[name](64).to(w_dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(64) * 0.3 + (0.0 if offset else 1.0))
    x = (torch.randn(3, 7, 64) * 4).to(x_dtype).requires_grad_()
    upstream = torch.randn(3, 7, 64)
    x64 = x.detach().double().requires_grad_()
    w64 = module.weight.detach().double().requires_grad_()
    reference = rms_reference(x64, w64, 1e-6, offset)
    want = [reference, *torch.autograd.grad((reference * upstream).sum(), (x64, w64))]

    def run(forward):
        out = forward(x)
        return [out, *torch.autograd.grad((out.float() * upstream).sum(), (x, module.weight))]

    theirs, ours = run(module), run(lambda t: kernels._rms_forward(module, t))
    assert ours[0].dtype == theirs[0].dtype
    assert torch.equal(ours[0], theirs[0])
    for a, b, ref in zip(ours[1:], theirs[1:], want[1:], strict=True):
        assert a.dtype == b.dtype
        rounding = 64 * torch.finfo(a.dtype).eps * ref.abs().max().item()
        assert (a.double() - ref).abs().max() <= (b.double() - ref).abs().max() + rounding


def test_rms_norm_keeps_only_its_input_and_a_scale_for_backward():
    """transformers' norm keeps two fp32 copies of a bf16 input; this one the input itself."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    module = Gemma3RMSNorm(64).bfloat16()
    x = torch.randn(4, 32, 64, dtype=torch.bfloat16, requires_grad=True)
    kept = {}
    for who, forward in (("theirs", module), ("ours", lambda t: kernels._rms_forward(module, t))):
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t, sizes=sizes: sizes.append(t.numel() * t.element_size()) or t,
                lambda t: t):
            forward(x)
        kept[who] = sum(sizes)
    assert kept["ours"] == x.numel() * 2 + 4 * 32 * 4 + 64 * 2  # x, one fp32 r per row, weight
    assert kept["theirs"] >= 2 * x.numel() * 4


class Impostor(torch.nn.Module):
    """Carries a known class's name (set per test) but computes something else."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.weight = torch.nn.Parameter(torch.ones(1, 8) if kind == "2-D weight" else
                                         torch.ones(8))
        self.variance_epsilon = 1e-6

    def forward(self, x, *residual):
        if self.kind == "two inputs":
            return x + residual[0]
        if self.kind == "another formula":
            return self.weight * x
        eps = 1e-5 if self.kind == "another eps" else self.variance_epsilon
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        if self.kind == "no gradient through the scale":
            scale = scale.detach()
        return self.weight * (x.float() * scale).to(x.dtype)


@pytest.mark.parametrize("kind", ["another formula", "another eps",
                                  "no gradient through the scale", "two inputs", "2-D weight",
                                  "the same"])
def test_install_swaps_only_norms_that_agree(tiny_decoder, kind):
    """A class with a known name that computes something else keeps its own forward, and
    install does not fail on it; one that computes the same is swapped."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_decoder)
    model.impostor = type("Qwen2RMSNorm", (Impostor,), {})(kind)
    state = torch.get_rng_state()
    done = kernels.install(model, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)  # the probes leave the dropout stream alone
    real = [m for m in model.modules() if type(m).__name__ == "Qwen2RMSNorm" and
            m is not model.impostor]
    assert real and all("forward" in vars(m) for m in real)
    assert ("forward" in vars(model.impostor)) == (kind == "the same")
    assert done["cpu_rms_norm_modules"] == len(real) + (kind == "the same")


def test_swapped_norms_pickle_and_leave_the_cpu_alone(tiny_gemma3, monkeypatch):
    """A trained model handed out can be pickled, and on another device (here: the meta
    device) its norms run the class's own forward."""
    import pickle

    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_gemma3)
    assert kernels.install(model, torch.device("cpu"))["cpu_rms_norm_modules"] > 0
    norm = next(m for m in model.modules() if "forward" in vars(m))
    x = torch.randn(3, norm.weight.shape[0])
    again = pickle.loads(pickle.dumps(norm))
    assert torch.equal(again(x), norm(x)) and vars(again)["forward"].args[0] is again
    calls = []
    original = kernels._RMSNorm.apply
    monkeypatch.setattr(kernels._RMSNorm, "apply", lambda *a: calls.append(a) or original(*a))
    norm(x)
    assert len(calls) == 1
    assert norm.to("meta")(x.to("meta")).device.type == "meta"
    assert len(calls) == 1


def test_swapped_norms_stay_through_train_and_eval(tiny_decoder, monkeypatch):
    """transformers (with the `kernels` package it installs) kernelizes hub-decorated layers
    such as RMSNorm again at every train()/eval() switch, putting the class's forward back:
    once installed, the CPU norm must still run in both modes."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_decoder)
    assert model.use_kernels  # transformers' default with `kernels` installed
    norms = kernels.install(model, torch.device("cpu"))["cpu_rms_norm_modules"]
    assert norms > 0
    calls = []
    original = kernels._RMSNorm.apply
    monkeypatch.setattr(kernels._RMSNorm, "apply", lambda *a: calls.append(a) or original(*a))
    ids = torch.randint(5, 100, (2, 6))
    for mode in (True, False, True):
        calls.clear()
        model.train(mode)
        model(ids)
        assert len(calls) == norms, mode
