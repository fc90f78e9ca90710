"""A real domain shift built from the embedded digits alone, for quick-mode domain adaptation.

Wang et al. 2018 (sec. 3.6, experiments on MNIST -> USPS, USPS -> MNIST, SVHN -> MNIST) adapt
networks pre-trained on a *source* domain to a *target* domain with a few GD steps on distilled
images. USPS and SVHN are not embedded, so quick mode builds the pair from scikit-learn's digits:

- the digits train split is cut in two disjoint, class-balanced halves: the **source** half keeps
  its rendering; the **target** half (and the whole test split) is re-rendered;
- the default rendering, ``"thicken"``, widens every stroke by one pixel (a 2x2 grey-level max
  filter, i.e. dilation toward the lower right), then the target is normalised with its *own*
  per-channel mean and std, as a separately loaded dataset would be.

Why it is a fair stand-in for MNIST -> USPS: the label space and the writers' shapes are the same,
but the pixel statistics differ the way two scanning/rendering pipelines differ (USPS digits have
thicker strokes and fill the frame; MNIST digits are thinner and centred in a margin). The target
images the source networks are adapted to are of *different* writers than those they were trained
on (the disjoint halves), so adaptation cannot recall memorised examples. The shift is real: an MLP
trained on the source half loses about a third of its accuracy on the thickened test split (the
notebook measures it). ``"invert"`` (1 - pixel, a far larger shift, closer in spirit to SVHN ->
MNIST's polarity changes) and ``"rotate"`` (30 degrees) are offered for experiments.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import Dataset, DatasetInfo, balanced_subset_indices

SHIFTS = ("thicken", "invert", "rotate")


def render(x01: Tensor, shift: str) -> Tensor:
    """Apply the rendering ``shift`` to images (N, C, H, W) in [0, 1] pixel scale."""
    if shift == "thicken":
        return F.max_pool2d(F.pad(x01, (0, 1, 0, 1)), kernel_size=2, stride=1)
    if shift == "invert":
        return 1.0 - x01
    if shift == "rotate":
        import torchvision.transforms.functional as TF
        return TF.rotate(x01, 30.0, interpolation=TF.InterpolationMode.BILINEAR)
    raise ValueError(f"shift={shift!r} is unknown; use one of {SHIFTS}")


def _normalised(x_train01: Tensor, x_test01: Tensor, info: DatasetInfo, name: str) -> tuple:
    """(info with this split's own mean/std and ``name``, normalised train, normalised test)."""
    var, mean = torch.var_mean(x_train01, dim=(0, 2, 3))
    std = var.sqrt()
    m, s = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    new_info = replace(info, name=name, mean=tuple(mean.tolist()), std=tuple(std.tolist()))
    return new_info, (x_train01 - m) / s, (x_test01 - m) / s


def split_domains(data: Dataset, shift: str = "thicken", seed: int = 0) -> tuple[Dataset, Dataset]:
    """(source, target) datasets from one dataset (module doc): disjoint halves of its train split; the
    source keeps the original test split, the target gets the re-rendered test split."""
    if shift not in SHIFTS:
        raise ValueError(f"shift={shift!r} is unknown; use one of {SHIFTS}")
    n = len(data.y_train)
    half = balanced_subset_indices(data.y_train, n // 2, seed=seed).to(data.device)
    mask = torch.ones(n, dtype=torch.bool, device=data.device)
    mask[half] = False
    src_idx, tgt_idx = half, torch.nonzero(mask).flatten()
    x_tr01, x_te01 = data.denormalise(data.x_train), data.denormalise(data.x_test)

    src_info, xs_tr, xs_te = _normalised(x_tr01[src_idx], x_te01, data.info, f"{data.info.name}_source")
    source = Dataset(xs_tr.contiguous(), data.y_train[src_idx], xs_te.contiguous(), data.y_test, src_info)
    tgt_info, xt_tr, xt_te = _normalised(render(x_tr01[tgt_idx], shift), render(x_te01, shift), data.info,
                                         f"{data.info.name}_{shift}")
    target = Dataset(xt_tr.contiguous(), data.y_train[tgt_idx], xt_te.contiguous(), data.y_test, tgt_info)
    return source, target


def shifted(data: Dataset, shift: str = "thicken") -> Dataset:
    """All of ``data`` (both splits, every image) re-rendered with ``shift`` and normalised with its own
    statistics: a second dataset with the same labels and writers but other pixel statistics, for transfer
    evaluations that need no download."""
    if shift not in SHIFTS:
        raise ValueError(f"shift={shift!r} is unknown; use one of {SHIFTS}")
    x_tr01, x_te01 = data.denormalise(data.x_train), data.denormalise(data.x_test)
    info, x_tr, x_te = _normalised(render(x_tr01, shift), render(x_te01, shift), data.info, f"{data.info.name}_{shift}")
    return Dataset(x_tr.contiguous(), data.y_train, x_te.contiguous(), data.y_test, info)


def match_input(data: Dataset, input_shape) -> Dataset:
    """``data`` re-rendered for networks that take ``input_shape`` (C, H, W): channels averaged (RGB to grey)
    or repeated (grey to RGB), images resized bilinearly (with antialiasing), then normalised with their
    own statistics. The paper feeds USPS (16x16) and SVHN (32x32 RGB) to the same LeNet as MNIST (28x28 grey)."""
    c, h, w = (int(s) for s in input_shape)
    if tuple(data.input_shape) == (c, h, w):
        return data
    def convert(x):
        x01 = data.denormalise(x)
        if x01.shape[1] != c:
            if c == 1:
                x01 = x01.mean(1, keepdim=True)
            elif x01.shape[1] == 1:
                x01 = x01.repeat(1, c, 1, 1)
            else:
                raise ValueError(f"cannot map {x01.shape[1]} channels to {c}")
        return F.interpolate(x01, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    info, x_tr, x_te = _normalised(convert(data.x_train), convert(data.x_test), data.info, data.info.name)
    info = replace(info, input_shape=(c, h, w))
    return Dataset(x_tr.contiguous(), data.y_train, x_te.contiguous(), data.y_test, info)
