"""A straightforward Dataset Distillation outer iteration, written the way the official DD code is.

This is the *reference* the ddlib unroll is timed against (``benchmarks/bench_dd.py``). It shares
no code with ``ddlib.unroll``:

- every network weight lives in ONE flat parameter vector; the LeNet forward is written with
  ``F.conv2d`` / ``F.relu`` / ``F.max_pool2d`` / ``F.linear`` on ``.view`` slices of that vector
  (the "ReparamModule" idea of the DD code);
- each inner step is ``g = autograd.grad(loss, flat, create_graph=True)``, ``flat = flat - lr_t * g``;
- the outer loss is the cross-entropy of theta_T on a real batch, ``.backward()`` sends the
  gradient to the distilled images and the raw step sizes (lr = softplus(raw), as in the DD code),
  then Adam (betas 0.5, 0.999, as in the DD code) updates both.

The layer shapes and the parameter order are the same as ``ddlib.models`` LeNet for the same input
shape (the paddings follow the same rules, re-derived here), so :func:`flat_from_module` can copy a
ddlib module's weights into the flat vector and both implementations compute identical numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor



def split_flat(flat: Tensor, shapes) -> list[Tensor]:
    """Views of consecutive slices of one flat parameter vector, one per shape (no copies)."""
    out, pos = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[pos:pos + n].view(shape))
        pos += n
    return out

class FlatLeNet:
    """LeNet (conv5x5(6)-relu-pool-conv5x5(16)-relu-pool-fc120-relu-fc84-relu-fc) over a flat vector."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        c, h, w = input_shape
        size = min(h, w)
        self.pad1 = 0 if size >= 32 else 2
        size = size + 2 * self.pad1 - 4
        self.pool1 = size >= 2
        size = size // 2 if self.pool1 else size
        self.pad2 = 0 if size >= 10 else 2
        size = size + 2 * self.pad2 - 4
        self.pool2 = size >= 2
        size = size // 2 if self.pool2 else size
        # non-square inputs: recompute both sides
        hh, ww = h, w
        for pad, pool in ((self.pad1, self.pool1), (self.pad2, self.pool2)):
            hh, ww = hh + 2 * pad - 4, ww + 2 * pad - 4
            if pool:
                hh, ww = hh // 2, ww // 2
        flat = 16 * hh * ww
        self.shapes = [(6, c, 5, 5), (6,), (16, 6, 5, 5), (16,), (120, flat), (120,), (84, 120), (84,),
                       (num_classes, 84), (num_classes,)]
        self.numel = sum(math.prod(s) for s in self.shapes)

    def views(self, flat: Tensor) -> list[Tensor]:
        return split_flat(flat, self.shapes)

    def forward(self, x: Tensor, flat: Tensor) -> Tensor:
        w1, b1, w2, b2, w3, b3, w4, b4, w5, b5 = self.views(flat)
        x = F.relu(F.conv2d(x, w1, b1, padding=self.pad1))
        if self.pool1:
            x = F.max_pool2d(x, 2)
        x = F.relu(F.conv2d(x, w2, b2, padding=self.pad2))
        if self.pool2:
            x = F.max_pool2d(x, 2)
        x = x.flatten(1)
        x = F.relu(F.linear(x, w3, b3))
        x = F.relu(F.linear(x, w4, b4))
        return F.linear(x, w5, b5)

    __call__ = forward


def flat_from_module(net: FlatLeNet, module: torch.nn.Module) -> Tensor:
    """The module's parameters (in ``named_parameters`` order) as one flat vector; shapes are checked."""
    params = [p.detach() for p in module.parameters()]
    got = [tuple(p.shape) for p in params]
    if got != [tuple(s) for s in net.shapes]:
        raise ValueError(f"module parameter shapes {got} differ from the reference LeNet {net.shapes}")
    return torch.cat([p.reshape(-1) for p in params]).clone()


def outer_loss(net: FlatLeNet, flat0: Tensor, x_syn: Tensor, y_syn: Tensor, raw_lrs: Tensor, per_step: int,
               distill_steps: int, distill_epochs: int, x_real: Tensor, y_real: Tensor) -> Tensor:
    """Unroll T = steps x epochs differentiable SGD steps from ``flat0`` and score on real data."""
    flat = flat0.detach().requires_grad_(True)
    lrs = F.softplus(raw_lrs)
    t = 0
    for _ in range(distill_epochs):
        for s in range(distill_steps):
            x = x_syn[s * per_step:(s + 1) * per_step]
            y = y_syn[s * per_step:(s + 1) * per_step]
            loss = F.cross_entropy(net(x, flat), y)
            g, = torch.autograd.grad(loss, flat, create_graph=True)
            flat = flat - lrs[t] * g
            t += 1
    return F.cross_entropy(net(x_real, flat), y_real)


class ReferenceDD:
    """One outer iteration = real batch draw, unroll, outer loss, backward, Adam step (fixed init)."""

    def __init__(self, net: FlatLeNet, flat0: Tensor, x_syn: Tensor, y_syn: Tensor, raw_lrs: Tensor,
                 distill_steps: int, distill_epochs: int, outer_lr: float = 0.01):
        self.net, self.flat0 = net, flat0.detach()
        self.x_syn = x_syn.detach().clone().requires_grad_(True)
        self.raw_lrs = raw_lrs.detach().clone().requires_grad_(True)
        self.y_syn = y_syn
        self.steps, self.epochs = distill_steps, distill_epochs
        self.per_step = x_syn.shape[0] // distill_steps
        self.opt = torch.optim.Adam([self.x_syn, self.raw_lrs], lr=outer_lr, betas=(0.5, 0.999))

    def loss(self, x_real: Tensor, y_real: Tensor) -> Tensor:
        return outer_loss(self.net, self.flat0, self.x_syn, self.y_syn, self.raw_lrs, self.per_step, self.steps,
                          self.epochs, x_real, y_real)

    def iteration(self, x_pool: Tensor, y_pool: Tensor, real_batch: int, generator: torch.Generator) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        idx = torch.randint(x_pool.shape[0], (min(real_batch, x_pool.shape[0]),), generator=generator)
        loss = self.loss(x_pool[idx], y_pool[idx])
        loss.backward()
        self.opt.step()
        return loss.detach()
