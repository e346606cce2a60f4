from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from facesearch.nets.losses import (
    DISTILL_ACTIVE_COSINE,
    batch_hard_loss,
    distillation_loss,
    negative_pairs,
    offline_triplet_loss,
    pairwise_distances,
    semi_hard_loss,
    spread_out_loss,
)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(12, 5, generator=g), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    return emb, labels


def test_pairwise_distances_match_cdist(batch):
    emb, _ = batch
    assert torch.allclose(pairwise_distances(emb), torch.cdist(emb, emb), atol=1e-5)


def test_batch_hard_matches_brute_force(batch):
    emb, labels = batch
    d = torch.cdist(emb, emb)
    expected = []
    for a in range(len(labels)):
        pos = [d[a, p] for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        neg = [d[a, n] for n in range(len(labels)) if labels[n] != labels[a]]
        expected.append(F.relu(max(pos) - min(neg) + 0.3))
    loss, _ = batch_hard_loss(emb, labels, margin=0.3)
    assert torch.isclose(loss, torch.stack(expected).mean(), atol=1e-5)
    soft, _ = batch_hard_loss(emb, labels, soft=True)
    assert soft > 0


def test_semi_hard_matches_brute_force(batch):
    emb, labels = batch
    d = torch.cdist(emb, emb)
    margin, expected = 0.2, []
    for a, p in itertools.permutations(range(len(labels)), 2):
        if labels[a] != labels[p]:
            continue
        negs = [d[a, n] for n in range(len(labels)) if labels[n] != labels[a]]
        farther = [x for x in negs if x > d[a, p]]
        chosen = min(farther) if farther else max(negs)
        expected.append(F.relu(d[a, p] - chosen + margin))
    loss, stats = semi_hard_loss(emb, labels, margin=margin)
    assert torch.isclose(loss, torch.stack(expected).mean(), atol=1e-5)
    assert 0 <= stats["active"] <= 1


def test_offline_triplet_matches_torch(batch):
    emb, _ = batch
    a, p, n = emb[:4], emb[4:8], emb[8:]
    loss, _ = offline_triplet_loss(a, p, n, margin=0.5)
    assert torch.isclose(loss, F.triplet_margin_loss(a, p, n, margin=0.5, eps=1e-12), atol=1e-5)


def test_collapsed_embedding_gives_margin_and_gradients_are_finite(batch):
    _, labels = batch
    emb = torch.ones(12, 5, requires_grad=True)
    loss, stats = batch_hard_loss(F.normalize(emb, dim=1), labels, margin=0.2)
    assert torch.isclose(loss, torch.tensor(0.2), atol=1e-4) and stats["active"] == 1.0
    loss.backward()
    assert torch.isfinite(emb.grad).all()


def test_single_identity_batch_has_no_triplets():
    emb = F.normalize(torch.randn(4, 3), dim=1)
    labels = torch.zeros(4, dtype=torch.long)
    for fn in (batch_hard_loss, semi_hard_loss):
        loss, stats = fn(emb, labels)
        assert float(loss) == 0.0 and stats["active"] == 0.0


def brute_semi_hard(d, labels, margin):
    expected = []
    for a, p in itertools.permutations(range(len(labels)), 2):
        negs = [d[a, n] for n in range(len(labels)) if labels[n] != labels[a]]
        if labels[a] != labels[p] or not negs:
            continue
        farther = [x for x in negs if x > d[a, p]]
        expected.append(F.relu(d[a, p] - (min(farther) if farther else max(negs)) + margin))
    return torch.stack(expected).mean()


def test_masked_losses_skip_anchors_without_partners_and_handle_ties():
    # A singleton identity (no positive) and duplicated embeddings (tied distances): the masked,
    # sync-free forms must still count exactly the triplets the definitions name.
    g = torch.Generator().manual_seed(1)
    base = F.normalize(torch.randn(7, 4, generator=g), dim=1)
    emb = torch.cat([base, base[:3]]).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 9, 3, 3, 4])
    d = pairwise_distances(emb.detach())
    loss, stats = semi_hard_loss(emb, labels, margin=0.3)
    assert torch.isclose(loss, brute_semi_hard(d, labels, 0.3), atol=1e-5)
    hard = []
    for a in range(len(labels)):
        pos = [d[a, p] for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        if pos:
            hard.append(F.relu(max(pos) - min(d[a, n] for n in range(len(labels)) if labels[n] != labels[a]) + 0.3))
    hard_loss, hard_stats = batch_hard_loss(emb, labels, margin=0.3)
    assert torch.isclose(hard_loss, torch.stack(hard).mean(), atol=1e-5)
    (loss + hard_loss).backward()
    assert torch.isfinite(emb.grad).all()
    for value in (stats["active"], hard_stats["active"]):
        assert isinstance(value, torch.Tensor) and 0 <= float(value) <= 1  # a tensor: read once per epoch


def test_distillation_loss_is_one_minus_the_mean_cosine(batch):
    student, _ = batch
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(student.shape, generator=g) * 3  # not unit length: only the direction counts
    loss, stats = distillation_loss(student, teacher)
    cos = [float(s @ t / (s.norm() * t.norm())) for s, t in zip(student, teacher, strict=True)]
    assert loss.item() == pytest.approx(1 - sum(cos) / len(cos), abs=1e-6)
    assert stats["active"].item() == pytest.approx(sum(c < DISTILL_ACTIVE_COSINE for c in cos) / len(cos))
    same, same_stats = distillation_loss(student, 2 * student)
    assert same.item() == pytest.approx(0.0, abs=1e-6) and same_stats["active"].item() == 0.0
    student = student.clone().requires_grad_(True)
    distillation_loss(student, teacher)[0].backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_spread_out_is_zero_for_orthogonal_people_and_high_for_one_direction():
    labels = torch.arange(4)
    negatives = negative_pairs(labels)
    assert negatives.sum() == 12 and not negatives.diagonal().any()
    assert spread_out_loss(torch.eye(4, 8), negatives) == 0  # cosines 0: mean 0, second moment 0 <= 1/8
    same = torch.ones(4, 8, requires_grad=True)  # one shared direction: cosine 1 for every pair
    loss = spread_out_loss(same, negatives)
    assert torch.isclose(loss, torch.tensor(1 + (1 - 1 / 8)))
    loss.backward()
    assert same.grad.abs().sum() > 0


def test_spread_out_counts_only_pairs_of_different_people(batch):
    emb, labels = batch
    negatives = negative_pairs(labels)
    cos = F.normalize(emb, dim=1) @ F.normalize(emb, dim=1).T
    values = cos[labels[:, None] != labels[None, :]]
    expected = values.mean() ** 2 + F.relu(values.pow(2).mean() - 1 / emb.shape[1])
    assert torch.isclose(spread_out_loss(emb, negatives), expected, atol=1e-6)
    assert spread_out_loss(emb, torch.zeros_like(negatives)) == 0  # no pair of different people: nothing to spread
