"""Barlow Twins (ddlib.ssl): the loss against hand computations, teacher storage and its mismatch errors,
representations, and the gradient-noise measurement."""

import pytest
import torch

from ddlib import ssl


def _loss_by_hand(z1, z2, lambd):
    """Eq. 1 of Zbontar et al. 2021 with explicit loops (biased std, as BatchNorm1d in training mode)."""
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / z1.std(0, unbiased=False)
    b = (z2 - z2.mean(0)) / z2.std(0, unbiased=False)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = float(sum(a[k, i] * b[k, j] for k in range(n)) / n)
            total += (1 - c) ** 2 if i == j else lambd * c ** 2
    return total


def test_identical_decorrelated_views_give_zero():
    # two columns with mean 0, biased std 1 and zero correlation: C is the identity
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    c = ssl.cross_correlation(z, z, eps=0.0)
    assert torch.allclose(c, torch.eye(2), atol=1e-6)
    assert float(ssl.barlow_twins_loss(z, z, lambd=0.5, eps=0.0)) == pytest.approx(0.0, abs=1e-10)


def test_hand_computed_2x2_case():
    # view A: columns u=(1,1,-1,-1), v=(1,-1,1,-1); view B: columns u and u (dimension 2 copies dimension 1)
    u = torch.tensor([1.0, 1.0, -1.0, -1.0])
    v = torch.tensor([1.0, -1.0, 1.0, -1.0])
    za, zb = torch.stack([u, v], 1), torch.stack([u, u], 1)
    # C = [[u.u, u.u], [v.u, v.u]] / 4 = [[1, 1], [0, 0]]: on-diagonal (1-1)^2 + (1-0)^2 = 1, off-diagonal 1^2 + 0^2 = 1
    c = ssl.cross_correlation(za, zb, eps=0.0)
    assert torch.allclose(c, torch.tensor([[1.0, 1.0], [0.0, 0.0]]), atol=1e-6)
    assert float(ssl.barlow_twins_loss(za, zb, lambd=0.1, eps=0.0)) == pytest.approx(1.0 + 0.1 * 1.0, abs=1e-6)


def test_loss_matches_an_independent_computation_and_is_scale_invariant():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    got = float(ssl.barlow_twins_loss(z1, z2, lambd=5e-3, eps=0.0))
    assert got == pytest.approx(_loss_by_hand(z1, z2, 5e-3), rel=1e-5)
    shifted = float(ssl.barlow_twins_loss(3 * z1 + 2, z2 - 1, lambd=5e-3, eps=0.0))
    assert shifted == pytest.approx(got, rel=1e-5)
    with pytest.raises(ValueError):
        ssl.barlow_twins_loss(z1, z2[:, :2])


def _images(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g)


def _spec(**kw):
    base = dict(dataset="blobs", model="convnet", input_shape=(1, 8, 8), model_kwargs={"width": 4, "depth": 2},
                projector=(16, 16), epochs=2, batch_size=16, train_size=48, seed=1)
    return ssl.TeacherSpec(**{**base, **kw})


def test_teacher_is_stored_reused_and_checked(tmp_path):
    x = _images()
    spec = _spec()
    teacher = ssl.ensure_teacher(spec, x, tmp_path, progress=False)
    assert teacher.width == 16 and len(teacher.losses) == 2 and teacher.path.name == spec.file_name()
    reps = ssl.representations(teacher, x, batch_size=10)
    assert reps.shape == (48, 16)
    # a second call loads the file (same weights, no training): identical representations
    again = ssl.ensure_teacher(spec, x, tmp_path, progress=False)
    assert torch.equal(ssl.representations(again, x), reps)
    assert again.losses == teacher.losses
    # training is deterministic for a spec
    assert torch.allclose(ssl.representations(ssl.train_teacher(spec, x, progress=False), x), reps, atol=1e-5)
    # a different spec is a different file
    assert _spec(epochs=3).file_name() != spec.file_name()
    with pytest.raises(ssl.TeacherMismatchError, match="dataset"):
        ssl.load_teacher(teacher.path, dataset="cifar10")
    with pytest.raises(ssl.TeacherMismatchError, match="width"):
        ssl.load_teacher(teacher.path, width=512)
    with pytest.raises(ssl.TeacherMismatchError, match="model"):
        ssl.load_teacher(teacher.path, model="resnet18")
    assert ssl.load_teacher(teacher.path, dataset="blobs", model="convnet", width=16).width == 16
    with pytest.raises(FileNotFoundError):
        ssl.load_teacher(tmp_path / "missing.safetensors")


def test_bad_teacher_specs_are_refused():
    with pytest.raises(ValueError, match="augment"):
        _spec(augment="imagenet")
    with pytest.raises(ValueError):
        _spec(epochs=0)
    with pytest.raises(ValueError, match="train_size"):
        ssl.train_teacher(_spec(train_size=10), _images(), progress=False)


def test_augmentations_keep_shapes_and_differ_between_views():
    x = _images(8)
    for kind in ("digits", "cifar"):
        aug = ssl.two_view_augment(kind, (1, 8, 8))
        a, b = aug(x), aug(x)
        assert a.shape == x.shape and not torch.allclose(a, b)
    rgb = torch.rand(4, 3, 8, 8)
    out = ssl.two_view_augment("cifar", (3, 8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(rgb)
    assert out.shape == rgb.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        ssl.two_view_augment("mnist", (1, 8, 8))


def test_gradient_noise_is_zero_for_identical_batches_and_grows_with_disagreement():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])

    def loss(idx):
        return (data[idx] @ w).pow(2).mean()

    same = [torch.tensor([0, 1])] * 3
    assert ssl.gradient_noise(loss, [w], same) == pytest.approx(0.0, abs=1e-12)
    # two single-example batches with gradients g1, g2: mean_b ||g_b - gbar||^2 / ||gbar||^2 by hand
    g1 = torch.autograd.grad(loss(torch.tensor([0])), w)[0]
    g2 = torch.autograd.grad(loss(torch.tensor([3])), w)[0]
    mean = (g1 + g2) / 2
    expected = float(((g1 - mean).pow(2).sum() + (g2 - mean).pow(2).sum()) / 2 / mean.pow(2).sum())
    assert ssl.gradient_noise(loss, [w], [torch.tensor([0]), torch.tensor([3])]) == pytest.approx(expected, rel=1e-6)
