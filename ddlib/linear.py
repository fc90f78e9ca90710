"""Linear regression: the setting where dataset distillation can be solved in closed form.

Wang et al. 2018, "Dataset Distillation", sec. 3.4. Real data X (N x D), targets Y (N x K),
loss L(theta) = ||X theta - Y||^2 / (2N), optimum theta* (least squares). A distilled set
(d: M x D, t: M x K) and a step size eta give one gradient-descent step

    theta_1 = theta_0 - (eta / M) d^T (d theta_0 - t) = (I - (eta/M) d^T d) theta_0 + (eta/M) d^T t.   (*)

* From **every** theta_0 we land on theta* iff (eta/M) d^T d = I and (eta/M) d^T t = theta*;
  the first needs rank(d) = D, hence M >= D (:func:`any_init_set` builds such a set).
* From **one fixed** theta_0 we only need (eta/M) d^T (t - d theta_0) = theta* - theta_0, a matrix
  of rank r <= min(D, K): r points suffice, one for scalar targets (:func:`fixed_init_set`).
* With M < D points and theta_0 ~ N(0, sigma^2 I) the expected gap E L(theta_1) - L(theta*) is
  1/2 [sigma^2 K ||H^(1/2) A||_F^2 + ||H^(1/2)(B - theta*)||_F^2] with A = I - (eta/M) d^T d (rank of
  I - A at most M) and B = (eta/M) d^T t, H = X^T X / N with eigenvalues lambda_1 >= ... >= lambda_D.
  Eckart-Young on the first term gives a bound no M-point set can beat,
  sigma^2 K / 2 * sum_{i > M} lambda_i (:func:`gap_lower_bound`), positive while M < rank(X); the
  projection on the top-M eigenvectors achieves 1/2 sum_{i > M} lambda_i (sigma^2 K + ||v_i^T theta*||^2)
  (:func:`projection_set`, :func:`projection_set_gap`). The best set lies between the two.

All functions take float64 tensors for exact checks; theta may carry leading batch dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def quadratic_loss(theta: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """L(theta) = ||X theta - Y||_F^2 / (2N); ``theta`` is (..., D, K), the result has shape (...)."""
    residual = X @ theta - Y
    return residual.pow(2).sum((-2, -1)) / (2 * X.shape[0])


def least_squares(X: Tensor, Y: Tensor) -> Tensor:
    """The minimum-norm minimiser theta* of :func:`quadratic_loss` (pseudo-inverse solution)."""
    return torch.linalg.pinv(X) @ Y


def one_step(theta0: Tensor, d: Tensor, t: Tensor, lr: float | Tensor) -> Tensor:
    """Equation (*): one GD step of size ``lr`` on the distilled set (d, t) from ``theta0``."""
    M = d.shape[0]
    return theta0 - (lr / M) * d.T @ (d @ theta0 - t)


def hessian(X: Tensor) -> Tensor:
    """H = X^T X / N, the (constant) Hessian of the quadratic loss."""
    return X.T @ X / X.shape[0]


def any_init_set(theta_star: Tensor, lr: float, M: int | None = None, generator: torch.Generator | None = None):
    """A distilled set of M >= D points that maps every theta_0 to theta* in one step.

    d = sqrt(M / lr) Q with Q (M x D) having orthonormal columns, so (lr/M) d^T d = I; and
    t = d theta*, so (lr/M) d^T t = theta*. ``generator`` picks a random Q (else the identity).
    """
    D = theta_star.shape[0]
    M = D if M is None else M
    if M < D:
        raise ValueError(f"M={M} < D={D}: no distilled set of fewer than D points works from every init (sec. 3.4)")
    if generator is None:
        Q = torch.eye(M, D, dtype=theta_star.dtype)
    else:
        Q, _ = torch.linalg.qr(torch.randn(M, D, generator=generator, dtype=theta_star.dtype))
    d = (M / lr) ** 0.5 * Q
    return d, d @ theta_star


def fixed_init_set(theta0: Tensor, theta_star: Tensor, lr: float, tol: float = 1e-10):
    """The smallest set that maps the one init ``theta0`` to theta*: r = rank(theta* - theta0) points.

    With the SVD theta* - theta0 = U S V^T (rank r): d = U_r^T and t = d theta0 + (r/lr) S_r V_r^T,
    so (lr/r) d^T (t - d theta0) = U_r S_r V_r^T. For scalar targets (K = 1) this is one point.
    """
    U, S, Vh = torch.linalg.svd(theta_star - theta0, full_matrices=False)
    r = int((S > tol * S.max()).sum())
    d = U[:, :r].T
    t = d @ theta0 + (r / lr) * torch.diag(S[:r]) @ Vh[:r]
    return d, t


def _eigh_descending(X: Tensor) -> tuple[Tensor, Tensor]:
    eigvals, eigvecs = torch.linalg.eigh(hessian(X))  # ascending
    return eigvals.flip(-1).clamp_min(0), eigvecs.flip(-1)


def projection_set(X: Tensor, theta_star: Tensor, M: int, lr: float):
    """An M-point set for random inits: project on the M directions of largest curvature.

    d = sqrt(M / lr) V_M^T and t = d theta*, so theta_1 = (I - P_M) theta_0 + P_M theta* with P_M the
    projector on the top-M eigenvectors of H. It minimises the init-variance term of the gap
    (Eckart-Young) and is exact (gap 0) once M >= rank(X).
    """
    V_M = _eigh_descending(X)[1][:, :M]
    d = (M / lr) ** 0.5 * V_M.T
    return d, d @ theta_star


def projection_set_gap(X: Tensor, theta_star: Tensor, M: int, sigma: float) -> float:
    """Expected gap of :func:`projection_set` for theta_0 ~ N(0, sigma^2 I): an achievable upper bound."""
    eigvals, eigvecs = _eigh_descending(X)
    weight = sigma**2 * theta_star.shape[1] + (eigvecs.T @ theta_star).pow(2).sum(1)
    return 0.5 * float((eigvals[M:] * weight[M:]).sum())


def gap_lower_bound(X: Tensor, K: int, M: int, sigma: float) -> float:
    """No M-point set, whatever d, t and lr, has an expected gap below sigma^2 K / 2 * sum_{i>M} lambda_i."""
    return 0.5 * sigma**2 * K * float(_eigh_descending(X)[0][M:].sum())


def unit_eigenvalues(d: Tensor, lr: float, tol: float = 1e-8) -> int:
    """How many eigenvalues of I - (lr/M) d^T d equal 1: directions of theta_0 the step cannot move.

    For M < D there are at least D - M of them (rank(d^T d) <= M): the rank argument of sec. 3.4.
    """
    M, D = d.shape
    A = torch.eye(D, dtype=d.dtype) - (lr / M) * d.T @ d
    return int(((torch.linalg.eigvalsh(A) - 1).abs() < tol).sum())


def learn_distilled_set(X: Tensor, Y: Tensor, M: int, *, sigma: float = 1.0, theta0: Tensor | None = None,
                        iters: int = 500, inits_per_iter: int = 64, opt_lr: float = 0.05, init_lr: float = 0.1,
                        generator: torch.Generator | None = None):
    """Learn (d, t, lr) by gradient descent through the one-step update, as DD does for networks.

    The objective is Wang et al.'s eq. (4) for this model: the real loss after one step, averaged
    over inits theta_0 ~ N(0, sigma^2 I) (or at the one fixed ``theta0``, eq. 2). The step runs
    through :func:`ddlib.unroll.unroll` on a bias-free linear layer. Columns of theta do not
    interact in (*), so B inits of a K-output problem are one init of a (B*K)-output problem:
    one unroll per iteration covers ``inits_per_iter`` inits.

    Returns ``(d, t, lr, gaps)`` with ``gaps`` the objective minus L(theta*) per iteration.
    """
    from torch import nn

    from .unroll import unroll

    if M < 1:
        raise ValueError(f"M={M} must be >= 1")
    D, K = X.shape[1], Y.shape[1]
    dt = X.dtype
    B = 1 if theta0 is not None else inits_per_iter
    loss_star = quadratic_loss(least_squares(X, Y), X, Y)
    model = nn.Linear(D, B * K, bias=False).to(dt)
    d = (torch.randn(M, D, generator=generator, dtype=dt) / D**0.5).requires_grad_(True)
    t = torch.zeros(M, K, dtype=dt, requires_grad=True)
    log_lr = torch.tensor(float(init_lr), dtype=dt).log().requires_grad_(True)
    opt = torch.optim.Adam([d, t, log_lr], lr=opt_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    half_squared_error = lambda out, y: 0.5 * (out - y).pow(2).sum(1).mean()  # noqa: E731  (1/2M)||d theta - t||^2
    batch = [torch.arange(M)]
    gaps = []
    for _ in range(iters):
        if theta0 is None:
            theta_init = sigma * torch.randn(B, D, K, generator=generator, dtype=dt)
        else:
            theta_init = theta0.unsqueeze(0)
        weight = theta_init.permute(0, 2, 1).reshape(B * K, D)  # nn.Linear stores theta^T
        final = unroll(model, {"weight": weight}, d, t.repeat(1, B), log_lr.exp(), batch, loss_fn=half_squared_error)
        theta1 = final["weight"].reshape(B, K, D).permute(0, 2, 1)
        gap = quadratic_loss(theta1, X, Y).mean() - loss_star
        opt.zero_grad()
        gap.backward()
        opt.step()
        sched.step()
        gaps.append(gap.detach())
    return d.detach(), t.detach(), float(log_lr.detach().exp()), torch.stack(gaps)


def expected_gap(X: Tensor, Y: Tensor, d: Tensor, t: Tensor, lr: float, sigma: float = 1.0, samples: int = 2000,
                 generator: torch.Generator | None = None) -> float:
    """Monte-Carlo estimate of E_{theta0 ~ N(0, sigma^2 I)} L(one_step(theta0)) - L(theta*)."""
    theta0 = sigma * torch.randn(samples, X.shape[1], Y.shape[1], generator=generator, dtype=X.dtype)
    loss_star = quadratic_loss(least_squares(X, Y), X, Y)
    return float(quadratic_loss(one_step(theta0, d, t, lr), X, Y).mean() - loss_star)
