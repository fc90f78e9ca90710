"""Herding and k-center coresets (ddlib.coreset) on point sets whose answer is known."""

import itertools

import pytest
import torch

from ddlib import coreset, models


def _line(n=11):
    """Class 0: the points 0..n-1 on a line (as (n, 1, 1, 1) 'images'); class 1: the same shifted by 100."""
    pts = torch.arange(n, dtype=torch.float64)
    x = torch.cat([pts, pts + 100]).view(-1, 1, 1, 1)
    y = torch.arange(2).repeat_interleave(n)
    return x, y


def _cloud(n=40, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)


def _naive_herding(points, k):
    """Herding written out with Python loops over candidates (an independent implementation)."""
    mu = points.mean(0)
    picked = []
    for _ in range(k):
        best, best_err = None, float("inf")
        for i in range(len(points)):
            if i in picked:
                continue
            err = float((mu - points[picked + [i]].mean(0)).norm())
            if err < best_err:
                best, best_err = i, err
        picked.append(best)
    return picked


def test_k_center_on_a_line_picks_the_extremes():
    x, y = _line()
    images, labels = coreset.k_center(x, y, 3, 2)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    # start at the point nearest the mean (5), then the farthest point (0; ties go to the lowest index), then 10
    assert images.flatten().tolist() == [5, 0, 10, 105, 100, 110]
    starts = set()
    for seed in range(6):  # from a seeded random start, the next pick is the extreme farther from it
        images, _ = coreset.k_center(x, y, 2, 2, seed=seed)
        for start, second, low, high in ((images[0], images[1], 0, 10), (images[2], images[3], 100, 110)):
            assert second == (low if start - low >= high - start else high)
            starts.add(float(start))
        assert torch.equal(images, coreset.k_center(x, y, 2, 2, seed=seed)[0])
    assert len(starts) > 4
    # five centers on 0..10 end up spread out: every point within 2.5 of a center (the optimum)
    five, _ = coreset.k_center(x, y, 5, 2)
    gaps = (x[:11].flatten()[:, None] - five[:5].flatten()[None, :]).abs().min(1).values
    assert gaps.max() <= 2.5


def test_k_center_is_farthest_first_and_a_two_approximation():
    pts = _cloud()
    order = coreset.k_center_order(pts, 6, first=3).tolist()
    assert order[0] == 3 and len(set(order)) == 6
    for j in range(1, 6):  # each pick maximises the distance to the picked set so far
        dist = torch.cdist(pts, pts[order[:j]]).min(1).values
        assert dist[order[j]] == dist.max()
    # covering radius within twice the best over all 4-subsets (the greedy guarantee)
    order4 = coreset.k_center_order(pts[:12], 4, first=0)
    radius = torch.cdist(pts[:12], pts[:12][order4]).min(1).values.max()
    best = min(torch.cdist(pts[:12], pts[:12][list(s)]).min(1).values.max()
               for s in itertools.combinations(range(12), 4))
    assert best <= radius <= 2 * best


def test_herding_first_pick_is_nearest_the_mean_and_matches_a_naive_loop():
    pts = _cloud()
    order = coreset.herding_order(pts, 8).tolist()
    assert order[0] == int((pts - pts.mean(0)).norm(dim=1).argmin())
    assert order == _naive_herding(pts, 8)


def test_herding_mean_error_decreases_with_per_class():
    pts = _cloud(n=60)
    x, y = pts.view(60, 1, 1, 5), torch.zeros(60, dtype=torch.long)
    errors = []
    for k in (1, 2, 5, 10, 20, 40):
        images, _ = coreset.herding(x, y, k, 1)
        errors.append(float((images.flatten(1).mean(0) - pts.mean(0)).norm()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    random_error = float((pts[:10].mean(0) - pts.mean(0)).norm())
    assert errors[3] < random_error / 3  # herding's 10 beat the first 10 by far


def test_class_blocks_labels_and_no_replacement():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 1, 2, 2, generator=g)
    x[5] = x[4]  # duplicates must not be picked twice
    y = torch.tensor([2, 0, 1] * 10)
    for select in (coreset.herding, coreset.k_center):
        images, labels = select(x, y, 4, 3)
        assert images.shape == (12, 1, 2, 2) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        for img, lab in zip(images, labels):  # every image is a real image of its class
            assert any(torch.equal(img, xi) for xi in x[y == lab])
        rows = [int((x.flatten(1) == img.flatten()).all(1).nonzero()[0]) for img in images]
        assert len(set(rows)) == 12
    same = torch.zeros(6, 3)  # all identical: still 6 distinct indices
    assert sorted(coreset.k_center_order(same, 6, 2).tolist()) == list(range(6))
    assert sorted(coreset.herding_order(same, 6).tolist()) == list(range(6))


def test_embed_selects_on_features_but_returns_images():
    x, y = _line()
    x = torch.cat([x, -x], 1)  # (n, 2, 1, 1); the embedding keeps only the second channel, negated
    images, _ = coreset.k_center(x, y, 3, 2, embed=lambda b: -b[:, 1])
    assert images[:, 0].flatten().tolist() == [5, 0, 10, 105, 100, 110]
    assert images.shape == (6, 2, 1, 1)
    torch.manual_seed(0)
    net = models.build("mlp", (2, 1, 1), 2).double().eval()
    picked, labels = coreset.herding(x, y, 2, 2, embed=net.embed)
    feats = net.embed(x[:11]).detach()
    first = int((feats - feats.mean(0)).norm(dim=1).argmin())
    assert torch.equal(picked[0], x[first]) and labels.tolist() == [0, 0, 1, 1]


def test_errors():
    x, y = _line()
    for select in (coreset.herding, coreset.k_center):
        with pytest.raises(ValueError, match="per_class=0"):
            select(x, y, 0, 2)
        with pytest.raises(ValueError, match="cannot pick 12"):
            select(x, y, 12, 2)
        with pytest.raises(ValueError, match="class 2 has 0 images"):
            select(x, y, 1, 3)
    with pytest.raises(ValueError, match="first=11"):
        coreset.k_center_order(torch.zeros(11, 1), 2, first=11)
