"""Baselines that pick or summarise real images instead of learning synthetic ones.

Wang et al. 2018 (sec. 4.1) compare distilled images with the same number of
* random real images per class,
* the average image of each class (class means),
* k-means centroids of each class.
All return images in class blocks (``per_class`` images of class 0, then class 1, ...), the
layout of :func:`ddlib.data.sample_per_class`; :func:`ddlib.dd.to_step_layout` rearranges them
into distilled-set steps. With one image per class, k-means with k = 1 *is* the class mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .data import sample_per_class


def _check(per_class: int, y: Tensor, num_classes: int) -> None:
    if per_class < 1:
        raise ValueError(f"per_class={per_class} must be >= 1 (images per class)")
    counts = torch.bincount(y, minlength=num_classes)
    if int(counts.min()) < per_class:
        raise ValueError(f"class {int(counts.argmin())} has {int(counts.min())} images; cannot pick {per_class}")


def random_real(x: Tensor, y: Tensor, per_class: int, num_classes: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``per_class`` real images of each class, drawn uniformly without replacement."""
    _check(per_class, y, num_classes)
    return sample_per_class(x, y, per_class, num_classes, generator)


def class_means(x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """The average image of each class (one per class)."""
    _check(1, y, num_classes)
    means = torch.stack([x[y == c].mean(0) for c in range(num_classes)])
    return means, torch.arange(num_classes, device=x.device)


def kmeans_centroids(x: Tensor, y: Tensor, per_class: int, num_classes: int, seed: int = 0,
                     iters: int = 100) -> tuple[Tensor, Tensor]:
    """k-means (Lloyd's algorithm, k-means++ seeding) within each class; k = ``per_class``.

    Written in torch so that it runs on the data's device; deterministic for a given ``seed``.
    """
    _check(per_class, y, num_classes)
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(num_classes):
        pts = x[y == c].reshape(int((y == c).sum()), -1)
        centers = _kmeans_pp(pts, per_class, g)
        for _ in range(iters):
            assign = torch.cdist(pts, centers).argmin(1)
            new = torch.stack([pts[assign == j].mean(0) if (assign == j).any() else centers[j]
                               for j in range(per_class)])
            if torch.allclose(new, centers):
                break
            centers = new
        out.append(centers.reshape(per_class, *x.shape[1:]))
    labels = torch.arange(num_classes, device=x.device).repeat_interleave(per_class)
    return torch.cat(out), labels


def _kmeans_pp(pts: Tensor, k: int, g: torch.Generator) -> Tensor:
    """k-means++ seeding: each next center drawn with probability proportional to squared distance."""
    first = int(torch.randint(pts.shape[0], (1,), generator=g))
    centers = [pts[first]]
    for _ in range(1, k):
        d2 = torch.cdist(pts, torch.stack(centers)).min(1).values.pow(2).cpu()
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / len(d2))
        centers.append(pts[int(torch.multinomial(probs, 1, generator=g))])
    return torch.stack(centers)
