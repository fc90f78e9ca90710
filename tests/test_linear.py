"""Wang et al. 2018, sec. 3.4: closed forms checked against gradient descent and against each other."""

import pytest
import torch
from torch import nn

from ddlib import linear as L
from ddlib.unroll import unroll

DT = torch.float64


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    N, D, K = 200, 6, 2
    X = torch.randn(N, D, generator=g, dtype=DT) * torch.logspace(0, -0.5, D, dtype=DT)
    Y = X @ torch.randn(D, K, generator=g, dtype=DT) + 0.1 * torch.randn(N, K, generator=g, dtype=DT)
    return X, Y, g


def test_least_squares_equals_gradient_descent(problem):
    X, Y, _ = problem
    theta = torch.zeros(X.shape[1], Y.shape[1], dtype=DT)
    H = L.hessian(X)
    step = 1.0 / torch.linalg.eigvalsh(H).max()
    for _ in range(5000):
        theta = theta - step * (H @ theta - X.T @ Y / X.shape[0])
    assert torch.allclose(theta, L.least_squares(X, Y), atol=1e-8)


def test_one_step_equals_unroll_on_a_linear_layer(problem):
    X, Y, g = problem
    D, K = X.shape[1], Y.shape[1]
    d, t = torch.randn(4, D, generator=g, dtype=DT), torch.randn(4, K, generator=g, dtype=DT)
    theta0 = torch.randn(D, K, generator=g, dtype=DT)
    model = nn.Linear(D, K, bias=False).to(DT)
    half_sq = lambda out, y: 0.5 * (out - y).pow(2).sum(1).mean()  # noqa: E731
    with torch.no_grad():
        out = unroll(model, {"weight": theta0.T}, d, t, torch.tensor(0.3, dtype=DT), [torch.arange(4)], loss_fn=half_sq)
    assert torch.allclose(out["weight"].T, L.one_step(theta0, d, t, 0.3), atol=1e-12)


def test_any_init_set_needs_and_suffices_with_d_points(problem):
    X, Y, g = problem
    theta_star = L.least_squares(X, Y)
    d, t = L.any_init_set(theta_star, 0.7, generator=g)
    theta0 = torch.randn(50, *theta_star.shape, generator=g, dtype=DT)
    assert torch.allclose(L.one_step(theta0, d, t, 0.7), theta_star.expand_as(theta0), atol=1e-10)
    with pytest.raises(ValueError, match="M=3 < D=6"):
        L.any_init_set(theta_star, 0.7, M=3)
    # rank argument: every M < D set keeps at least D - M unit eigenvalues of A
    for M in range(1, X.shape[1]):
        d_rand = torch.randn(M, X.shape[1], generator=g, dtype=DT)
        assert L.unit_eigenvalues(d_rand, 0.5) >= X.shape[1] - M


def test_fixed_init_set_uses_rank_many_points(problem):
    X, Y, g = problem
    theta_star = L.least_squares(X, Y)
    theta0 = torch.randn_like(theta_star)
    d, t = L.fixed_init_set(theta0, theta_star, 0.4)
    assert d.shape[0] == Y.shape[1]  # rank of theta* - theta0 is K = 2
    assert torch.allclose(L.one_step(theta0, d, t, 0.4), theta_star, atol=1e-10)
    d1, t1 = L.fixed_init_set(theta0[:, :1], theta_star[:, :1], 0.4)
    assert d1.shape[0] == 1


def test_bounds_sandwich_monte_carlo_and_learned_sets(problem):
    X, Y, g = problem
    theta_star = L.least_squares(X, Y)
    K = Y.shape[1]
    for M in (1, 3, 6):
        d, t = L.projection_set(X, theta_star, M, 0.5)
        mc = L.expected_gap(X, Y, d, t, 0.5, sigma=1.0, samples=20000, generator=g)
        closed = L.projection_set_gap(X, theta_star, M, 1.0)
        assert mc == pytest.approx(closed, rel=0.05, abs=1e-9)
        assert L.gap_lower_bound(X, K, M, 1.0) <= closed + 1e-12
    # learning through the unrolled step lands between the bounds, and at M = D on the optimum
    d, t, lr, gaps = L.learn_distilled_set(X, Y, 2, iters=300, generator=g)
    learned = L.expected_gap(X, Y, d, t, lr, samples=20000, generator=g)
    assert L.gap_lower_bound(X, K, 2, 1.0) * 0.95 <= learned <= L.projection_set_gap(X, theta_star, 2, 1.0) * 1.05
    d, t, lr, gaps = L.learn_distilled_set(X, Y, X.shape[1], iters=600, generator=g)
    assert L.expected_gap(X, Y, d, t, lr, generator=g) < 1e-4 * gaps[0]
