"""Triplet losses (the report's offline triplets and the field's online mining), and distillation.

Online mining follows FaceNet (Schroff et al. 2015; semi-hard negatives) and
Hermans et al. 2017 (batch-hard over P x K batches, soft margin). Batch-hard
from a random start can collapse: every embedding maps to one point, all
distances are 0 and the loss sits at the margin. The training stage guards
against that the way the literature does: semi-hard mining for the first
epochs, a soft margin option, learning-rate warm-up, and logging the share of
active triplets and the embedding spread so a collapse is visible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from facesearch.nets.distances import squared_distances


def pairwise_distances(emb: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix of a batch; the epsilon keeps sqrt differentiable at 0.

    The expansion (:func:`~facesearch.distances.squared_distances`) leaves float rounding
    (~1e-7) on the diagonal, which sqrt would turn into ~3e-4; the diagonal is zeroed instead.
    """
    sq = emb.pow(2).sum(1)
    d2 = squared_distances(emb, emb, sq, sq).clamp_min(0)
    off_diagonal = 1.0 - torch.eye(len(emb), device=emb.device, dtype=d2.dtype)
    return torch.sqrt(d2 * off_diagonal + 1e-12) * off_diagonal


def _masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same  # positives (excluding self), negatives


def _hinge(d_ap: torch.Tensor, d_an: torch.Tensor, margin: float, soft: bool) -> torch.Tensor:
    return F.softplus(d_ap - d_an) if soft else F.relu(d_ap - d_an + margin)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; 0 (with a zero gradient) where nothing is.

    Masks instead of boolean indexing or an ``if mask.any()``: both would wait for the
    GPU (a data-dependent shape, a Python bool), and a step needs no host sync.
    """
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


def batch_hard_loss(
    emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, soft: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """For each anchor: its farthest positive and nearest negative in the batch.

    Anchors without a positive or a negative do not count. Returns the loss and
    ``active``, the share of counted anchors whose triplet violates the margin
    (device tensors: no host sync).
    """
    dist = pairwise_distances(emb)
    pos, neg = _masks(labels)
    valid = pos.any(1) & neg.any(1)
    d_ap = (dist * pos).max(1).values
    d_an = dist.masked_fill(~neg, float("inf")).min(1).values
    losses = _hinge(d_ap, d_an, margin, soft)
    return _masked_mean(losses, valid), {"active": _masked_mean((d_ap - d_an + margin > 0).float(), valid)}


def semi_hard_loss(
    emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, soft: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """For each anchor-positive pair: the nearest negative farther than the positive.

    When no negative is farther than the positive, the farthest negative is
    used (as TensorFlow Addons' ``triplet_semihard_loss`` does), so easy
    batches still give a gradient without chasing the hardest, often noisy,
    negatives early in training.

    Each anchor's negative distances are sorted once (non-negatives last, at
    +inf); a binary search of every positive distance in its anchor's row gives
    the first farther negative. All N x N pairs are computed and masked, so the
    shapes never depend on the labels and nothing waits for the GPU.
    """
    dist = pairwise_distances(emb)
    pos, neg = _masks(labels)
    n_neg = neg.sum(1, keepdim=True)  # (N, 1)
    neg_sorted = dist.masked_fill(~neg, float("inf")).sort(1).values  # (N, N): negatives first, ascending
    first_farther = torch.searchsorted(neg_sorted.detach(), dist.detach().contiguous(), right=True)  # (N, N)
    has_farther = first_farther < n_neg
    semi = neg_sorted.gather(1, first_farther.clamp_max(len(emb) - 1))
    hardest = neg_sorted.gather(1, (n_neg - 1).clamp_min(0)).expand_as(dist)  # the farthest negative
    chosen = torch.where(has_farther, semi, hardest)
    counted = pos & (n_neg > 0)  # anchor-positive pairs with a negative to compare against
    losses = _hinge(dist, chosen, margin, soft)
    return _masked_mean(losses, counted), {"active": _masked_mean((dist - chosen + margin > 0).float(), counted)}


def offline_triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 0.2, soft: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The report's loss: fixed (anchor, positive, negative) triplets, L2 distance."""
    d_ap = F.pairwise_distance(anchor, positive, eps=1e-12)
    d_an = F.pairwise_distance(anchor, negative, eps=1e-12)
    return _hinge(d_ap, d_an, margin, soft).mean(), {"active": (d_ap - d_an + margin > 0).float().mean()}


def spread_out_loss(emb: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Global orthogonal regularisation (Zhang et al. 2017, "spread-out" descriptors) of a batch.

    ``negatives``: (N, N) bool, the pairs of different people. Their cosines should look like
    those of random directions in d dimensions, mean 0 and second moment 1/d:
    ``mean² + max(0, second moment - 1/d)``. Why: a triplet loss is satisfied once each batch's
    people sit a margin apart, which a handful of directions allows; on the sample (30 people,
    200 steps from scratch) the embeddings used ~2 of 128 dimensions, and unseen people who share
    those few traits landed at cosine 0.9999 (issue 26). Masks, as the mining: no host sync.
    """
    e = F.normalize(emb.float(), dim=1)
    cos = e @ e.T
    mean = _masked_mean(cos, negatives)
    second = _masked_mean(cos * cos, negatives)
    return mean.pow(2) + F.relu(second - 1.0 / e.shape[1])


def negative_pairs(labels: torch.Tensor) -> torch.Tensor:
    """(N, N) bool: the pairs of a P x K batch whose labels differ."""
    return labels.unsqueeze(0) != labels.unsqueeze(1)


# A distilled student is still within this cosine of its teacher on a row: that row counts as
# "active" (still being pulled), the distillation analogue of a triplet that violates its margin.
DISTILL_ACTIVE_COSINE = 0.9


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Embedding distillation: mean ``1 - cos(student_i, teacher_i)`` over the batch's rows.

    The student learns to place each face where the teacher does (direction only: both
    are searched by cosine, and a normalised student cannot match a length anyway). For
    unit vectors it is half the squared L2 distance. ``active``: share of rows whose cosine
    is still below :data:`DISTILL_ACTIVE_COSINE`.
    """
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=1, eps=1e-12)
    return (1.0 - cos).mean(), {"active": (cos < DISTILL_ACTIVE_COSINE).float().mean()}


MINING = {"batch_hard": batch_hard_loss, "semi_hard": semi_hard_loss}
