"""The unroll is the hot path of DD, MTT and MKDT: check it against independent computations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddlib.unroll import dd_schedule, init_params, minibatch_schedule, unroll


def _tiny_net(seed=0):
    torch.manual_seed(seed)
    # tanh (smooth) so that finite differences are accurate; a conv layer exercises image inputs.
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).double()


def _problem(steps=3, epochs=2, per_step=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = _tiny_net(seed)
    x_syn = torch.randn(steps * per_step, 1, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y_syn = torch.randint(0, 4, (steps * per_step,), generator=g)
    lrs = torch.full((steps * epochs,), 0.3, dtype=torch.float64).requires_grad_(True)
    x_real = torch.randn(16, 1, 6, 6, generator=g, dtype=torch.float64)
    y_real = torch.randint(0, 4, (16,), generator=g)
    batches = dd_schedule(steps, epochs, per_step)
    return model, x_syn, y_syn, lrs, x_real, y_real, batches


def _outer_loss(model, params, x_real, y_real):
    return F.cross_entropy(torch.func.functional_call(model, params, (x_real,)), y_real)


@pytest.mark.parametrize("mode", ["full", "lowmem"])
def test_gradient_matches_finite_differences(mode):
    model, x_syn, y_syn, lrs, x_real, y_real, batches = _problem()
    theta0 = init_params(model)

    def f(x, lr):
        return _outer_loss(model, unroll(model, theta0, x, y_syn, lr, batches, mode=mode), x_real, y_real)

    loss = f(x_syn, lrs)
    gx, glr = torch.autograd.grad(loss, (x_syn, lrs))
    g = torch.Generator().manual_seed(1)
    eps = 1e-6
    with torch.no_grad():
        for _ in range(3):  # random directions: a directional derivative checks every coordinate at once
            dx = torch.randn(x_syn.shape, generator=g, dtype=torch.float64)
            dlr = torch.randn(lrs.shape, generator=g, dtype=torch.float64) * 0.01
            fd = (f(x_syn + eps * dx, lrs + eps * dlr) - f(x_syn - eps * dx, lrs - eps * dlr)) / (2 * eps)
            analytic = (gx * dx).sum() + (glr * dlr).sum()
            assert torch.allclose(analytic, fd, rtol=1e-5, atol=1e-9), (analytic.item(), fd.item())


def test_lowmem_equals_full_including_soft_labels_and_theta0():
    model, x_syn, _, lrs, x_real, y_real, batches = _problem(steps=4, epochs=3)
    y_soft = torch.softmax(torch.randn(x_syn.shape[0], 4, dtype=torch.float64), 1).requires_grad_(True)
    theta0 = init_params(model, requires_grad=True)
    grads = {}
    for mode in ("full", "lowmem"):
        final = unroll(model, theta0, x_syn, y_soft, lrs, batches, mode=mode)
        loss = _outer_loss(model, final, x_real, y_real)
        grads[mode] = torch.autograd.grad(loss, (x_syn, y_soft, lrs, *theta0.values()))
        grads[mode + "_loss"] = loss.detach()
    assert torch.allclose(grads["full_loss"], grads["lowmem_loss"], rtol=0, atol=1e-12)
    for a, b in zip(grads["full"], grads["lowmem"]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_scalar_lr_with_minibatches_and_transform():
    """MTT-style: one learned lr, random synthetic mini-batches, a step-seeded augmentation."""
    model, x_syn, y_syn, _, x_real, y_real, _ = _problem(steps=3, epochs=1, per_step=4)
    lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    batches = minibatch_schedule(x_syn.shape[0], 5, steps=6, generator=torch.Generator().manual_seed(0))

    def flip_some(x, step):  # deterministic given the step index, as the low-memory mode requires
        return x.flip(-1) if step % 2 else x * 1.1

    out = {}
    for mode in ("full", "lowmem"):
        final = unroll(model, init_params(model), x_syn, y_syn, lr, batches, mode=mode, transform=flip_some)
        out[mode] = torch.autograd.grad(_outer_loss(model, final, x_real, y_real), (x_syn, lr))
    for a, b in zip(out["full"], out["lowmem"]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert out["full"][1].abs() > 0


def test_no_graph_evaluation_equals_manual_sgd():
    """Without grad, unroll is plain SGD: compare with torch.optim.SGD on the same module."""
    model, x_syn, y_syn, lrs, *_ , batches = _problem(steps=2, epochs=2)
    with torch.no_grad():
        final = unroll(model, init_params(model), x_syn, y_syn, lrs, batches)
    ref = _tiny_net(0)
    for t, idx in enumerate(batches):
        opt = torch.optim.SGD(ref.parameters(), lr=float(lrs[t].detach()))
        opt.zero_grad()
        F.cross_entropy(ref(x_syn.detach()[idx]), y_syn[idx]).backward()
        opt.step()
    for name, p in ref.named_parameters():
        assert torch.allclose(final[name], p.detach(), atol=1e-12)
        assert not final[name].requires_grad


def test_schedules_and_bad_input():
    b = dd_schedule(3, 2, 5)
    assert len(b) == 6 and torch.equal(b[4], torch.arange(5, 10))
    mb = minibatch_schedule(10, 4, steps=5, generator=torch.Generator().manual_seed(0))
    assert all(len(i) == 4 for i in mb)
    # the first two batches of a permutation never repeat an index
    assert len(set(torch.cat(mb[:2]).tolist())) == 8
    with pytest.raises(ValueError, match="distill_steps"):
        dd_schedule(0, 1, 5)
    with pytest.raises(ValueError, match="batch_size"):
        dd_schedule(1, 1, 0)
    model, x_syn, y_syn, lrs, *_ = _problem()
    with pytest.raises(ValueError, match="mode"):
        unroll(model, init_params(model), x_syn, y_syn, lrs, dd_schedule(3, 2, 4), mode="tesla")
    with pytest.raises(ValueError, match="lrs has shape"):
        unroll(model, init_params(model), x_syn, y_syn, lrs[:2], dd_schedule(3, 2, 4))


def test_lowmem_memory_is_flat_in_steps():
    """Bytes the autograd graph still holds after the unroll: full grows with T, lowmem stays flat."""
    import gc
    import weakref

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10))
    x_syn = torch.randn(100, 1, 8, 8, requires_grad=True)
    y_syn = torch.randint(0, 10, (100,))

    def retained_bytes(mode, steps):
        saved = []

        def pack(t):
            saved.append(weakref.ref(t))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            final = unroll(model, init_params(model), x_syn, y_syn, torch.tensor(0.1), [torch.arange(100)] * steps,
                           mode=mode)
        gc.collect()
        alive = {id(t): t for t in (r() for r in saved) if t is not None}
        del final
        return sum(t.numel() * t.element_size() for t in alive.values())

    full_10, full_40 = retained_bytes("full", 10), retained_bytes("full", 40)
    low_10, low_40 = retained_bytes("lowmem", 10), retained_bytes("lowmem", 40)
    assert full_40 > 3.5 * full_10          # the full graph grows linearly with the number of steps
    assert low_40 <= 1.1 * low_10 + 1024    # the low-memory graph holds no per-step activations
    assert low_40 < 0.1 * full_40


def test_cpu_conv_backend_switch_is_scoped_and_exact():
    """Small-channel convnets run their ddlib-driven steps on the native kernels; the global
    oneDNN setting is untouched afterwards, and gradients match the oneDNN path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x_syn = torch.randn(6, 1, 6, 6, requires_grad=True)
    y_syn = torch.arange(6) % 3
    x_real, y_real = torch.randn(8, 1, 6, 6), torch.arange(8) % 3
    batches = dd_schedule(2, 2, 3)
    lrs = torch.full((4,), 0.1, requires_grad=True)
    grads = {}
    before = torch.backends.mkldnn.enabled
    for mode in ("full", "lowmem"):
        final = unroll(model, init_params(model), x_syn, y_syn, lrs, batches, mode=mode)
        grads[mode] = torch.autograd.grad(_outer_loss(model, final, x_real, y_real), (x_syn, lrs))
        assert torch.backends.mkldnn.enabled == before
    for a, b in zip(grads["full"], grads["lowmem"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
