"""InfoNCE against a float64 reference written with plain Python loops."""

import math

import torch
import torch.nn.functional as F

from embedrag.loss import info_nce


def reference_info_nce(q, p, temperature, masked=frozenset()):
    """Loops and math.exp in float64; `masked` holds (query, candidate) pairs to leave out."""
    q, p = q.double().tolist(), p.double().tolist()
    group = len(p) // len(q)
    total = 0.0
    for i, qi in enumerate(q):
        scores = [sum(a * b for a, b in zip(qi, pj, strict=True)) / temperature for pj in p]
        denom = sum(math.exp(s) for j, s in enumerate(scores) if (i, j) not in masked)
        total += -(scores[i * group] - math.log(denom))
    return total / len(q)


def _batch(b=3, g=3, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=gen), dim=-1)
    p = F.normalize(torch.randn(b * g, d, generator=gen), dim=-1)
    p[::g] = F.normalize(q + 0.3 * torch.randn(b, d, generator=gen), dim=-1)  # near positives
    return q, p


def test_matches_float64_reference():
    q, p = _batch()
    for t in (0.02, 0.05, 1.0):
        got = info_nce(q, p, t).item()
        assert abs(got - reference_info_nce(q, p, t)) < 1e-4 * max(1.0, abs(got))


def test_masked_duplicate_positive_is_left_out():
    q, p = _batch()
    # Query 1's positive (row 3) also appears as query 0's negative (row 2) and query 2's
    # positive (row 6): identical passages. Those copies are false negatives for query 1.
    p[2] = p[3]
    p[6] = p[3]
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[1, 2] = mask[1, 6] = True
    got = info_nce(q, p, 0.05, mask).item()
    want = reference_info_nce(q, p, 0.05, masked={(1, 2), (1, 6)})
    assert abs(got - want) < 1e-4
    unmasked = info_nce(q, p, 0.05).item()
    assert abs(unmasked - reference_info_nce(q, p, 0.05)) < 1e-4
    assert unmasked > got + 0.1  # unmasked, the copies of the positive count as negatives


def test_gradient_matches_float64_autograd():
    q, p = _batch(seed=1)
    q32, p32 = q.clone().requires_grad_(), p.clone().requires_grad_()
    info_nce(q32, p32, 0.02).backward()
    q64, p64 = q.double().requires_grad_(), p.double().requires_grad_()
    scores = q64 @ p64.T / 0.02
    F.cross_entropy(scores, torch.arange(3) * 3).backward()
    assert torch.allclose(q32.grad.double(), q64.grad, atol=1e-4)
    assert torch.allclose(p32.grad.double(), p64.grad, atol=1e-4)
