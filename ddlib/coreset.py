"""Baselines that pick or summarise real images instead of learning synthetic ones.

Wang et al. 2018 (sec. 4.1) compare distilled images with the same number of
* random real images per class,
* the average image of each class (class means),
* k-means centroids of each class.
MTT (Cazenavette et al. 2022, table 1) adds two coreset selections of real images, both here:
* herding (Welling 2009; the greedy mean-matching form of Rebuffi et al. 2017, alg. 4, without their
  feature normalisation): greedily pick the image whose addition brings the mean of the picked
  features closest to the class mean feature,
* k-center greedy (Farahani & Hekmatfar 2009; Sener & Savarese 2018): repeatedly pick the image
  farthest from the already picked ones (a 2-approximation of the minimax facility problem).
Both work on raw pixels or on the features of a network (``embed``, e.g. ``model.embed`` of a
trained :mod:`ddlib.models` network) and select without replacement.

All return images in class blocks (``per_class`` images of class 0, then class 1, ...), the
layout of :func:`ddlib.data.sample_per_class`; :func:`ddlib.dd.to_step_layout` rearranges them
into distilled-set steps. With one image per class, k-means with k = 1 *is* the class mean.
"""

from __future__ import annotations

from typing import Callable

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


# ----------------------------------------------------------------------------- herding and k-center

Embed = Callable[[Tensor], Tensor]


@torch.no_grad()
def _features(images: Tensor, embed: Embed | None, batch_size: int = 1024) -> Tensor:
    """(n, d) features: flattened pixels, or ``embed`` applied batch by batch."""
    if embed is None:
        return images.reshape(images.shape[0], -1)
    feats = torch.cat([embed(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])
    return feats.reshape(images.shape[0], -1)


def herding_order(features: Tensor, k: int) -> Tensor:
    """Indices of k rows of ``features`` (n, d) picked by herding, in the order picked.

    Step j picks the unpicked row f_i minimising || mu - (f_i + sum of the j-1 picked rows) / j ||,
    mu = the mean row; the first pick is the row nearest the mean.
    """
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"herding needs 1 <= k <= {n} rows, got k={k}")
    mu = features.mean(0)
    picked_sum = torch.zeros_like(mu)
    available = torch.ones(n, dtype=torch.bool, device=features.device)
    order = []
    for j in range(1, k + 1):
        error = (mu - (picked_sum + features) / j).norm(dim=1)
        error = error.masked_fill(~available, float("inf"))
        i = int(error.argmin())
        order.append(i)
        available[i] = False
        picked_sum = picked_sum + features[i]
    return torch.tensor(order, dtype=torch.long, device=features.device)


def k_center_order(features: Tensor, k: int, first: int) -> Tensor:
    """Indices of k rows picked by k-center greedy from row ``first``, in the order picked.

    Each next pick is the unpicked row whose distance to the nearest picked row is largest
    (ties: the lowest index).
    """
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-center needs 1 <= k <= {n} rows, got k={k}")
    if not 0 <= first < n:
        raise ValueError(f"first={first} is not a row index (n={n})")
    nearest = (features - features[first]).norm(dim=1)  # distance to the picked set
    nearest[first] = -1.0  # picked rows never win the argmax, even among duplicates
    order = [first]
    for _ in range(k - 1):
        i = int(nearest.argmax())
        order.append(i)
        nearest = torch.minimum(nearest, (features - features[i]).norm(dim=1))
        nearest[order] = -1.0
    return torch.tensor(order, dtype=torch.long, device=features.device)


def _select_per_class(x: Tensor, y: Tensor, per_class: int, num_classes: int,
                      pick: Callable[[Tensor, int], Tensor]) -> tuple[Tensor, Tensor]:
    _check(per_class, y, num_classes)
    chosen = []
    for c in range(num_classes):
        members = (y == c).nonzero().flatten()
        order = pick(members, c)
        chosen.append(members[order.to(members.device)])
    labels = torch.arange(num_classes, device=x.device).repeat_interleave(per_class)
    return x[torch.cat(chosen).to(x.device)], labels


def herding(x: Tensor, y: Tensor, per_class: int, num_classes: int,
            embed: Embed | None = None) -> tuple[Tensor, Tensor]:
    """``per_class`` real images per class chosen by herding on ``embed`` features (default: pixels).

    Deterministic; within a class block the images are in the order picked.
    """
    def pick(members: Tensor, c: int) -> Tensor:
        return herding_order(_features(x[members], embed), per_class)

    return _select_per_class(x, y, per_class, num_classes, pick)


def k_center(x: Tensor, y: Tensor, per_class: int, num_classes: int, embed: Embed | None = None,
             seed: int | None = None) -> tuple[Tensor, Tensor]:
    """``per_class`` real images per class chosen by k-center greedy on ``embed`` features (default: pixels).

    The first center is the image nearest the class mean feature (``seed=None``, deterministic), or a
    uniformly random image of the class drawn from a CPU generator seeded with ``seed`` (one
    generator for all classes, class 0 first). Within a class block the images are in the order picked.
    """
    g = torch.Generator().manual_seed(seed) if seed is not None else None

    def pick(members: Tensor, c: int) -> Tensor:
        feats = _features(x[members], embed)
        if g is None:
            first = int((feats - feats.mean(0)).norm(dim=1).argmin())
        else:
            first = int(torch.randint(feats.shape[0], (1,), generator=g))
        return k_center_order(feats, per_class, first)

    return _select_per_class(x, y, per_class, num_classes, pick)
