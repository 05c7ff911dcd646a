"""InfoNCE over in-batch and hard negatives, shared across processes, optionally cached.

Inputs are L2-normalised embeddings:
    q: (B, D)      one row per query
    p: (B*G, D)    G = 1 + neg_nums passages per query, row-major: query i's positive is row
                   i*G, followed by its G-1 hard negatives.
Every query is scored against every passage of the batch, so each query sees its own hard
negatives, the other queries' positives and their hard negatives (B*G - 1 negatives in all).
With several processes, the passages of all of them are gathered (keeping gradients), so a
query sees W*B*G - 1 negatives, exactly as one process with the W-fold batch would.

    loss = mean_i  -log( exp(s(i, t_i)) / sum_j exp(s(i, j)) ),   s(i, j) = q_i . p_j / temperature

A candidate whose text is one of query i's own positives (the same passage drawn for another
query, or a second positive of the query) is a false negative: it is masked out of the sum
rather than pushed away. Use it for any retrieval data with (query, positive[, negatives]) rows.

Two recipes add to it (`objective`): distillation, KL(teacher || student) over each query's
own candidates (its positive and hard negatives) from a stronger model's scores, as
FlagEmbedding, sentence-transformers and Tevatron train with (Hinton et al., 2015; RocketQAv2,
Ren et al., 2021); and Matryoshka representation learning (Kusupati et al., 2022): the same
loss on each listed prefix of the embedding, re-normalised, summed with weights, so the first
64 dimensions are an embedding of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from embedrag.config import TrainConfig


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32: half-precision embeddings are scored in float32, float64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float,
             false_negative_mask: torch.Tensor | None = None,
             targets: torch.Tensor | None = None) -> torch.Tensor:
    """Mean InfoNCE loss of the batch (a scalar).

    false_negative_mask: (B, P) bool, True where a candidate is left out of query i's sum.
    targets: (B,) index of each query's positive in p; default i*G.
    """
    scores = (wide(q) @ wide(p).T) / temperature                      # (B, P)
    if false_negative_mask is not None:
        scores = scores.masked_fill(false_negative_mask, float("-inf"))
    if targets is None:
        targets = torch.arange(q.shape[0], device=q.device) * (p.shape[0] // q.shape[0])
    return F.cross_entropy(scores, targets)


def false_negative_mask(relevant: torch.Tensor, passage_ids: torch.Tensor,
                        targets: torch.Tensor) -> torch.Tensor:
    """(B, P) bool: candidate j is one of query i's positives (by passage id) but not its target.

    relevant: (B, R) passage ids relevant to each query, padded with -1; passage_ids: (P,).
    """
    mask = (passage_ids[None, :, None] == relevant[:, None, :]).any(dim=-1)   # (B, P)
    mask[torch.arange(relevant.shape[0], device=mask.device), targets] = False
    return mask


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each of W processes -> (W*n, ...), in rank order, with gradients flowing
    back to each process's own part (Accelerate's `gather` detaches). Same n everywhere:
    Accelerate's even batches guarantee it."""
    if not distributed():
        return x
    # torch's functional collective: its backward sends each slot's gradient back to the
    # process the slot came from, summed over processes. (torch.distributed.nn.functional's
    # all_gather, which did the same, is deprecated; older torch names this one _tensor_.)
    import torch.distributed._functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    return gather(x.contiguous(), 0, dist.group.WORLD)                     # (W*n, ...)


def gather_ids(x: torch.Tensor) -> torch.Tensor:
    """Integer ids from every process, no gradients. (n,) -> (W*n,)."""
    if not distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def embedding_loss(q: torch.Tensor, p: torch.Tensor, relevant: torch.Tensor,
                   passage_ids: torch.Tensor, temperature: float,
                   cross_device: bool = True, gte: bool = False,
                   margin: float | None = None,
                   stats: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """InfoNCE of this process's queries against its passages, or against every process's
    passages when cross_device (and there are several processes).

    gte: GTE's "improved contrastive loss" (Li et al., 2023, arXiv:2308.03281, eq. 2): beside
    query i against every passage, its denominator also holds query i against the other
    queries, and its positive d_i against the other queries (the passage->query direction) and
    against the other passages. Same-text pairs are left out: the query itself, queries whose
    positive is d_i, and the passages relevant to query i.
    margin: a candidate whose cosine is above the positive's minus `margin` is dropped rather
    than pushed away, as a probable unlabelled positive, beside the exact-text mask: the rule
    of NV-Retriever's positive-aware filtering (TopK-MarginPos, Moreira et al., 2024,
    arXiv:2407.15831), which there filters a teacher's mined negatives, applied here to the
    training model's in-batch scores. (ms-swift's fake-negative mask is milder: above the
    positive plus 0.1.) It trusts the model's scores: a model that does not yet rank positives
    first (a base LM) has its errors there, and dropping them leaves the loss little to learn
    from. `stats`, when given, gets "margin_dropped": the share of candidates (the
    positives aside) the margin dropped, a 0-d tensor (read without a host sync).

    Scaling: each process returns the mean over its own queries. Gradients reach every
    process's passages through the gather, and data-parallel training averages gradients over
    the W processes, which makes them equal to those of the mean over all W*B queries on one
    process — the single-process large-batch gradient, with no extra factor.
    """
    b, group = q.shape[0], p.shape[0] // q.shape[0]
    offset = q_offset = 0
    queries = q
    if cross_device and distributed():
        offset, q_offset = dist.get_rank() * p.shape[0], dist.get_rank() * b
        p = gather_with_grad(p)                                           # (W*B*G, D)
        passage_ids = gather_ids(passage_ids)                             # (W*B*G,)
        if gte:
            queries = gather_with_grad(q)                                 # (W*B, D)
    targets = offset + torch.arange(b, device=q.device) * group          # (B,)
    mask = false_negative_mask(relevant, passage_ids, targets)           # (B, P)
    if not gte and margin is None:
        return info_nce(q, p, temperature, mask, targets)
    rows = torch.arange(b, device=q.device)
    cosines, masks = [wide(q) @ wide(p).T], [mask]                    # (B, P)
    if gte:
        d = wide(p[targets])                                              # (B, D) positives
        own = torch.zeros((b, queries.shape[0]), dtype=torch.bool, device=q.device)
        own[rows, q_offset + rows] = True                                  # (B, W*B)
        # queries whose positive is d_i (duplicates, or d_i relevant to both)
        shares = passage_ids[::group][None, :] == passage_ids[targets][:, None]
        itself = torch.zeros_like(mask)
        itself[rows, targets] = True
        cosines += [wide(q) @ wide(queries).T, d @ wide(queries).T, d @ wide(p).T]
        masks += [own | shares, own | shares, mask | itself]
    if margin is not None:
        positive = cosines[0][rows, targets].detach()[:, None]              # (B, 1)
        before = masks
        masks = [m | (c.detach() > positive - margin) for c, m in zip(cosines, masks,
                                                                       strict=True)]
        masks[0][rows, targets] = False
        if stats is not None:
            dropped = sum((m & ~was).sum() for m, was in zip(masks, before, strict=True))
            open_ = sum((~was).sum() for was in before) - b                  # positives aside
            stats["margin_dropped"] = dropped / open_.clamp(min=1)
    scores = torch.cat([c.masked_fill(m, float("-inf"))
                        for c, m in zip(cosines, masks, strict=True)], dim=1) / temperature
    return F.cross_entropy(scores, targets)


def margin_note(margin: float, share: float) -> str:
    """The one-line warning for a first step whose margin dropped most in-batch candidates."""
    return (f"note: --false_negative_margin {margin} dropped {share:.0%} of the in-batch "
            f"candidates at the first step (those scoring above their positive minus {margin}):"
            " this model does not rank positives first yet, so those are mostly its own errors,"
            " which the loss needs; expect it to learn little (README: \"Which loss trains the "
            "better model\")")


def kd_loss(q: torch.Tensor, p: torch.Tensor, teacher: torch.Tensor, temperature: float,
            kd_temperature: float) -> torch.Tensor:
    """Mean over queries of KL(teacher || student) on each query's own G candidates.

    q: (B, D) and p: (B*G, D) normalised, p row-major as in `info_nce` (this process's slots,
    not the gathered ones); teacher: (B, G) scores, NaN where a candidate has none (it is left
    out of both distributions). The student's distribution is softmax(q.p / temperature) over
    the same candidates, the teacher's softmax(teacher / kd_temperature). Queries without a
    scored candidate add nothing; with none at all the loss is 0 (with a gradient graph)."""
    b = q.shape[0]
    student = torch.einsum("bd,bgd->bg", wide(q), wide(p).view(b, -1, p.shape[-1]))
    student = student / temperature                                        # (B, G)
    known = torch.isfinite(teacher)                                        # (B, G)
    rows = known.any(dim=-1)                                               # (B,)
    # A row without scores takes all its candidates (finite numbers) and then weight 0: no
    # row is selected by a mask, which would wait for the device.
    use = known | ~rows[:, None]                                           # (B, G)
    teacher = teacher.nan_to_num(0.0).to(student.dtype)
    log_t = torch.log_softmax((teacher / kd_temperature).masked_fill(~use, float("-inf")), -1)
    log_s = torch.log_softmax(student.masked_fill(~use, float("-inf")), -1)
    # masked_fill (not where) after the log-softmax: no 0 * inf in the forward or backward pass
    terms = log_t.exp() * (log_t.masked_fill(~use, 0.0) - log_s.masked_fill(~use, 0.0))
    return (terms.sum(dim=-1) * rows).sum() / rows.sum().clamp(min=1)     # mean over rows


@dataclass(frozen=True)
class LossSettings:
    """What the loss takes from the flags, resolved once."""

    temperature: float
    cross_device: bool = True     # score against every process's passages
    gte: bool = False             # GTE's query-query and passage-query terms
    margin: float | None = None   # NV-Retriever's false-negative margin; None: exact texts only
    kd_weight: float = 0.0        # distillation's weight (0: off)
    kd_temperature: float = 1.0
    matryoshka: tuple[tuple[int, float], ...] = ()  # (prefix dimension, weight), largest first

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> LossSettings:
        return cls(temperature=cfg.temperature, cross_device=bool(cfg.cross_device_negatives),
                   gte=bool(cfg.gte_negatives),
                   margin=cfg.false_negative_margin if cfg.false_negative_margin >= 0 else None,
                   kd_weight=cfg.kd_weight, kd_temperature=cfg.kd_temperature,
                   matryoshka=tuple(cfg.matryoshka()))

    @property
    def has_parts(self) -> bool:
        """Whether the loss is a sum of parts worth logging (distillation, Matryoshka)."""
        return bool(self.kd_weight or self.matryoshka)


def objective(q: torch.Tensor, p: torch.Tensor, batch: dict[str, torch.Tensor],
              loss: LossSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of a batch and its parts (each a weighted sum over the Matryoshka
    prefixes): InfoNCE, plus kd_weight times distillation when the batch has teacher scores;
    the parts also hold "margin_dropped" (see `embedding_loss`).

    q: (B, D); p: (B*G, D) the passage of every slot. Without Matryoshka prefixes and
    distillation this is `embedding_loss` itself."""
    options = {"cross_device": loss.cross_device, "gte": loss.gte, "margin": loss.margin}
    parts: dict[str, torch.Tensor] = {}
    if not loss.has_parts:
        return embedding_loss(q, p, batch["relevant_ids"], batch["passage_ids"],
                              loss.temperature, **options, stats=parts), parts
    dims = loss.matryoshka or ((q.shape[-1], 1.0),)
    teacher = batch.get("teacher_scores") if loss.kd_weight else None
    total = q.new_zeros((), dtype=wide(q).dtype)
    parts["infonce"] = total.detach().clone()
    if teacher is not None:
        parts["kd"] = total.detach().clone()
    for dim, weight in dims:
        qd, pd = q, p
        if dim < q.shape[-1]:                       # a prefix, re-normalised
            qd, pd = F.normalize(q[:, :dim], dim=-1), F.normalize(p[:, :dim], dim=-1)
        nce = embedding_loss(qd, pd, batch["relevant_ids"], batch["passage_ids"],
                             loss.temperature, **options,
                             stats=parts if dim == q.shape[-1] else None)
        total = total + weight * nce
        parts["infonce"] += weight * nce.detach()
        if teacher is not None:
            kd = kd_loss(qd, pd, teacher, loss.temperature, loss.kd_temperature)
            total = total + weight * loss.kd_weight * kd
            parts["kd"] += weight * kd.detach()
    return total, parts
