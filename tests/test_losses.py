"""InfoNCE against a float64 reference written with plain Python loops."""

import math

import torch
import torch.nn.functional as F

from embedrag.losses import info_nce


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


def reference_kd(q, p, teacher, temperature, kd_temperature):
    """KL(teacher || student) over each query's own scored candidates, by loops in float64."""
    q, p, teacher = q.double().tolist(), p.double().tolist(), teacher.double().tolist()
    group = len(p) // len(q)
    total, counted = 0.0, 0
    for i, qi in enumerate(q):
        known = [k for k in range(group) if math.isfinite(teacher[i][k])]
        if not known:
            continue
        s = {k: sum(a * b for a, b in zip(qi, p[i * group + k], strict=True)) / temperature
             for k in known}
        t = {k: teacher[i][k] / kd_temperature for k in known}
        zs = math.log(sum(math.exp(v) for v in s.values()))
        zt = math.log(sum(math.exp(v) for v in t.values()))
        total += sum(math.exp(t[k] - zt) * ((t[k] - zt) - (s[k] - zs)) for k in known)
        counted += 1
    return total / counted if counted else 0.0


def test_kd_matches_float64_reference_with_unscored_candidates():
    from embedrag.losses import kd_loss

    q, p = _batch(b=4, g=3, d=8, seed=2)
    teacher = torch.tensor([[3.0, 1.0, -1.0], [2.0, float("nan"), 0.5],
                            [float("nan")] * 3, [0.0, 0.0, 4.0]])
    for t, kt in ((0.05, 1.0), (0.02, 0.5), (1.0, 2.0)):
        got = kd_loss(q, p, teacher, t, kt).item()
        want = reference_kd(q, p, teacher, t, kt)
        assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (t, kt, got, want)
    # the KL is zero exactly when the student's distribution is the teacher's
    student = torch.einsum("bd,bgd->bg", q, p.view(4, 3, -1)) / 0.05
    assert abs(kd_loss(q, p, student * 2.0, 0.05, 2.0).item()) < 1e-5


def test_kd_gradient_matches_float64_autograd_and_is_finite():
    from embedrag.losses import kd_loss

    q, p = _batch(b=3, g=4, d=8, seed=3)
    teacher = torch.tensor([[2.0, float("nan"), 1.0, 0.0], [1.0, 1.0, 1.0, 1.0],
                            [float("nan"), 3.0, float("nan"), float("nan")]])
    q32, p32 = q.clone().requires_grad_(), p.clone().requires_grad_()
    kd_loss(q32, p32, teacher, 0.05, 0.5).backward()
    q64, p64 = q.double().requires_grad_(), p.double().requires_grad_()
    terms = []
    for i in range(3):  # a second implementation: per query, on its known candidates only
        known = [k for k in range(4) if math.isfinite(teacher[i, k])]
        s = torch.stack([q64[i] @ p64[i * 4 + k] for k in known]) / 0.05
        t = torch.log_softmax(teacher[i, known].double() / 0.5, 0)
        terms.append((t.exp() * (t - torch.log_softmax(s, 0))).sum())
    torch.stack(terms).mean().backward()
    assert torch.isfinite(q32.grad).all() and torch.isfinite(p32.grad).all()
    assert torch.allclose(q32.grad.double(), q64.grad, atol=1e-4)
    assert torch.allclose(p32.grad.double(), p64.grad, atol=1e-4)


def test_objective_sums_weighted_matryoshka_prefixes_and_distillation():
    from embedrag.config import parse_dims
    from embedrag.losses import LossSettings, objective

    q, p = _batch(b=3, g=3, d=8, seed=4)
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, float("nan"), 0.0], [0.5, 0.5, 3.0]])
    batch = {"relevant_ids": torch.arange(3)[:, None] * 3, "passage_ids": torch.arange(9),
             "teacher_scores": teacher}
    spec = "8:1,4:0.5,2:0.25"
    settings = LossSettings(temperature=0.05, kd_weight=0.3, kd_temperature=0.7,
                            matryoshka=tuple(parse_dims(spec)))
    loss, parts = objective(q, p, batch, settings)
    nce = kd = 0.0
    for dim, w in ((8, 1.0), (4, 0.5), (2, 0.25)):
        qd, pd = F.normalize(q[:, :dim].double(), dim=-1), F.normalize(p[:, :dim].double(), dim=-1)
        nce += w * reference_info_nce(qd, pd, 0.05)
        kd += w * reference_kd(qd, pd, teacher, 0.05, 0.7)
    assert abs(parts["infonce"].item() - nce) < 1e-4
    assert abs(parts["kd"].item() - kd) < 1e-4
    assert abs(loss.item() - (nce + 0.3 * kd)) < 1e-4


def reference_gte(q, p, ids, relevant, temperature, gte, margin):
    """GTE's improved contrastive loss and the score margin, by definition, in float64 loops:
    each query's candidate list is written out term by term."""
    q, p = q.double().tolist(), p.double().tolist()
    group = len(p) // len(q)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
    total = 0.0
    for i, qi in enumerate(q):
        t = i * group
        d = p[t]
        pos = dot(qi, d)
        def keep(c, pos=pos):
            return margin is None or c <= pos - margin

        negatives = [dot(qi, p[k]) for k in range(len(p))
                     if k != t and ids[k] not in relevant[i] and keep(dot(qi, p[k]))]
        if gte:
            others = [j for j in range(len(q)) if j != i and ids[j * group] != ids[t]]
            negatives += [dot(qi, q[j]) for j in others if keep(dot(qi, q[j]))]
            negatives += [dot(d, q[j]) for j in others if keep(dot(d, q[j]))]
            negatives += [dot(d, p[k]) for k in range(len(p))
                          if k != t and ids[k] not in relevant[i] and keep(dot(d, p[k]))]
        denom = math.exp(pos / temperature) + sum(math.exp(s / temperature) for s in negatives)
        total += -(pos / temperature - math.log(denom))
    return total / len(q)


def _gte_batch():
    """4 queries x (positive + 2 negatives); query 3 repeats query 1's positive (same id),
    query 0 has a second relevant passage among query 2's negatives."""
    q, p = _batch(b=4, g=3, d=8, seed=4)
    ids = list(range(12))
    p[9], ids[9] = p[3], 3                      # query 3's positive is query 1's
    relevant = [{0, 8}, {3}, {6}, {3}]
    width = max(len(r) for r in relevant)
    rel = torch.full((4, width), -1)
    for i, r in enumerate(relevant):
        rel[i, : len(r)] = torch.tensor(sorted(r))
    return q, p, torch.tensor(ids), rel, relevant


def test_gte_and_margin_match_the_float64_definition():
    from embedrag.losses import embedding_loss

    q, p, ids, rel, relevant = _gte_batch()
    for gte in (False, True):
        for margin in (None, 0.1, 0.5):
            got = embedding_loss(q, p, rel, ids, 0.05, gte=gte, margin=margin).item()
            want = reference_gte(q, p, ids.tolist(), relevant, 0.05, gte, margin)
            assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (gte, margin, got, want)
    plain = embedding_loss(q, p, rel, ids, 0.05).item()
    assert plain == embedding_loss(q, p, rel, ids, 0.05, gte=False, margin=None).item()
    assert embedding_loss(q, p, rel, ids, 0.05, gte=True).item() > plain  # more negatives
    # a margin drops candidates: the loss can only fall
    assert embedding_loss(q, p, rel, ids, 0.05, margin=0.1).item() <= plain


def reference_dropped_share(q, p, ids, relevant, gte, margin):
    """The share of the candidates (positives aside) that the margin drops, counted over the
    same candidate lists as `reference_gte`."""
    q, p = q.double(), p.double()
    group = len(p) // len(q)
    seen = dropped = 0
    for i in range(len(q)):
        t = i * group
        pos = (q[i] @ p[t]).item()
        scores = [(q[i] @ p[k]).item() for k in range(len(p))
                  if k != t and ids[k] not in relevant[i]]
        if gte:
            others = [j for j in range(len(q)) if j != i and ids[j * group] != ids[t]]
            scores += [(q[i] @ q[j]).item() for j in others]
            scores += [(p[t] @ q[j]).item() for j in others]
            scores += [(p[t] @ p[k]).item() for k in range(len(p))
                       if k != t and ids[k] not in relevant[i]]
        seen += len(scores)
        dropped += sum(c > pos - margin for c in scores)
    return dropped / seen


def test_margin_reports_the_share_it_drops():
    from embedrag.losses import embedding_loss

    q, p, ids, rel, relevant = _gte_batch()
    for gte in (False, True):
        for margin in (0.0, 0.1, 0.5, 2.0):
            stats = {}
            embedding_loss(q, p, rel, ids, 0.05, gte=gte, margin=margin, stats=stats)
            want = reference_dropped_share(q, p, ids.tolist(), relevant, gte, margin)
            assert abs(stats["margin_dropped"].item() - want) < 1e-6, (gte, margin)
    assert want == 1.0  # a margin of 2 on cosines drops every candidate
    stats = {}
    embedding_loss(q, p, rel, ids, 0.05, gte=True, stats=stats)
    assert stats == {}  # no margin, nothing to report


def test_gte_gradient_matches_float64_autograd():
    from embedrag.losses import embedding_loss

    q, p, ids, rel, relevant = _gte_batch()
    q32, p32 = q.clone().requires_grad_(), p.clone().requires_grad_()
    embedding_loss(q32, p32, rel, ids, 0.05, gte=True, margin=0.3).backward()
    # second implementation: the same candidate lists as the reference, as float64 tensors
    q64, p64 = q.double().requires_grad_(), p.double().requires_grad_()
    idl, total = ids.tolist(), 0
    for i in range(4):
        t = 3 * i
        pos = q64[i] @ p64[t]
        def keep(c, pos=pos):
            return c.item() <= pos.item() - 0.3

        cands = [q64[i] @ p64[k] for k in range(12) if k != t and idl[k] not in relevant[i]]
        others = [j for j in range(4) if j != i and idl[3 * j] != idl[t]]
        cands += [q64[i] @ q64[j] for j in others] + [p64[t] @ q64[j] for j in others]
        cands += [p64[t] @ p64[k] for k in range(12) if k != t and idl[k] not in relevant[i]]
        logits = torch.stack([pos] + [c for c in cands if keep(c)]) / 0.05
        total = total - torch.log_softmax(logits, 0)[0]
    (total / 4).backward()
    assert torch.allclose(q32.grad.double(), q64.grad, atol=1e-4)
    assert torch.allclose(p32.grad.double(), p64.grad, atol=1e-4)
