"""A straightforward MTT distillation iteration, written the way the official MTT code is.

This is the *reference* that ``ddlib.mtt`` / ``ddlib.unroll`` are timed against
(``benchmarks/bench_mtt.py``). It shares no code with ``ddlib.unroll`` or ``ddlib.mtt``:

- every ConvNet weight lives in ONE flat parameter vector; the forward pass is written with
  ``F.conv2d`` / ``F.group_norm`` / ``F.relu`` / ``F.avg_pool2d`` / ``F.linear`` on ``.view`` slices of
  that vector (the "reparametrised module" idea of the official code);
- each student step is ``grad = autograd.grad(ce, flat, create_graph=True)``,
  ``flat = flat - syn_lr * grad``, and the list of every intermediate flat vector is kept;
- the loss is the normalised parameter distance (sum of squares over the number of parameters,
  divided by the same for start vs target), and ``.backward()`` sends its gradient to the images and
  to the learned lr; then SGD (momentum 0.5) updates both.

For the two to compute identical math, the reference takes the same per-step index batches and the
same per-step DSA transform (``ddlib.augment.step_transform``, seeded per step) as ddlib; the
official code draws a new permutation and new augmentation parameters per step from global state.

Layer shapes and the parameter order are those of ``ddlib.models`` ConvNet (depth ``depth``, width
``width``, instance norm = ``GroupNorm(width, width)``, ReLU, 2x2 average pooling, one linear layer),
so :func:`flat_from_params` turns a ddlib params dict into the flat vector.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.reference_dd import split_flat


class FlatConvNet:
    """The MTT ConvNet (conv3x3 -> instance norm -> ReLU -> avgpool2) x depth -> linear, over a flat vector."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 128, depth: int = 3):
        c, h, w = input_shape
        self.width, self.depth = width, depth
        self.shapes: list[tuple[int, ...]] = []
        self.pools: list[bool] = []
        channels = c
        for _ in range(depth):
            self.shapes += [(width, channels, 3, 3), (width,), (width,), (width,)]
            channels = width
            pool = min(h, w) >= 2
            self.pools.append(pool)
            if pool:
                h, w = h // 2, w // 2
        self.shapes += [(num_classes, width * h * w), (num_classes,)]
        self.numel = sum(math.prod(s) for s in self.shapes)

    def views(self, flat: Tensor) -> list[Tensor]:
        return split_flat(flat, self.shapes)

    def forward(self, x: Tensor, flat: Tensor) -> Tensor:
        p = self.views(flat)
        for d in range(self.depth):
            w, b, gamma, beta = p[4 * d:4 * d + 4]
            x = F.conv2d(x, w, b, padding=1)
            x = F.group_norm(x, self.width, gamma, beta, eps=1e-5)
            x = F.relu(x)
            if self.pools[d]:
                x = F.avg_pool2d(x, 2, 2)
        return F.linear(x.flatten(1), p[-2], p[-1])

    __call__ = forward


def flat_from_params(net: FlatConvNet, params: Mapping[str, Tensor]) -> Tensor:
    """A ddlib params dict (``named_parameters`` order) as one flat vector; shapes are checked."""
    tensors = [p.detach() for p in params.values()]
    got = [tuple(p.shape) for p in tensors]
    if got != [tuple(s) for s in net.shapes]:
        raise ValueError(f"parameter shapes {got} differ from the reference ConvNet {net.shapes}")
    return torch.cat([p.reshape(-1) for p in tensors])


def matching_loss(net: FlatConvNet, start: Tensor, target: Tensor, x_syn: Tensor, y_syn: Tensor, syn_lr: Tensor,
                  batches: Sequence[Tensor], transform: Callable[[Tensor, int], Tensor] | None = None) -> Tensor:
    """Unroll ``len(batches)`` student steps from the flat ``start`` and return the normalised distance to ``target``."""
    student = [start.detach().clone().requires_grad_(True)]
    for step, idx in enumerate(batches):
        x = x_syn[idx]
        y = y_syn[idx]
        if transform is not None:
            x = transform(x, step)
        ce = F.cross_entropy(net(x, student[-1]), y)
        grad = torch.autograd.grad(ce, student[-1], create_graph=True)[0]
        student.append(student[-1] - syn_lr * grad)
    n = start.numel()
    param_loss = F.mse_loss(student[-1], target, reduction="sum") / n
    param_dist = F.mse_loss(start, target, reduction="sum") / n
    return param_loss / param_dist


class ReferenceMTT:
    """One distillation iteration = expert draw, unroll, matching loss, backward, SGD on images and lr."""

    def __init__(self, net: FlatConvNet, x_syn: Tensor, y_syn: Tensor, lr_teacher: float, lr_img: float,
                 lr_lr: float, momentum: float = 0.5):
        self.net = net
        self.x_syn = x_syn.detach().clone().requires_grad_(True)
        self.y_syn = y_syn
        self.syn_lr = torch.tensor(float(lr_teacher), dtype=x_syn.dtype, requires_grad=True)
        self.opt_img = torch.optim.SGD([self.x_syn], lr=lr_img, momentum=momentum)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=lr_lr, momentum=momentum)

    def iteration(self, trajectory: Sequence[Mapping[str, Tensor]], start_epoch: int, expert_epochs: int,
                  batches: Sequence[Tensor], transform=None) -> float:
        start = flat_from_params(self.net, trajectory[start_epoch])
        target = flat_from_params(self.net, trajectory[start_epoch + expert_epochs])
        loss = matching_loss(self.net, start, target, self.x_syn, self.y_syn, self.syn_lr, batches, transform)
        self.opt_img.zero_grad()
        self.opt_lr.zero_grad()
        loss.backward()
        self.opt_img.step()
        self.opt_lr.step()
        return float(loss.detach())
