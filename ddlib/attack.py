"""The poisoning attack of Wang et al. 2018, sec. 3.7: distilled data that make class K read as T.

Start from networks that are already trained (pre-trained, fixed or random: :mod:`ddlib.pretrained`).
The attacker distils images such that a few GD steps on them make the network classify images of
``attack_class`` K as ``target_class`` T while every other class keeps its accuracy. The outer
objective (sec. 3.7) replaces the classification loss of eq. (2)/(4) by

    L_{K->T}(theta_T) = E_{(x, y) ~ real} CE( f(x; theta_T), y' ),   y' = T if y == K else y,

the cross-entropy on real data whose class-K labels are rewritten to T: the class-K examples pull
toward T, all others keep their own label, so the other classes are protected by the same loss.
:func:`attack_outer_loss` is this objective as an ``outer_loss`` for :func:`ddlib.dd.distill`; the
inner steps are ordinary GD on the distilled images with their own (fixed) labels.

The paper's baseline spends the same budget of images on **real class-K images relabelled T**
(:func:`relabel_baseline`); its step sizes are tuned with the same objective.

Metrics (:func:`attack_metrics`): the **attack success rate** is the fraction of class-K test images
predicted as T; the **other-class accuracy** is the accuracy on every test image not of class K; the
**attacker's accuracy** is the accuracy on all test images against the rewritten labels y' (what the
objective asks for: success and other classes together; the official code's "acc wrt modified labels").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .dd import DistilledSet, OuterLoss
from .train import predict


def check_classes(attack_class: int, target_class: int, num_classes: int) -> tuple[int, int]:
    """ValueError unless K and T are distinct class indices in ``0..num_classes-1``."""
    for name, c in (("attack_class", attack_class), ("target_class", target_class)):
        if isinstance(c, bool) or int(c) != c or not 0 <= int(c) < num_classes:
            raise ValueError(f"{name}={c!r} is not a class index: the dataset has {num_classes} classes "
                             f"(0..{num_classes - 1})")
    if int(attack_class) == int(target_class):
        raise ValueError(f"attack_class and target_class are both {attack_class}: the attack must make class K "
                         f"read as a *different* class T")
    return int(attack_class), int(target_class)


def relabel(y: Tensor, attack_class: int, target_class: int) -> Tensor:
    """``y`` with every ``attack_class`` label replaced by ``target_class`` (y' of the module doc)."""
    return torch.where(y == attack_class, torch.full_like(y, target_class), y)


def attack_outer_loss(attack_class: int, target_class: int, num_classes: int | None = None) -> OuterLoss:
    """L_{K->T} of sec. 3.7 as an ``outer_loss(model, params, x, y)`` for :func:`ddlib.dd.distill`."""
    if num_classes is not None:
        check_classes(attack_class, target_class, num_classes)

    def loss(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, dict(params), (x,)), relabel(y, attack_class, target_class))
    return loss


def relabel_baseline(x_real: Tensor, y_real: Tensor, n_images: int, distill_steps: int, distill_epochs: int,
                     raw_lrs: Tensor, attack_class: int, target_class: int,
                     generator: torch.Generator | None = None) -> DistilledSet:
    """The paper's baseline: ``n_images`` random real images of class K, all labelled T, in the distilled
    set's layout (``distill_steps`` equal batches, replayed ``distill_epochs`` times)."""
    members = torch.nonzero(y_real.cpu() == attack_class).flatten()
    if len(members) < n_images:
        raise ValueError(f"class {attack_class} has {len(members)} training images, fewer than the {n_images} needed")
    idx = members[torch.randperm(len(members), generator=generator)[:n_images]].to(x_real.device)
    y = torch.full((n_images,), int(target_class), dtype=torch.long, device=x_real.device)
    return DistilledSet(x_real[idx].clone(), y, raw_lrs.detach().clone(), distill_steps, distill_epochs,
                        {"baseline": "relabelled_real", "attack_class": attack_class, "target_class": target_class})


@dataclass
class AttackResult:
    """Per-network attack success rates and other-class accuracies (fractions in [0, 1])."""

    success: list[float]
    other_acc: list[float]
    attacker_acc: list[float] = field(default_factory=list)

    @staticmethod
    def _mean_std(v):
        t = torch.tensor(v, dtype=torch.float64)
        return float(t.mean()), float(t.std(unbiased=False)) if len(v) > 1 else 0.0

    @property
    def success_mean_std(self) -> tuple[float, float]:
        return self._mean_std(self.success)

    @property
    def other_mean_std(self) -> tuple[float, float]:
        return self._mean_std(self.other_acc)

    @property
    def attacker_mean_std(self) -> tuple[float, float]:
        return self._mean_std(self.attacker_acc)

    def extend(self, other: "AttackResult") -> None:
        self.success += other.success
        self.other_acc += other.other_acc
        self.attacker_acc += other.attacker_acc

    @property
    def runs(self) -> int:
        return len(self.success)

    def summary(self, digits: int = 3) -> str:
        (s, ss), (o, os_) = self.success_mean_std, self.other_mean_std
        return (f"success {s:.{digits}f} +- {ss:.{digits}f}, other classes {o:.{digits}f} +- {os_:.{digits}f}, "
                f"attacker's accuracy {self.attacker_mean_std[0]:.{digits}f} ({self.runs} nets)")

    def rows(self, **columns) -> list[dict]:
        """Three ``summary.csv`` rows: ``attack_success``, ``other_class_acc`` and ``attacker_acc``."""
        (s, ss), (o, os_), (a, as_) = self.success_mean_std, self.other_mean_std, self.attacker_mean_std
        return [{"metric": "attack_success", "value": s, "std": ss, "runs": self.runs, **columns},
                {"metric": "other_class_acc", "value": o, "std": os_, "runs": self.runs, **columns},
                {"metric": "attacker_acc", "value": a, "std": as_, "runs": self.runs, **columns}]


def attack_metrics(model: nn.Module, params: Mapping[str, Tensor] | None, x_test: Tensor, y_test: Tensor,
                   attack_class: int, target_class: int) -> tuple[float, float, float]:
    """(attack success rate on class-K test images, accuracy on the other classes, accuracy against the
    rewritten labels y') of one network."""
    pred = predict(model, x_test, params).argmax(1)
    k = y_test == attack_class
    success = (pred[k] == target_class).float().mean().item()
    other = (pred[~k] == y_test[~k]).float().mean().item()
    attacker = (pred == relabel(y_test, attack_class, target_class)).float().mean().item()
    return success, other, attacker


def evaluate_attack(distilled: DistilledSet | None, model: nn.Module, inits: Sequence[Mapping[str, Tensor]],
                    x_test: Tensor, y_test: Tensor, attack_class: int, target_class: int,
                    steps: int | None = None) -> AttackResult:
    """Apply the first ``steps`` (default: all) learned steps of ``distilled`` to every network in ``inits``
    and measure :func:`attack_metrics`. ``distilled=None`` measures the networks as they are."""
    result = AttackResult([], [], [])
    for theta0 in inits:
        params = theta0 if distilled is None else apply_steps(distilled, model, theta0, steps)
        s, o, a = attack_metrics(model, params, x_test, y_test, attack_class, target_class)
        result.success.append(s)
        result.other_acc.append(o)
        result.attacker_acc.append(a)
    return result


def apply_steps(distilled: DistilledSet, model: nn.Module, theta0: Mapping[str, Tensor],
                steps: int | None = None) -> dict[str, Tensor]:
    """theta after the first ``steps`` of the distilled set's T learned steps (0: theta0 itself)."""
    from .unroll import unroll

    schedule = distilled.schedule()
    steps = len(schedule) if steps is None else int(steps)
    if not 0 <= steps <= len(schedule):
        raise ValueError(f"steps={steps}: the distilled set has {len(schedule)} steps")
    if steps == 0:
        return dict(theta0)
    with torch.no_grad():
        return unroll(model, theta0, distilled.x, distilled.y, distilled.lrs[:steps], schedule[:steps])
