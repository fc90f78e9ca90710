"""ZCA whitening (ddlib.zca) against an independent eigendecomposition, plus its file format."""

import numpy as np
import pytest
import torch

from ddlib.zca import MTT_EPS, ZCA


def _correlated_images(n=1500, shape=(2, 3, 3), seed=0):
    """Full-rank, strongly correlated toy 'images' with a non-zero mean, in float64."""
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, d, dtype=torch.float64)
    return (z @ mixing + 2.0).reshape(n, *shape)


def _numpy_zca(x, eps):
    """(x - mu) U diag(1 / sqrt(s + eps)) U^T from numpy's symmetric eigendecomposition."""
    flat = x.reshape(x.shape[0], -1).numpy()
    mu = flat.mean(0, keepdims=True)
    cov = (flat - mu).T @ (flat - mu) / (flat.shape[0] - 1)
    s, u = np.linalg.eigh(cov)
    w = u @ np.diag(1.0 / np.sqrt(s + eps)) @ u.T
    return torch.from_numpy((flat - mu) @ w).reshape(x.shape)


def test_whitened_covariance_is_identity_for_small_eps():
    x = _correlated_images()
    z = ZCA(eps=1e-10).fit(x)(x).reshape(x.shape[0], -1)
    cov = torch.cov(z.T)
    assert torch.allclose(z.mean(0), torch.zeros(z.shape[1], dtype=z.dtype), atol=1e-10)
    assert torch.allclose(cov, torch.eye(z.shape[1], dtype=z.dtype), atol=1e-6)
    # with MTT's eps = 0.1 the low-variance directions are damped: variances s / (s + eps) < 1
    damped = torch.cov(ZCA(MTT_EPS).fit(x)(x).reshape(x.shape[0], -1).T)
    assert (damped.diagonal() < 1).all() and (damped.diagonal() > 0.5).all()


@pytest.mark.parametrize("eps", [1e-3, MTT_EPS])
def test_matches_an_independent_eigendecomposition(eps):
    x = _correlated_images(n=400)
    ours = ZCA(eps).fit(x)(x)
    assert torch.allclose(ours, _numpy_zca(x, eps), atol=1e-9)


def test_invert_undoes_apply_and_batching_changes_nothing():
    x = _correlated_images(n=300)
    zca = ZCA().fit(x)
    z = zca(x)
    assert torch.allclose(zca.invert(z), x, atol=1e-10)
    assert torch.allclose(zca.apply(x, batch_size=7), z, atol=1e-12)
    assert torch.allclose(zca.invert(z, batch_size=7), x, atol=1e-10)
    # float32 images work with a float64 fit (the state is cast to the images' dtype)
    assert torch.allclose(zca(x.float()).double(), z, atol=1e-3)


def test_apply_is_differentiable():
    x = _correlated_images(n=50)
    zca = ZCA().fit(x)
    syn = x[:3].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: zca.invert(s), (syn,))


def test_save_load_roundtrip(tmp_path):
    x = _correlated_images(n=200)
    zca = ZCA(0.05, dataset="toy").fit(x)
    path = zca.save(tmp_path / "sub" / "zca.safetensors")
    back = ZCA.load(path)
    assert (back.eps, back.dataset, back.shape, back.num_fit) == (0.05, "toy", (2, 3, 3), 200)
    assert torch.equal(back(x), zca(x)) and torch.equal(back.invert(x), zca.invert(x))
    assert "shape=(2, 3, 3)" in repr(back)
    unnamed = ZCA.load(ZCA().fit(x).save(tmp_path / "plain.safetensors"))
    assert unnamed.dataset is None and unnamed.eps == MTT_EPS


def test_clear_errors(tmp_path):
    x = _correlated_images(n=50)
    with pytest.raises(RuntimeError, match="not fitted"):
        ZCA()(x)
    with pytest.raises(RuntimeError, match="unfitted"):
        ZCA().save(tmp_path / "z.safetensors")
    zca = ZCA().fit(x)
    with pytest.raises(ValueError, match=r"fitted on images of shape \(2, 3, 3\)"):
        zca(torch.zeros(4, 1, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"fitted on images of shape \(2, 3, 3\)"):
        zca.invert(torch.zeros(4, 2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least two images"):
        ZCA().fit(x[:1])
    with pytest.raises(ValueError, match="eps"):
        ZCA(eps=-1.0)
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a ddlib ZCA file"):
        ZCA.load(tmp_path / "other.safetensors")
