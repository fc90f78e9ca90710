"""The differentiable SGD inner loop shared by every distillation method.

Dataset distillation (Wang et al. 2018, eq. 2 and sec. 3.5), MTT (Cazenavette et al. 2022,
eq. 1-2) and MKDT (Joshi et al. 2025) all differentiate through the same computation::

    theta_{t+1} = theta_t - lr_t * grad_theta  loss( f(x_syn[b_t]; theta_t), y_syn[b_t] ),   t = 0..T-1

and then score the final parameters theta_T (loss on real data for DD, distance to an expert
checkpoint for MTT / MKDT). :func:`unroll` runs these T steps on a params dict through
``torch.func.functional_call`` and returns theta_T, differentiable with respect to ``x_syn``,
``y_syn`` (soft labels or regression targets), the learned step sizes ``lrs`` and theta_0.

Two exact memory modes, one algorithm:

``"full"``
    One autograd graph over all T steps (``create_graph=True`` at every step). Memory grows
    linearly with T because every step's activations and gradient graph are kept.

``"lowmem"``
    Keeps only theta_0 .. theta_{T-1} (parameters, not activations). The backward pass walks
    the steps in reverse, recomputes step t from the stored theta_t and back-propagates the
    incoming gradient through that one step (a Hessian-vector product). Activation memory is
    flat in T; what grows is the parameter history, T x |theta| numbers
    (:func:`lowmem_history_bytes`), for about one extra forward/backward per step. Gradients equal the full mode's up to
    floating-point reassociation (tested against it and against finite differences).

CPU convolution backend: on CPU, oneDNN (mkldnn) convolutions carry a fixed per-call overhead that
dominates for the tiny per-step batches of an unroll through a network with few channels (LeNet:
6 and 16), while the native kernels are faster there; for wide networks (the 128-channel ConvNet)
oneDNN stays much faster. When every convolution of ``model`` has at most
:data:`NATIVE_CONV_MAX_CHANNELS` channels, the steps that ddlib itself drives run with oneDNN
disabled inside a ``with`` block that restores the setting on exit (also on error): the graph-free steps of an evaluation and, in ``"lowmem"`` mode, the forward pass and
the recomputation in the backward pass (about 10% faster per LeNet outer iteration, benchmarks/).
The ``"full"`` mode's backward is run by the caller's ``backward()``, so it keeps the caller's
setting. Both kernels compute the same convolution (results agree to float rounding).

For the low-memory mode to be exact, step t must be a deterministic function of theta_t:
models with dropout are not supported, and a ``transform`` (differentiable augmentation)
must draw its randomness from the step index it is given.
"""

from __future__ import annotations

import contextlib

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

MODES = ("full", "lowmem")

# Largest channel count (in or out) of every Conv in a model for which the CPU unroll steps run on the
# native convolution kernels instead of oneDNN (module docstring). 0 disables the switch.
NATIVE_CONV_MAX_CHANNELS = 16

LossFn = Callable[[Tensor, Tensor], Tensor]
Transform = Callable[[Tensor, int], Tensor]


# ----------------------------------------------------------------------------- schedules

def dd_schedule(distill_steps: int, distill_epochs: int, batch_size: int, device=None) -> list[Tensor]:
    """Wang et al. 2018, sec. 3.5: ``distill_steps`` distinct batches, replayed ``distill_epochs`` times.

    ``x_syn`` is stored flat with shape (distill_steps * batch_size, ...): step s of every epoch
    uses rows ``s*batch_size .. (s+1)*batch_size``. Returns T = steps*epochs index tensors.
    """
    if distill_steps < 1 or distill_epochs < 1:
        raise ValueError(f"distill_steps={distill_steps} and distill_epochs={distill_epochs} must both be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1 (images per class x classes)")
    blocks = [torch.arange(s * batch_size, (s + 1) * batch_size, device=device) for s in range(distill_steps)]
    return [blocks[s] for _ in range(distill_epochs) for s in range(distill_steps)]


def minibatch_schedule(n: int, batch_size: int | None, steps: int, generator: torch.Generator | None = None,
                       device=None) -> list[Tensor]:
    """MTT's synthetic mini-batches: walk through random permutations of the n images.

    ``batch_size=None`` (or >= n) uses all n images at every step.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if batch_size is None or batch_size >= n:
        full = torch.arange(n, device=device)
        return [full] * steps
    out: list[Tensor] = []
    perm = torch.randperm(n, generator=generator)
    pos = 0
    while len(out) < steps:
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        out.append(perm[pos:pos + batch_size].to(device))
        pos += batch_size
    return out


# ----------------------------------------------------------------------------- CPU conv backend

def _prefer_native_conv(model: nn.Module, x_syn: Tensor) -> bool:
    """True on CPU when oneDNN is on and all of the model's convolutions are small (module docstring)."""
    if x_syn.device.type != "cpu" or NATIVE_CONV_MAX_CHANNELS <= 0 or not torch.backends.mkldnn.enabled:
        return False
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return bool(convs) and max(max(c.in_channels, c.out_channels) for c in convs) <= NATIVE_CONV_MAX_CHANNELS


@contextlib.contextmanager
def _conv_backend(native: bool):
    """oneDNN off inside the block when ``native`` (module docstring); the previous setting comes back
    on exit, also on error. (``torch.backends.mkldnn.flags`` would do the same but warns about TF32.)"""
    if not native:
        yield
        return
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


# ----------------------------------------------------------------------------- one step

def _step(model: nn.Module, names: Sequence[str], params: Sequence[Tensor], x: Tensor, y: Tensor,
          lr: Tensor, loss_fn: LossFn, create_graph: bool) -> list[Tensor]:
    """theta - lr * grad loss(f(x; theta), y). ``params`` must require grad."""
    out = functional_call(model, dict(zip(names, params)), (x,))
    loss = loss_fn(out, y)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return [p - lr * g for p, g in zip(params, grads)]


def _lr_at(lrs: Tensor, t: int) -> Tensor:
    return lrs if lrs.ndim == 0 else lrs[t]


def _batch(x_syn: Tensor, y_syn: Tensor, idx: Tensor, t: int, transform: Transform | None):
    x, y = x_syn.index_select(0, idx), y_syn.index_select(0, idx)
    return (transform(x, t) if transform is not None else x), y


# ----------------------------------------------------------------------------- the unroll

def unroll(model: nn.Module, params: Mapping[str, Tensor], x_syn: Tensor, y_syn: Tensor, lrs: Tensor,
           batches: Sequence[Tensor], loss_fn: LossFn = F.cross_entropy, mode: str = "full",
           transform: Transform | None = None) -> dict[str, Tensor]:
    """Run ``len(batches)`` differentiable SGD steps from ``params`` on the synthetic set.

    Args:
        model: defines the architecture; its own parameters are ignored (buffers are used).
        params: theta_0 as ``{name: tensor}`` (e.g. ``dict(model.named_parameters())``).
        x_syn, y_syn: the synthetic set; ``y_syn`` holds class indices, soft labels or targets.
        lrs: a scalar step size or one per step (shape ``(len(batches),)``).
        batches: index tensors into ``x_syn`` per step (see :func:`dd_schedule`,
            :func:`minibatch_schedule`).
        loss_fn: inner loss ``loss_fn(model_output, y_batch)``.
        mode: ``"full"`` or ``"lowmem"`` (module docstring); both return the same values and
            gradients.
        transform: optional ``transform(x_batch, step)`` applied before the forward pass.

    Returns theta_T as a dict. When nothing requires grad (evaluation), steps run without
    building a graph.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; use one of {MODES}")
    if len(batches) < 1:
        raise ValueError("unroll needs at least one step (batches is empty)")
    lrs = torch.as_tensor(lrs, dtype=x_syn.dtype, device=x_syn.device)
    if lrs.ndim > 1 or (lrs.ndim == 1 and lrs.numel() != len(batches)):
        raise ValueError(f"lrs has shape {tuple(lrs.shape)}; expected a scalar or ({len(batches)},)")
    names = list(params.keys())
    theta0 = [params[n] for n in names]
    needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (x_syn, y_syn, lrs, *theta0))

    native = _prefer_native_conv(model, x_syn)

    if not needs_graph:
        with _conv_backend(native):
            final = _unroll_no_graph(model, names, theta0, x_syn, y_syn, lrs, batches, loss_fn, transform,
                                     keep=False)[0]
    elif mode == "full":
        final = _unroll_full(model, names, theta0, x_syn, y_syn, lrs, batches, loss_fn, transform)
    else:
        final = _LowMemUnroll.apply((model, names, batches, loss_fn, transform, native), x_syn, y_syn, lrs, *theta0)
    return dict(zip(names, final))


def _unroll_full(model, names, theta0, x_syn, y_syn, lrs, batches, loss_fn, transform) -> list[Tensor]:
    # A leaf theta_0 that does not require grad still needs grad for torch.autograd.grad.
    params = [p if p.requires_grad else p.detach().requires_grad_(True) for p in theta0]
    for t, idx in enumerate(batches):
        x, y = _batch(x_syn, y_syn, idx, t, transform)
        params = _step(model, names, params, x, y, _lr_at(lrs, t), loss_fn, create_graph=True)
    return params


def _unroll_no_graph(model, names, theta0, x_syn, y_syn, lrs, batches, loss_fn, transform, keep: bool):
    """Plain SGD on detached tensors; optionally keep theta_0..theta_{T-1} for the low-memory backward."""
    x_syn, y_syn, lrs = x_syn.detach(), y_syn.detach(), lrs.detach()
    params = [p.detach() for p in theta0]
    history: list[list[Tensor]] = []
    for t, idx in enumerate(batches):
        if keep:
            history.append(params)
        with torch.enable_grad():
            leaves = [p.requires_grad_(True) for p in (q.detach() for q in params)]
            x, y = _batch(x_syn, y_syn, idx, t, transform)
            new = _step(model, names, leaves, x, y, _lr_at(lrs, t), loss_fn, create_graph=False)
        params = [p.detach() for p in new]
    return params, history


class _LowMemUnroll(torch.autograd.Function):
    """Exact reverse-mode through the unroll with O(T * |theta|) memory instead of O(T * activations).

    Backward for step t (theta' = theta - lr * g(theta, x)), given v = dL/dtheta':
        dL/dtheta = v - lr * H v,   dL/dx = -lr * (d g / d x)^T v,   dL/dlr = -<g, v>
    all obtained from one vector-Jacobian product through a recomputed step.
    """

    @staticmethod
    def forward(ctx, plan, x_syn, y_syn, lrs, *theta0):
        model, names, batches, loss_fn, transform, native = plan
        with _conv_backend(native):
            final, history = _unroll_no_graph(model, names, theta0, x_syn, y_syn, lrs, batches, loss_fn, transform,
                                              keep=True)
        ctx.plan = plan
        ctx.history = history
        ctx.save_for_backward(x_syn, y_syn, lrs)
        ctx.theta_needs_grad = [p.requires_grad for p in theta0]
        return tuple(final)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_final):
        with _conv_backend(ctx.plan[-1]):
            return _LowMemUnroll._backward(ctx, grad_final)

    @staticmethod
    def _backward(ctx, grad_final):
        model, names, batches, loss_fn, transform, _ = ctx.plan
        x_syn, y_syn, lrs = ctx.saved_tensors
        want_x, want_y, want_lr = ctx.needs_input_grad[1:4]
        gx = torch.zeros_like(x_syn) if want_x else None
        gy = torch.zeros_like(y_syn) if want_y else None
        glr = torch.zeros_like(lrs) if want_lr else None
        v = [torch.zeros_like(p) if g is None else g for g, p in zip(grad_final, ctx.history[-1])]
        for t in range(len(batches) - 1, -1, -1):
            idx = batches[t]
            with torch.enable_grad():
                theta_t = [p.detach().requires_grad_(True) for p in ctx.history[t]]
                x_b = x_syn.index_select(0, idx).detach().requires_grad_(want_x)
                y_b = y_syn.index_select(0, idx).detach().requires_grad_(want_y)
                lr_t = _lr_at(lrs, t).detach().requires_grad_(want_lr)
                x_in = transform(x_b, t) if transform is not None else x_b
                new = _step(model, names, theta_t, x_in, y_b, lr_t, loss_fn, create_graph=True)
                # dL/dtheta_0 is only needed when theta_0 itself requires grad: skip its Hessian-vector product
                need_theta = t > 0 or any(ctx.theta_needs_grad)
                inputs = (theta_t if need_theta else []) + [
                    z for z, w in ((x_b, want_x), (y_b, want_y), (lr_t, want_lr)) if w]
                grads = torch.autograd.grad(new, inputs, grad_outputs=v, allow_unused=True)
            ctx.history[t] = None  # theta_t is no longer needed
            n = len(theta_t) if need_theta else 0
            if need_theta:
                v = [torch.zeros_like(p) if g is None else g for g, p in zip(grads[:n], theta_t)]
            rest = list(grads[n:])
            if want_x:
                g = rest.pop(0)
                if g is not None:
                    gx.index_add_(0, idx, g)
            if want_y:
                g = rest.pop(0)
                if g is not None:
                    gy.index_add_(0, idx, g)
            if want_lr:
                g = rest.pop(0)
                if g is not None:
                    if glr.ndim == 0:
                        glr += g
                    else:
                        glr[t] += g
        ctx.history = None  # free the stored parameters as soon as possible
        gtheta = [g if need else None for g, need in zip(v, ctx.theta_needs_grad)]
        return (None, gx, gy, glr, *gtheta)


def lowmem_history_bytes(final: Mapping[str, Tensor]) -> int:
    """Bytes of the parameter history theta_0..theta_{T-1} held for a ``"lowmem"`` unroll's backward.

    ``final`` is what :func:`unroll` returned; 0 for the full mode (whose memory is in the graph).
    """
    node = next(iter(final.values())).grad_fn
    history = getattr(node, "history", None) or []
    return sum(p.numel() * p.element_size() for step in history for p in step)


def init_params(model: nn.Module, requires_grad: bool = False) -> dict[str, Tensor]:
    """A detached copy of the module's parameters as a params dict for :func:`unroll`."""
    return {n: p.detach().clone().requires_grad_(requires_grad) for n, p in model.named_parameters()}
