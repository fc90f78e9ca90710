"""Ordinary training, test accuracy, and the evaluation protocol every notebook uses.

The protocol (Wang et al. 2018, sec. 4; Cazenavette et al. 2022, sec. 4): train K freshly
initialised networks on the (synthetic) training set, measure each one's test accuracy, and
report the mean and the standard deviation over the K networks (population std, ddof=0, as
the papers' code does). Network k is initialised from ``seed + k``, so two methods evaluated
with the same seed are trained from the same K initialisations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy for class indices (int) or per-class probabilities/logits (float)."""
    if target.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(logits, target)
    return -(target.softmax(1) * logits.log_softmax(1)).sum(1).mean()


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, params: Mapping[str, Tensor] | None = None,
            batch_size: int = 2048) -> Tensor:
    """Logits of ``model`` (or of ``params`` plugged into it) on ``x``, in eval mode, batched."""
    was_training = model.training
    model.eval()
    outs = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        outs.append(model(xb) if params is None else functional_call(model, dict(params), (xb,)))
    model.train(was_training)
    return torch.cat(outs)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, params: Mapping[str, Tensor] | None = None,
             batch_size: int = 2048) -> float:
    """Fraction of ``x`` classified as ``y`` (a float in [0, 1])."""
    return (predict(model, x, params, batch_size).argmax(1) == y).float().mean().item()


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float, batch_size: int = 256,
                     momentum: float = 0.9, weight_decay: float = 5e-4, decay_at: float | None = 0.5,
                     augment: Callable[[Tensor], Tensor] | None = None,
                     generator: torch.Generator | None = None) -> nn.Module:
    """Mini-batch SGD on (x, y), in place; ``y`` may be class indices or soft labels.

    ``decay_at=0.5`` multiplies the lr by 0.1 half-way through (the MTT evaluation schedule).
    ``augment`` maps a batch to an augmented batch (e.g. differentiable siamese augmentation).
    """
    if epochs < 1 or lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"train_classifier needs epochs >= 1 and a positive finite lr (got {epochs}, {lr})")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = x.shape[0]
    model.train()
    for epoch in range(epochs):
        if decay_at is not None and epoch == int(epochs * decay_at) and epoch > 0:
            for group in opt.param_groups:
                group["lr"] = lr * 0.1
        perm = torch.randperm(n, generator=generator).to(x.device)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb = x[idx] if augment is None else augment(x[idx])
            loss = soft_cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


@dataclass
class EvalResult:
    """Accuracies of K independently initialised networks."""

    accs: list[float] = field(default_factory=list)

    @property
    def runs(self) -> int:
        return len(self.accs)

    @property
    def mean(self) -> float:
        return sum(self.accs) / len(self.accs)

    @property
    def std(self) -> float:
        m = self.mean
        return math.sqrt(sum((a - m) ** 2 for a in self.accs) / len(self.accs))

    def summary(self, digits: int = 3) -> str:
        """``"0.912 +- 0.004 (5 nets)"``: the rounded line notebooks print (and nbval checks)."""
        return f"{self.mean:.{digits}f} +- {self.std:.{digits}f} ({self.runs} nets)"

    def row(self, **columns) -> dict:
        """A ``summary.csv`` row: accuracy mean, std and number of runs plus the given columns."""
        return {"metric": "test_acc", "value": self.mean, "std": self.std, "runs": self.runs, **columns}


FitFn = Callable[[nn.Module, int], "Mapping[str, Tensor] | None"]


def evaluate_protocol(make_model: Callable[[], nn.Module], fit: FitFn, x_test: Tensor, y_test: Tensor,
                      num_nets: int = 5, seed: int = 0) -> EvalResult:
    """Train ``num_nets`` fresh networks with ``fit`` and measure each one's test accuracy.

    ``make_model()`` builds a network; it is called right after seeding torch with ``seed + k``,
    so the k-th initialisation is the same for every method. ``fit(model, k)`` trains it, either in
    place (return ``None``) or functionally (return the trained params dict, as the unrolled
    learners of DD do).
    """
    if num_nets < 1:
        raise ValueError(f"num_nets={num_nets} must be >= 1")
    result = EvalResult()
    for k in range(num_nets):
        torch.manual_seed(seed + k)
        model = make_model().to(x_test.device)
        params = fit(model, k)
        result.accs.append(accuracy(model, x_test, y_test, params))
    return result
