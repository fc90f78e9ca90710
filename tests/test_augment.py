"""Differentiable siamese augmentation (ddlib.augment): each op against an independent computation,
seeding, gradients, and the unroll's full == lowmem contract with a step-seeded augmentation."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddlib import augment
from ddlib.augment import (DSA_STRATEGY, OPS, DSAParams, batch_augment, derive_seed, dsa, parse_strategy,
                           step_transform)
from ddlib.unroll import init_params, minibatch_schedule, unroll


def _images(b=6, c=3, h=8, w=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g, dtype=dtype)


def _reference_affine(x, theta_2x2):
    """DSA's definition: F.affine_grid / grid_sample (align_corners=True) with a 2x2 matrix, no kornia."""
    theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype)
    theta[:, :, :2] = theta_2x2
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _shifted(img, dx, dy):
    """Content moved right by dx and down by dy, zeros where nothing lands (pad and slice)."""
    c, h, w = img.shape
    padded = F.pad(img, (abs(dx), abs(dx), abs(dy), abs(dy)))
    return padded[:, abs(dy) - dy:abs(dy) - dy + h, abs(dx) - dx:abs(dx) - dx + w]


# ----------------------------------------------------------------------------- seeding and strategy

def test_same_seed_same_output_and_different_seeds_differ():
    x = _images(b=32)  # large enough that two seeds' random flips of the batch cannot coincide
    outs = [dsa(x, s) for s in range(20)]
    for s, out in enumerate(outs):
        assert torch.equal(out, dsa(x, s))
    for i in range(20):
        for j in range(i + 1, 20):
            assert not torch.equal(outs[i], outs[j]), (i, j)


def test_parameters_do_not_depend_on_dtype_or_content():
    """Every draw comes from the CPU generator, so float32 and float64 (and CPU and CUDA) agree."""
    x = _images()
    for s in range(12):
        assert torch.allclose(dsa(x.float(), s).double(), dsa(x, s), atol=1e-5)
    # the same seed applied to a shifted batch applies the same (linear or affine) transform
    flip_only = dsa(x + 1.0, 3, "flip") - dsa(x, 3, "flip")
    assert torch.allclose(flip_only, torch.ones_like(x))


def test_none_strategy_is_identity_and_unknown_op_is_an_error():
    x = _images()
    for s in ("", "none", "None"):
        assert dsa(x, 0, s) is x
        assert parse_strategy(s) == ()
        assert step_transform(s, 1)(x, 5) is x
        assert batch_augment(s)(x) is x
    assert parse_strategy(DSA_STRATEGY) == ("color", "crop", "cutout", "flip", "scale", "rotate")
    with pytest.raises(ValueError, match="valid ops"):
        dsa(x, 0, "color_blur")
    with pytest.raises(ValueError, match="valid ops"):
        step_transform("crop_zoom")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        dsa(x[0], 0, "flip")


def test_single_op_per_call_picks_one_op_for_the_whole_batch():
    x = _images(b=8).abs() + 1.0  # no zeros, so cutout is visible
    kinds = {"flip": 0, "cutout": 0}
    for s in range(60):
        out = dsa(x, s, "flip_cutout")
        has_zeros = bool((out == 0).any())
        if has_zeros:  # cutout: everything that is not cut equals the input (nothing flipped)
            kinds["cutout"] += 1
            assert torch.equal(out[out != 0], x[out != 0])
        else:  # flip: every sample is itself or its mirror
            kinds["flip"] += 1
            assert all(torch.equal(o, xi) or torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x))
    assert kinds["flip"] > 15 and kinds["cutout"] > 15, kinds
    # DSA mode "M" applies both in one call: some sample is mirrored and cut
    both = dsa(x, 0, "flip_cutout", DSAParams(prob_flip=1.0), single_op=False)
    assert (both == 0).any() and torch.equal(both[both != 0], x.flip(-1)[both != 0])


# ----------------------------------------------------------------------------- each op

def test_flip_mirrors():
    x = _images(b=32)
    assert torch.equal(augment.flip(x, torch.ones(32, dtype=torch.bool)), x.flip(3))
    assert torch.equal(dsa(x, 0, "flip", DSAParams(prob_flip=1.0)), x.flip(3))
    assert torch.equal(dsa(x, 0, "flip", DSAParams(prob_flip=0.0)), x)
    out = dsa(x, 0, "flip")
    mirrored = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    assert all(m or torch.equal(o, xi) for m, o, xi in zip(mirrored, out, x))
    assert 5 < sum(mirrored) < 27


def test_rotate_90_equals_rot90_and_any_angle_equals_the_explicit_grid():
    x = _images(c=2, h=7, w=7)
    ninety = augment.rotate(x, torch.full((6,), 90.0))
    assert torch.allclose(ninety, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)  # counter-clockwise as displayed
    degrees = torch.tensor([-15.0, -7.5, 0.0, 3.0, 11.0, 15.0], dtype=torch.float64)
    rad = degrees * math.pi / 180
    theta = torch.stack([torch.stack([rad.cos(), -rad.sin()], -1), torch.stack([rad.sin(), rad.cos()], -1)], 1)
    assert torch.allclose(augment.rotate(x, degrees), _reference_affine(x, theta), atol=1e-5)


def test_scale_equals_the_explicit_grid():
    x = _images(h=9, w=9)
    sx = torch.tensor([1 / 1.2, 0.9, 1.0, 1.1, 1.2, 1.05], dtype=torch.float64)
    sy = torch.tensor([1.2, 1.0, 0.85, 1.1, 1 / 1.2, 0.95], dtype=torch.float64)
    theta = torch.diag_embed(torch.stack([sx, sy], 1))
    assert torch.allclose(augment.scale(x, sx, sy), _reference_affine(x, theta), atol=1e-5)
    # a grid factor > 1 shrinks the content: the border becomes zero
    shrunk = augment.scale(x, torch.full((6,), 1.5), torch.full((6,), 1.5))
    assert shrunk[..., 0].abs().max() == 0 and shrunk[..., 4, 4].ne(0).all()


class _Recorder:
    """Stands in for an op with explicit parameters and records what the random version drew."""

    def __init__(self, op):
        self.op, self.calls = op, []

    def __call__(self, x, *args, **kwargs):
        self.calls.append(args)
        return self.op(x, *args, **kwargs)


def test_random_rotate_and_scale_draw_from_the_dsa_ranges(monkeypatch):
    x = _images(b=400, c=1, h=4, w=4)
    rot, sca = _Recorder(augment.rotate), _Recorder(augment.scale)
    monkeypatch.setattr(augment, "rotate", rot)
    monkeypatch.setattr(augment, "scale", sca)
    dsa(x, 0, "rotate")
    dsa(x, 0, "scale")
    (degrees,), (sx, sy) = rot.calls[0], sca.calls[0]
    assert degrees.abs().max() <= 15 and degrees.min() < -13 and degrees.max() > 13
    for s in (sx, sy):
        assert s.min() >= 1 / 1.2 and s.max() <= 1.2 and s.min() < 0.85 and s.max() > 1.18
    assert not torch.equal(sx, sy)  # independent per axis


def test_translate_and_random_crop_shift_content_with_zero_fill():
    x = _images(b=40, h=16, w=16)
    for dx, dy in [(0, 0), (2, 0), (0, -2), (-1, 2), (3, -3)]:
        out = augment.translate(x[:2], torch.tensor([dx, dx]), torch.tensor([dy, dy]))
        assert torch.equal(out[0], _shifted(x[0], dx, dy))
    out = dsa(x, 1, "crop")
    max_shift = int(16 * 0.125 + 0.5)  # 2 pixels
    seen = set()
    for o, xi in zip(out, x):
        matches = [(dx, dy) for dx in range(-max_shift, max_shift + 1) for dy in range(-max_shift, max_shift + 1)
                   if torch.equal(o, _shifted(xi, dx, dy))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 10  # per-sample shifts


def test_cutout_zeros_a_rectangle_of_the_stated_size():
    x = _images(b=64, c=2, h=10, w=12).abs() + 1.0
    out = dsa(x, 2, "cutout")
    full_size = 0
    for o, xi in zip(out, x):
        zero = o == 0
        assert torch.equal(zero[0], zero[1])  # the same region in every channel
        assert torch.equal(o[~zero], xi[~zero])
        rows, cols = zero[0].any(1).nonzero().flatten(), zero[0].any(0).nonzero().flatten()
        height, width = len(rows), len(cols)
        assert height * width == int(zero[0].sum())  # a rectangle
        assert rows.max() - rows.min() + 1 == height and cols.max() - cols.min() + 1 == width
        assert 1 <= height <= 5 and 1 <= width <= 6  # half the size, clipped at the border
        touches = rows.min() == 0 or rows.max() == 9 or cols.min() == 0 or cols.max() == 11
        assert touches or (height, width) == (5, 6)
        full_size += (height, width) == (5, 6)
    assert full_size > 10
    # explicit parameters against a loop
    ref = x[:1].clone()
    ref[:, :, 0:3, 9:12] = 0
    assert torch.equal(augment.cutout(x[:1], torch.tensor([-2]), torch.tensor([9]), 5, 6), ref)


def test_color_ops_follow_their_formulas_without_clamping():
    x = _images(b=4) * 3  # normalised images, far outside [0, 1]
    f = torch.tensor([0.0, 0.5, 1.3, 2.0], dtype=torch.float64)
    assert torch.equal(augment.brightness(x, f), x + f.view(4, 1, 1, 1))
    m_c = x.mean(1, keepdim=True)
    assert torch.allclose(augment.saturation(x, f), m_c + (x - m_c) * f.view(4, 1, 1, 1))
    m = x.mean((1, 2, 3), keepdim=True)
    assert torch.allclose(augment.contrast(x, f), m + (x - m) * f.view(4, 1, 1, 1))
    out = dsa(x, 0, "color")
    assert out.max() > 1.5 and out.min() < -1.5
    # on a constant image only the brightness shift, in [-0.5, 0.5], acts: 5 stays about 5, not 1
    const = torch.full((50, 3, 4, 4), 5.0, dtype=torch.float64)
    shifted = dsa(const, 0, "color")
    per_image = shifted[:, 0, 0, 0]
    assert torch.allclose(shifted, per_image.view(-1, 1, 1, 1).expand_as(shifted))
    assert per_image.min() >= 4.5 and per_image.max() <= 5.5 and per_image.std() > 0.1


# ----------------------------------------------------------------------------- gradients

def test_gradcheck_affine_ops_and_every_random_op():
    x = _images(b=2, c=2, h=5, w=5).requires_grad_(True)
    deg = torch.tensor([9.0, -13.0], dtype=torch.float64)
    s = torch.tensor([1.1, 0.9], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: augment.rotate(z, deg), (x,))
    assert torch.autograd.gradcheck(lambda z: augment.scale(z, s, s.flip(0)), (x,))
    for name in OPS:
        assert torch.autograd.gradcheck(lambda z: dsa(z, 7, name), (x,)), name


# ----------------------------------------------------------------------------- step and batch interfaces

def test_step_transform_is_deterministic_in_the_step_and_reseedable():
    x = _images()
    t = step_transform(DSA_STRATEGY, base_seed=5)
    assert torch.equal(t(x, 3), t(x, 3))
    assert torch.equal(t(x, 3), dsa(x, derive_seed(5, 3)))
    assert not torch.equal(t(x, 3), t(x, 4))
    other = step_transform(DSA_STRATEGY, base_seed=derive_seed(5, 1))  # a new base seed per outer iteration
    assert not torch.equal(t(x, 3), other(x, 3))
    seeds = {derive_seed(b, s) for b in range(10) for s in range(10)}
    assert len(seeds) == 100 and all(0 <= v < 2 ** 63 for v in seeds)
    with pytest.raises(ValueError):
        derive_seed(-1, 0)


def _tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).double()


def test_unroll_with_step_transform_full_equals_lowmem():
    model = _tiny_net()
    g = torch.Generator().manual_seed(0)
    x_syn = torch.randn(9, 3, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y_syn = torch.arange(3).repeat_interleave(3)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    x_real, y_real = torch.randn(12, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    batches = minibatch_schedule(9, 4, steps=12, generator=torch.Generator().manual_seed(1))
    results = {}
    for base_seed in (0, 1):
        transform = step_transform(DSA_STRATEGY, base_seed)
        for mode in ("full", "lowmem"):
            final = unroll(model, init_params(model), x_syn, y_syn, lr, batches, mode=mode, transform=transform)
            loss = F.cross_entropy(torch.func.functional_call(model, final, (x_real,)), y_real)
            results[base_seed, mode] = (loss.detach(), *torch.autograd.grad(loss, (x_syn, lr)))
        for a, b in zip(results[base_seed, "full"], results[base_seed, "lowmem"]):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    plain = unroll(model, init_params(model), x_syn, y_syn, lr, batches)
    plain_loss = F.cross_entropy(torch.func.functional_call(model, plain, (x_real,)), y_real)
    assert not torch.allclose(plain_loss, results[0, "full"][0])  # the augmentation did act
    assert not torch.allclose(results[0, "full"][1], results[1, "full"][1])


def test_batch_augment_draws_a_fresh_reproducible_seed_per_call():
    x = _images()
    a1 = batch_augment(DSA_STRATEGY, torch.Generator().manual_seed(3))
    a2 = batch_augment(DSA_STRATEGY, torch.Generator().manual_seed(3))
    first, second = a1(x), a1(x)
    assert not torch.equal(first, second)
    assert torch.equal(first, a2(x)) and torch.equal(second, a2(x))
    from ddlib.train import train_classifier
    model = _tiny_net().float()
    xs, ys = x.float(), torch.tensor([0, 1, 2, 0, 1, 2])
    train_classifier(model, xs, ys, epochs=1, lr=0.01, batch_size=3, augment=batch_augment(generator=torch.Generator()))
