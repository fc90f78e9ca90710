"""Differentiable siamese augmentation (DSA) with explicit, device-independent seeds.

Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation" (ICML 2021), eq. 4:
the synthetic images are augmented by a transform A_omega that is differentiable in the images, so
that d loss / d x_syn flows through the augmentation. Cazenavette et al. (MTT, CVPR 2022, sec. 3)
apply DSA in every student step of the inner unroll, when training the expert trajectories and when
evaluating a distilled set.

The ops and their parameter distributions follow the DSA defaults that MTT uses (``DSAParams``):

``color``   three steps in a row, each with its own per-sample factor u ~ U(0, 1):
            brightness ``x + (u - 0.5) * 1.0``; saturation ``m_c + (x - m_c) * (2 u)`` with m_c the
            per-pixel mean over channels (a no-op on one channel); contrast ``m + (x - m) * (u + 0.5)``
            with m the per-image mean. No clamping: the images are normalised or ZCA-whitened.
``crop``    translate by integers (dx, dy), each uniform in [-s, s] with s = round(0.125 * size);
            uncovered pixels are zero (the "pad with zeros and crop" of DSA).
``cutout``  zero a (round(0.5 H), round(0.5 W)) rectangle whose centre is a uniform pixel; the
            rectangle is clipped at the border (same placement rule as DSA).
``flip``    mirror left-right with probability 0.5 per sample.
``scale``   independent x and y stretch about the centre: the sampling grid is scaled by
            s ~ U(1/1.2, 1.2), i.e. the content by 1/s; zeros outside.
``rotate``  about the centre by an angle ~ U(-15, 15) degrees (positive = counter-clockwise as
            displayed); bilinear, zeros outside.

Geometric ops run through ``kornia.geometry.transform`` (bilinear ``scale``/``rotate`` with
``align_corners=True``, which equals DSA's ``affine_grid``/``grid_sample`` convention; ``translate``
with nearest sampling, which at integer shifts is an exact copy of pixels). kornia rotates in pixel
coordinates and DSA in normalised ones; the two agree on square images (every dataset here).

Each op is also public with explicit per-sample parameters (:func:`flip`, :func:`rotate`,
:func:`scale`, :func:`translate`, :func:`cutout`, :func:`brightness`, :func:`saturation`,
:func:`contrast`); the random versions only draw those parameters and call them.

"Single op per call" (DSA's mode ``"S"``, the one MTT uses): each call picks ONE op of the
strategy uniformly (``color`` counts as one op) and applies it to the whole batch with per-sample
random parameters. ``single_op=False`` applies every op of the strategy in order (DSA's mode ``"M"``).

Randomness: every draw (the op and its parameters) comes from a CPU ``torch.Generator`` seeded with
the call's ``seed`` and is then moved to the images' device, so a seed gives the same augmentation
on CPU and CUDA and for any batch content. :func:`step_transform` gives the ``transform(x, step)``
of :func:`ddlib.unroll.unroll` (seed = :func:`derive_seed` (base_seed, step), so the low-memory
backward pass recomputes exactly the forward augmentation); :func:`batch_augment` gives the
``augment(x)`` of :func:`ddlib.train.train_classifier` (a fresh seed per call from a generator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from kornia.geometry.transform import rotate as _kornia_rotate
from kornia.geometry.transform import scale as _kornia_scale
from kornia.geometry.transform import translate as _kornia_translate
from torch import Tensor

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
NO_AUGMENTATION = ("", "none", "None")


@dataclass(frozen=True)
class DSAParams:
    """Ranges of the random parameters (DSA defaults, as used by MTT)."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2       # grid scale factor ~ U(1/ratio, ratio), per axis
    ratio_rotate: float = 15.0     # degrees, angle ~ U(-ratio, ratio)
    ratio_crop_pad: float = 0.125  # max shift as a fraction of the side
    ratio_cutout: float = 0.5      # cutout side as a fraction of the image side
    brightness: float = 1.0        # x + (u - 0.5) * brightness
    saturation: float = 2.0        # factor u * saturation
    contrast: float = 0.5          # factor u + contrast


# ----------------------------------------------------------------------------- seeds

def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers, e.g. ``derive_seed(base_seed, step)``.

    Uses numpy's ``SeedSequence`` hashing, so nearby keys give unrelated seeds; use it also to
    pick a new base seed per outer iteration: ``derive_seed(run_seed, iteration)``.
    """
    if not keys or any(int(k) < 0 for k in keys):
        raise ValueError(f"derive_seed needs one or more non-negative integers, got {keys}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


# ----------------------------------------------------------------------------- the ops, with explicit parameters
# Deterministic and differentiable in ``x``; each takes per-sample parameters of shape (B,).

def flip(x: Tensor, mirror: Tensor) -> Tensor:
    """Mirror left-right the samples where the boolean ``mirror`` is True."""
    return torch.where(mirror.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate about the image centre, counter-clockwise as displayed; bilinear, zeros outside."""
    degrees = degrees.to(device=x.device, dtype=x.dtype)
    return _kornia_rotate(x, degrees, mode="bilinear", padding_mode="zeros", align_corners=True)


def scale(x: Tensor, grid_sx: Tensor, grid_sy: Tensor) -> Tensor:
    """DSA's scale: output pixel p samples the input at centre + (grid_sx, grid_sy) * (p - centre).

    A factor > 1 therefore shrinks the content (zeros come in at the border), < 1 enlarges it.
    """
    # kornia's factor scales the content, the inverse of DSA's sampling-grid factor
    factor = torch.stack([1.0 / grid_sx, 1.0 / grid_sy], 1).to(device=x.device, dtype=x.dtype)
    return _kornia_scale(x, factor, mode="bilinear", padding_mode="zeros", align_corners=True)


def translate(x: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """Move the content by integer (dx, dy) pixels (right, down); uncovered pixels are zero."""
    shift = torch.stack([dx, dy], 1).to(device=x.device, dtype=x.dtype)
    # nearest sampling at integer offsets copies pixels exactly (and is still linear in x)
    return _kornia_translate(x, shift, mode="nearest", padding_mode="zeros", align_corners=True)


def cutout(x: Tensor, top: Tensor, left: Tensor, height: int, width: int) -> Tensor:
    """Zero the rectangle rows [top, top+height) x cols [left, left+width), clipped to the image."""
    b, _, h, w = x.shape
    top, left = top.view(b, 1, 1).cpu(), left.view(b, 1, 1).cpu()
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
    return x * (~inside).to(device=x.device, dtype=x.dtype).unsqueeze(1)


def brightness(x: Tensor, shift: Tensor) -> Tensor:
    """x + shift per sample (no clamping)."""
    return x + shift.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Scale each pixel's deviation from its mean over channels by ``factor`` (no clamping)."""
    channel_mean = x.mean(dim=1, keepdim=True)
    return channel_mean + (x - channel_mean) * factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Scale each image's deviation from its mean over (C, H, W) by ``factor`` (no clamping)."""
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return image_mean + (x - image_mean) * factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------- random parameters (DSA)
# Each draws from the CPU generator ``g`` in a fixed order, then calls the op above.

def _uniform(g: torch.Generator, n: int, low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)


def _randint(g: torch.Generator, n: int, low: int, high_inclusive: int) -> Tensor:
    return torch.randint(low, high_inclusive + 1, (n,), generator=g)


def _random_color(x: Tensor, g: torch.Generator, p: DSAParams) -> Tensor:
    b = x.shape[0]
    x = brightness(x, (_uniform(g, b, 0, 1) - 0.5) * p.brightness)
    x = saturation(x, _uniform(g, b, 0, 1) * p.saturation)
    return contrast(x, _uniform(g, b, 0, 1) + p.contrast)


def _random_crop(x: Tensor, g: torch.Generator, p: DSAParams) -> Tensor:
    b, _, h, w = x.shape
    max_dy, max_dx = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
    dx = _randint(g, b, -max_dx, max_dx)
    dy = _randint(g, b, -max_dy, max_dy)
    return translate(x, dx, dy)


def _random_cutout(x: Tensor, g: torch.Generator, p: DSAParams) -> Tensor:
    b, _, h, w = x.shape
    size_h, size_w = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    # the centre is a uniform row 0..h-1 (and also h when the size is even), so that the rectangle
    # is clipped as often at the top as at the bottom; likewise for columns
    centre_y = _randint(g, b, 0, h - size_h % 2)
    centre_x = _randint(g, b, 0, w - size_w % 2)
    return cutout(x, centre_y - size_h // 2, centre_x - size_w // 2, size_h, size_w)


def _random_flip(x: Tensor, g: torch.Generator, p: DSAParams) -> Tensor:
    return flip(x, _uniform(g, x.shape[0], 0, 1) < p.prob_flip)


def _random_scale(x: Tensor, g: torch.Generator, p: DSAParams) -> Tensor:
    b, lo, hi = x.shape[0], 1.0 / p.ratio_scale, p.ratio_scale
    grid_sx = _uniform(g, b, lo, hi)
    grid_sy = _uniform(g, b, lo, hi)
    return scale(x, grid_sx, grid_sy)


def _random_rotate(x: Tensor, g: torch.Generator, p: DSAParams) -> Tensor:
    return rotate(x, _uniform(g, x.shape[0], -p.ratio_rotate, p.ratio_rotate))


OPS: dict[str, Callable[[Tensor, torch.Generator, DSAParams], Tensor]] = {
    "color": _random_color, "crop": _random_crop, "cutout": _random_cutout, "flip": _random_flip,
    "scale": _random_scale, "rotate": _random_rotate,
}


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """The op names of ``"op1_op2_..."``; ``""``/``"none"`` give (). Unknown names are a ValueError."""
    if strategy is None or strategy in NO_AUGMENTATION:
        return ()
    names = tuple(strategy.split("_"))
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(f"unknown DSA op(s) {unknown} in strategy {strategy!r}; valid ops: {sorted(OPS)} "
                         f"joined by '_', or 'none'")
    return names


# ----------------------------------------------------------------------------- entry points

def dsa(x: Tensor, seed: int, strategy: str = DSA_STRATEGY, params: DSAParams = DSAParams(),
        single_op: bool = True) -> Tensor:
    """Augment a batch ``x`` of shape (B, C, H, W), differentiably in ``x``; ``seed`` fixes every draw.

    ``single_op=True`` (DSA mode "S", MTT's): one op of ``strategy`` chosen uniformly for the whole
    batch, its parameters drawn per sample. ``single_op=False``: all ops in order (DSA mode "M").
    """
    ops = parse_strategy(strategy)
    if not ops:
        return x
    if x.ndim != 4:
        raise ValueError(f"dsa expects images of shape (B, C, H, W); got {tuple(x.shape)}")
    g = torch.Generator().manual_seed(int(seed))
    if single_op:
        ops = (ops[int(torch.randint(len(ops), (1,), generator=g))],)
    for name in ops:
        x = OPS[name](x, g, params)
    return x.contiguous()


@dataclass(frozen=True)
class StepAugment:
    """``transform(x, step)`` for :func:`ddlib.unroll.unroll`: ``dsa`` seeded by (base_seed, step)."""

    strategy: str = DSA_STRATEGY
    base_seed: int = 0
    params: DSAParams = DSAParams()
    single_op: bool = True

    def __post_init__(self):
        parse_strategy(self.strategy)  # fail early on a bad strategy

    def seed_at(self, step: int) -> int:
        return derive_seed(self.base_seed, step)

    def __call__(self, x: Tensor, step: int) -> Tensor:
        return dsa(x, self.seed_at(step), self.strategy, self.params, self.single_op)


def step_transform(strategy: str = DSA_STRATEGY, base_seed: int = 0, params: DSAParams = DSAParams(),
                   single_op: bool = True) -> StepAugment:
    """The unroll's ``transform(x, step)``; deterministic in (x, step) as the "lowmem" mode requires.

    Take a new ``base_seed`` every outer iteration, e.g. ``step_transform(s, derive_seed(run_seed, it))``,
    so that each iteration sees fresh augmentations.
    """
    return StepAugment(strategy, int(base_seed), params, single_op)


def batch_augment(strategy: str = DSA_STRATEGY, generator: torch.Generator | None = None,
                  params: DSAParams = DSAParams(), single_op: bool = True) -> Callable[[Tensor], Tensor]:
    """``augment(x)`` for :func:`ddlib.train.train_classifier`: a fresh seed per call from ``generator``.

    ``generator`` must be a CPU ``torch.Generator`` (``None``: a new one seeded with 0), so a run is
    reproducible from the generator's seed.
    """
    ops = parse_strategy(strategy)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if generator.device.type != "cpu":
        raise ValueError(f"batch_augment needs a CPU torch.Generator, got one on {generator.device}")

    def augment(x: Tensor) -> Tensor:
        if not ops:
            return x
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        return dsa(x, seed, strategy, params, single_op)

    return augment
