"""MKDT: dataset distillation for self-supervised pre-training via knowledge distillation.

Joshi, Ni, Mirzasoleiman (ICLR 2025). A teacher trained with SSL (:mod:`ddlib.ssl`) gives each real image
a target representation r(x). Students regress those targets with MSE (knowledge distillation, KD);
their per-epoch parameters are expert trajectories stored like MTT's (:mod:`ddlib.buffers`, objective
``"mse"``, the teacher's key in the metadata). Distillation is MTT (:func:`ddlib.mtt.distill`) on the KD
objective, learning the images, their target representations and the student lr, started from the real
images the experts find hardest (highest KD loss). Evaluation: pre-train a fresh encoder on the distilled
(images, targets) by MSE, then fit a linear probe on its frozen features with a fraction of the labels.

This module only adds what MKDT needs on top of those: the checks, the KD experts' spec, the high-loss
selection, the call into MTT, and the pre-train + linear-probe evaluation with its baselines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from . import buffers, mtt
from .data import balanced_subset_indices
from .ssl import Teacher, TeacherMismatchError
from .train import EvalResult


# ----------------------------------------------------------------------------- checks

def check_fraction(name: str, value: float) -> float:
    """``value`` as a float in (0, 1], or a ValueError naming the parameter."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number in (0, 1]") from None
    if not (0.0 < v <= 1.0) or math.isnan(v):
        raise ValueError(f"{name}={value!r} must be in (0, 1] (a fraction of the training set, e.g. 0.02 for 2%)")
    return v


def subset_size(n: int, fraction: float, name: str = "fraction") -> int:
    """round(fraction * n), at least 1."""
    return max(1, int(round(check_fraction(name, fraction) * n)))


def check_head(teacher: Teacher, head_width: int) -> None:
    """The students regress the teacher's representations, so their head must be as wide as them."""
    if int(head_width) != teacher.width:
        raise TeacherMismatchError(
            f"the students' head has {head_width} outputs but the teacher ({teacher.spec.model}, key {teacher.key}) "
            f"gives {teacher.width}-d representations; set the head width to {teacher.width} or use another teacher")


# ----------------------------------------------------------------------------- KD experts

def kd_spec(teacher: Teacher, dataset: str, model: str, input_shape, head_width: int, model_kwargs=None, *,
            lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4, batch_size: int = 256,
            epochs: int = 20, seed: int = 0, augment: str = "none") -> buffers.ExpertSpec:
    """The ExpertSpec of MKDT's KD students (paper: SGD lr 0.1, momentum 0.9, wd 1e-4, 20 epochs)."""
    check_head(teacher, head_width)
    if teacher.spec.dataset != dataset:
        raise TeacherMismatchError(f"the teacher was trained on {teacher.spec.dataset!r}, the students on {dataset!r}")
    return buffers.ExpertSpec(dataset=dataset, model=model, input_shape=tuple(input_shape), num_outputs=int(head_width),
                              model_kwargs=dict(model_kwargs or {}), augment=augment, objective="mse",
                              teacher=teacher.key, lr=lr, momentum=momentum, weight_decay=weight_decay,
                              batch_size=batch_size, epochs=epochs, seed=seed)


def kd_experts(spec: buffers.ExpertSpec, teacher: Teacher, x: Tensor, targets: Tensor, root: str | Path,
               num_experts: int, progress: bool = True) -> buffers.ExpertBuffer:
    """Train (or reuse) the KD experts under ``root`` and return their buffer, checked for this teacher."""
    if spec.objective != "mse" or spec.teacher != teacher.key:
        raise buffers.BufferMismatchError(f"the expert spec names teacher {spec.teacher!r} (objective {spec.objective!r}); "
                                          f"KD experts for this teacher need objective 'mse' and teacher {teacher.key!r}")
    check_head(teacher, spec.num_outputs)
    if targets.shape != (x.shape[0], teacher.width):
        raise ValueError(f"targets must be the teacher's representations, shape ({x.shape[0]}, {teacher.width}); "
                         f"got {tuple(targets.shape)}")
    buf = buffers.ensure_experts(spec, x, targets, root, num_experts, progress=progress)
    return load_kd_buffer(buf.folder, teacher)


def load_kd_buffer(folder: str | Path, teacher: Teacher, **expected) -> buffers.ExpertBuffer:
    """An expert folder, refused (BufferMismatchError) unless it holds KD experts of ``teacher``."""
    return buffers.load_buffer(folder, objective="mse", teacher=teacher.key, num_outputs=teacher.width, **expected)


# ----------------------------------------------------------------------------- high-loss initialisation

@torch.no_grad()
def kd_losses(model: nn.Module, buffer: buffers.ExpertBuffer, epoch: int, x: Tensor, targets: Tensor,
              batch_size: int = 1024) -> Tensor:
    """Per-example KD loss (mean squared error over the target dims) of every expert at ``epoch``,
    averaged over the experts: shape (N,)."""
    total = torch.zeros(x.shape[0], device=x.device)
    was_training = model.training
    model.eval()
    for e in range(len(buffer)):
        params = buffer.params(e, epoch, x.device)
        for i in range(0, x.shape[0], batch_size):
            out = functional_call(model, params, (x[i:i + batch_size],))
            total[i:i + batch_size] += ((out - targets[i:i + batch_size]) ** 2).mean(1)
    model.train(was_training)
    return total / len(buffer)


def high_loss_indices(losses: Tensor, n: int) -> Tensor:
    """Indices of the ``n`` examples with the highest loss (highest first; ties broken by index)."""
    if not 1 <= n <= losses.numel():
        raise ValueError(f"cannot pick {n} of {losses.numel()} examples")
    order = torch.argsort(-losses.detach().cpu().double(), stable=True)
    return order[:n].to(losses.device)


def random_indices(n_total: int, n: int, seed: int = 0) -> Tensor:
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


# ----------------------------------------------------------------------------- distillation

def distill(model: nn.Module, buffer: buffers.ExpertBuffer, teacher: Teacher, x_init: Tensor, targets_init: Tensor,
            cfg: mtt.MTTConfig, **kwargs) -> tuple[mtt.SyntheticSet, mtt.MTTLog]:
    """MTT on the KD objective: :func:`ddlib.mtt.distill` with an MSE inner loss and learned targets."""
    load_kd_buffer(buffer.folder, teacher)
    if targets_init.shape != (x_init.shape[0], teacher.width):
        raise ValueError(f"targets_init must have shape ({x_init.shape[0]}, {teacher.width}); got {tuple(targets_init.shape)}")
    synthetic, log = mtt.distill(model, buffer, x_init, targets_init.float(), cfg, inner_loss=F.mse_loss, **kwargs)
    synthetic.meta.update(teacher=teacher.key, objective="mse")
    return synthetic, log


# ----------------------------------------------------------------------------- evaluation

def pretrain(model: nn.Module, x: Tensor, targets: Tensor, *, epochs: int, lr: float, batch_size: int = 256,
             momentum: float = 0.9, weight_decay: float = 1e-4, generator: torch.Generator | None = None) -> nn.Module:
    """Pre-train ``model`` (encoder + head of the target width) by MSE to ``targets`` on ``x``, in place."""
    if epochs < 1 or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"pretrain needs epochs >= 1 and a positive finite lr (got {epochs}, {lr})")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = x.shape[0]
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator).to(x.device)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.mse_loss(model(x[idx]), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pre-training diverged (loss {float(loss)}); lower the pre-training lr ({lr})")
    return model


@torch.no_grad()
def features(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([model.embed(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    model.train(was_training)
    return out


def linear_probe(f_train: Tensor, y_train: Tensor, f_test: Tensor, y_test: Tensor, num_classes: int, *,
                 steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-4) -> float:
    """Test accuracy of a linear classifier on frozen features (standardised with the labelled set's
    statistics), trained full-batch with Adam on cross-entropy. Deterministic (zero-initialised)."""
    return linear_probes(f_train[None], y_train[None], f_test, y_test, num_classes, steps=steps, lr=lr,
                         weight_decay=weight_decay)[0]


def linear_probes(f_train: Tensor, y_train: Tensor, f_test: Tensor, y_test: Tensor, num_classes: int, *,
                  steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-4) -> list[float]:
    """:func:`linear_probe` for P labelled sets at once: ``f_train`` (P, n, d), ``y_train`` (P, n), one test set.

    The P probes are independent (each its own standardisation, weights and Adam state) and trained in one
    batched loop: the summed loss gives each probe exactly its own gradient, and Adam acts elementwise, so
    this is P separate probes for little more than the time of one (a step's time is mostly fixed overhead:
    5 probes of 67 examples cost 1.4x one here, not 5x).
    """
    if f_train.ndim != 3 or y_train.shape != f_train.shape[:2]:
        raise ValueError(f"linear_probes wants features (P, n, d) and labels (P, n); got {tuple(f_train.shape)} "
                         f"and {tuple(y_train.shape)}")
    n = f_train.shape[1]
    mean, std = f_train.mean(1, keepdim=True), f_train.std(1, unbiased=False, keepdim=True) + 1e-6
    a, b = (f_train - mean) / std, (f_test[None] - mean) / std
    with torch.enable_grad():
        w = torch.zeros(a.shape[0], a.shape[2], num_classes, device=a.device, requires_grad=True)
        bias = torch.zeros(a.shape[0], 1, num_classes, device=a.device, requires_grad=True)
        opt = torch.optim.Adam([w, bias], lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            logits = torch.baddbmm(bias, a, w).reshape(-1, num_classes)
            loss = F.cross_entropy(logits, y_train.reshape(-1), reduction="sum") / n  # sum over probes of each mean
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        correct = torch.baddbmm(bias, b, w).argmax(2) == y_test[None]
    return correct.float().mean(1).tolist()


def labelled_indices(y: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """A class-balanced ``fraction`` of the labelled training set (at least one example per class)."""
    k = int(y.max()) + 1
    n = max(k, subset_size(len(y), check_fraction("label_fraction", fraction)))
    return balanced_subset_indices(y, n, seed=seed).to(y.device)


def label_draw_seed(seed: int, draw: int) -> int:
    """Seed of the ``draw``-th labelled subset for evaluation seed ``seed`` (draw 0 is ``seed`` itself)."""
    return seed + 100_003 * draw


def probe_accuracy(f_train: Tensor, y_train: Tensor, f_test: Tensor, y_test: Tensor, fraction: float, seed: int, *,
                   label_draws: int = 1, steps: int = 300) -> float:
    """Linear-probe test accuracy with a ``fraction`` of the labels, averaged over ``label_draws`` class-balanced
    labelled subsets. With 1% of a small training set the probe sees about one image per class, and which image
    it sees moves its accuracy by several points; the draws average that out without training more encoders."""
    if label_draws < 1:
        raise ValueError(f"label_draws={label_draws} must be >= 1")
    num_classes = int(y_train.max()) + 1
    idx = torch.stack([labelled_indices(y_train, fraction, label_draw_seed(seed, d)) for d in range(label_draws)])
    accs = linear_probes(f_train[idx], y_train[idx], f_test, y_test, num_classes, steps=steps)
    return sum(accs) / len(accs)


@dataclass
class Pretraining:
    """What to pre-train on: images, MSE targets, the SGD lr and mini-batch size (no images: no pre-training;
    ``batch_size`` None: the evaluation's default)."""

    name: str
    x: Tensor | None = None
    targets: Tensor | None = None
    lr: float = 0.1
    batch_size: int | None = None


@dataclass
class ProbeResults:
    """Linear-probe test accuracy per label fraction, one value per seed."""

    accs: dict = field(default_factory=dict)     # fraction -> EvalResult

    def summary(self, fraction: float, digits: int = 3) -> str:
        r = self.accs[fraction]
        return f"{r.mean:.{digits}f} +- {r.std:.{digits}f}"


@dataclass
class ProbeSet:
    """Labelled data for the linear probe (the training set itself, or a transfer dataset of the same input
    shape) and the evaluation seeds, i.e. encoders, to probe it on."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    seeds: Sequence[int]


def evaluate_pretraining_on(runs: Sequence[Pretraining], make_model: Callable[[], nn.Module],
                            probe_sets: Sequence[ProbeSet], label_fractions: Sequence[float], *, epochs: int = 20,
                            batch_size: int = 256, weight_decay: float = 1e-4, probe_steps: int = 300,
                            label_draws: int = 1) -> list[dict[str, ProbeResults]]:
    """For every seed and run: a fresh encoder (``make_model()`` right after ``torch.manual_seed(seed)``, so
    every run starts from the same weights) pre-trained on the run's set, then a linear probe per label
    fraction on every probe set that lists the seed (the same ``label_draws`` labelled subsets of each seed for
    every run, accuracy averaged over them). Each encoder is pre-trained once however many sets probe it: a
    transfer probe reads the very encoders of the main evaluation. Mean and std over seeds, paired by seed
    between runs. Returns one ``{run name: ProbeResults}`` per probe set, in order."""
    fractions = [check_fraction("label_fraction", f) for f in label_fractions]
    if not probe_sets or any(not p.seeds for p in probe_sets):
        raise ValueError("evaluate_pretraining needs at least one probe set, each with at least one seed")
    if label_draws < 1:
        raise ValueError(f"label_draws={label_draws} must be >= 1")
    out = [{r.name: ProbeResults({f: EvalResult() for f in fractions}) for r in runs} for _ in probe_sets]
    seeds = list(dict.fromkeys(s for p in probe_sets for s in p.seeds))  # every seed once, in first-listed order
    device = probe_sets[0].x_train.device
    for seed in seeds:
        for r in runs:
            torch.manual_seed(seed)
            model = make_model().to(device)
            if r.x is not None:
                pretrain(model, r.x, r.targets, epochs=epochs, lr=float(r.lr), batch_size=r.batch_size or batch_size,
                         weight_decay=weight_decay, generator=torch.Generator().manual_seed(seed + 17))
            for p, results in zip(probe_sets, out):
                if seed not in p.seeds:
                    continue
                f_train, f_test = features(model, p.x_train), features(model, p.x_test)
                for f in fractions:
                    results[r.name].accs[f].accs.append(probe_accuracy(f_train, p.y_train, f_test, p.y_test, f, seed,
                                                                       label_draws=label_draws, steps=probe_steps))
    return out


def evaluate_pretraining(runs: Sequence[Pretraining], make_model: Callable[[], nn.Module], x_train: Tensor,
                         y_train: Tensor, x_test: Tensor, y_test: Tensor, label_fractions: Sequence[float],
                         seeds: Sequence[int], **kwargs) -> dict[str, ProbeResults]:
    """:func:`evaluate_pretraining_on` with the one probe set (x_train, y_train, x_test, y_test) on ``seeds``."""
    return evaluate_pretraining_on(runs, make_model, [ProbeSet("main", x_train, y_train, x_test, y_test, seeds)],
                                   label_fractions, **kwargs)[0]


def trajectory_probe(model: nn.Module, buffer: buffers.ExpertBuffer, x_train: Tensor, y_train: Tensor,
                     x_test: Tensor, y_test: Tensor, label_fractions: Sequence[float], seeds: Sequence[int], *,
                     epochs: Sequence[int] | None = None, label_draws: int = 1,
                     probe_steps: int = 300) -> dict[float, list[EvalResult]]:
    """What the expert trajectories are worth downstream: the linear probe on the experts' own encoders.

    For every stored epoch (or ``epochs``) and every expert, the probe accuracy on that checkpoint's frozen
    features (averaged over ``seeds`` x ``label_draws`` labelled subsets, as :func:`evaluate_pretraining`).
    Returns ``{fraction: [EvalResult over experts, one per epoch]}``. MTT trains the distilled set to carry a
    network from checkpoint t to t + M: the checkpoints inside the matched window are what pre-training on the
    distilled set imitates, and where they probe no better than the random init, it has little to give
    (Joshi et al. 2025 match the first epochs).
    """
    fractions = [check_fraction("label_fraction", f) for f in label_fractions]
    epochs = list(range(buffer.epochs + 1)) if epochs is None else [int(e) for e in epochs]
    if not seeds or any(not 0 <= e <= buffer.epochs for e in epochs):
        raise ValueError(f"trajectory_probe needs seeds and epochs in 0..{buffer.epochs}; got {list(seeds)}, {epochs}")
    out = {f: [EvalResult() for _ in epochs] for f in fractions}
    own = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k in range(len(buffer)):
        for j, e in enumerate(epochs):
            _set_parameters(model, buffer.params(k, e, x_train.device))
            f_train, f_test = features(model, x_train), features(model, x_test)
            for f in fractions:
                accs = [probe_accuracy(f_train, y_train, f_test, y_test, f, s, label_draws=label_draws,
                                       steps=probe_steps) for s in seeds]
                out[f][j].accs.append(sum(accs) / len(accs))
    _set_parameters(model, own)
    return out


@torch.no_grad()
def _set_parameters(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    for name, p in model.named_parameters():
        p.copy_(params[name])


def mean_accs(results: Mapping[str, ProbeResults], fraction: float) -> dict[str, float]:
    return {name: r.accs[fraction].mean for name, r in results.items()}
