"""Triplet losses: the report's offline triplets and the field's online mining.

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

from facesearch.distances import squared_distances


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


def batch_hard_loss(
    emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, soft: bool = False
) -> tuple[torch.Tensor, dict[str, float]]:
    """For each anchor: its farthest positive and nearest negative in the batch."""
    dist = pairwise_distances(emb)
    pos, neg = _masks(labels)
    valid = pos.any(1) & neg.any(1)
    if not valid.any():
        return emb.sum() * 0.0, {"active": 0.0}
    d_ap = (dist * pos).max(1).values
    d_an = dist.masked_fill(~neg, float("inf")).min(1).values
    losses = _hinge(d_ap, d_an, margin, soft)[valid]
    return losses.mean(), {"active": float((d_ap[valid] - d_an[valid] + margin > 0).float().mean())}


def semi_hard_loss(
    emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, soft: bool = False
) -> tuple[torch.Tensor, dict[str, float]]:
    """For each anchor-positive pair: the nearest negative farther than the positive.

    When no negative is farther than the positive, the farthest negative is
    used (as TensorFlow Addons' ``triplet_semihard_loss`` does), so easy
    batches still give a gradient without chasing the hardest, often noisy,
    negatives early in training.
    """
    dist = pairwise_distances(emb)
    pos, neg = _masks(labels)
    a_idx, p_idx = pos.nonzero(as_tuple=True)
    if len(a_idx) == 0 or not neg.any():
        return emb.sum() * 0.0, {"active": 0.0}
    d_ap = dist[a_idx, p_idx]  # (T,)
    d_an = dist[a_idx]  # (T, N)
    neg_rows = neg[a_idx]
    farther = neg_rows & (d_an > d_ap.unsqueeze(1))
    semi = d_an.masked_fill(~farther, float("inf")).min(1).values
    hardest_fallback = d_an.masked_fill(~neg_rows, float("-inf")).max(1).values
    chosen = torch.where(farther.any(1), semi, hardest_fallback)
    has_neg = neg_rows.any(1)
    losses = _hinge(d_ap, chosen, margin, soft)[has_neg]
    return losses.mean(), {"active": float((d_ap[has_neg] - chosen[has_neg] + margin > 0).float().mean())}


def offline_triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 0.2, soft: bool = False
) -> tuple[torch.Tensor, dict[str, float]]:
    """The report's loss: fixed (anchor, positive, negative) triplets, L2 distance."""
    d_ap = F.pairwise_distance(anchor, positive, eps=1e-12)
    d_an = F.pairwise_distance(anchor, negative, eps=1e-12)
    return _hinge(d_ap, d_an, margin, soft).mean(), {"active": float((d_ap - d_an + margin > 0).float().mean())}


MINING = {"batch_hard": batch_hard_loss, "semi_hard": semi_hard_loss}
