"""The one squared-distance formula, on numpy arrays and torch tensors, against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facesearch.nets.distances import squared_distances, unit_rows


@pytest.fixture
def rows():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(9, 16)).astype(np.float32), rng.normal(size=(40, 16)).astype(np.float32)
    return a, b


def brute(a, b):
    return ((a[:, None, :].astype(np.float64) - b[None].astype(np.float64)) ** 2).sum(-1)


def test_numpy_matches_brute_force(rows):
    a, b = rows
    d2 = squared_distances(a, b, (b**2).sum(1), (a**2).sum(1))
    assert d2.dtype == np.float32 and d2.shape == (9, 40)
    assert np.allclose(d2, brute(a, b), atol=1e-4)


def test_without_the_query_norm_each_row_is_shifted_by_it(rows):
    # Rankings drop ||a_i||^2: constant along a row, so the order of the row is the distance's.
    a, b = rows
    d2 = squared_distances(a, b, (b**2).sum(1))
    assert np.allclose(d2 + (a**2).sum(1)[:, None], brute(a, b), atol=1e-4)
    assert (np.argsort(d2, axis=1) == np.argsort(brute(a, b), axis=1)).all()


def test_torch_matches_numpy_and_carries_gradients(rows):
    a, b = rows
    ta, tb = torch.from_numpy(a).requires_grad_(), torch.from_numpy(b)
    d2 = squared_distances(ta, tb, tb.pow(2).sum(1), ta.pow(2).sum(1))
    assert torch.allclose(d2, torch.from_numpy(squared_distances(a, b, (b**2).sum(1), (a**2).sum(1))), atol=1e-5)
    d2.sum().backward()
    # d/da_i of sum_j ||a_i - b_j||^2 = 2 sum_j (a_i - b_j)
    expected = 2 * (len(b) * a - b.sum(0)[None, :])
    assert np.allclose(ta.grad.numpy(), expected, atol=1e-3)


def test_float_order_is_the_one_committed_results_were_made_with(rows):
    # Models and metrics depend on the rounding: (a_sq + b_sq) - 2 a.b, doubling before the product
    # (exact, so equal to doubling after it, as the search and evaluation code once wrote it).
    a, b = rows
    a_sq, b_sq = (a**2).sum(1), (b**2).sum(1)
    assert np.array_equal(squared_distances(a, b, b_sq), b_sq[None, :] - 2.0 * (a @ b.T))
    assert np.array_equal(squared_distances(a, b, b_sq, a_sq), (a_sq[:, None] + b_sq[None, :]) - (2 * a) @ b.T)
    t = torch.from_numpy(a)
    t_sq = t.pow(2).sum(1)
    assert torch.equal(squared_distances(t, t, t_sq, t_sq), t_sq.unsqueeze(1) + t_sq.unsqueeze(0) - 2 * t @ t.t())


def test_into_a_buffer_gives_the_same_floats(rows):
    a, b = rows
    a_sq, b_sq = (a**2).sum(1), (b**2).sum(1)
    buf = np.full((len(a), len(b)), np.nan, np.float32)
    assert squared_distances(a, b, b_sq, out=buf) is buf
    assert np.array_equal(buf, squared_distances(a, b, b_sq))
    assert np.array_equal(squared_distances(a, b, b_sq, a_sq, out=buf), squared_distances(a, b, b_sq, a_sq))


def test_unit_rows_leaves_unit_rows_alone_and_scales_the_rest():
    rng = np.random.default_rng(0)
    raw = (rng.normal(size=(20, 16)) * rng.uniform(5, 9, size=(20, 1))).astype(np.float32)
    unit = unit_rows(raw)
    assert unit.dtype == np.float32 and np.allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-6)
    assert np.allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True))
    # Already unit (a normalising model's rows): the same array, so thresholds and metrics keep their bits.
    assert unit_rows(unit) is unit
    assert np.array_equal(unit_rows(np.zeros((2, 4), np.float32)), np.zeros((2, 4)))  # nothing to scale
    assert unit_rows(np.zeros((0, 4), np.float32)).shape == (0, 4)
