"""ZCA whitening of image datasets, fitted once and saved with its state.

MTT (Cazenavette et al., CVPR 2022, sec. 4 and the official code) whitens CIFAR images with ZCA
(kornia's ``ZCAWhitening``, regularisation eps = 0.1) fitted on the normalised training images and
applied to the training and test images; the synthetic images are learned in whitened space and
un-whitened for display. With the flattened training images X (N x D), mean mu and covariance
Sigma = (X - mu)^T (X - mu) / (N - 1) = U diag(s) U^T (Bell & Sejnowski 1997; Krizhevsky 2009, app. A):

    zca(x)     = (x - mu) W,       W     = U diag(1 / sqrt(s + eps)) U^T
    zca^-1(z)  = z W^-1 + mu,      W^-1  = U diag(sqrt(s + eps)) U^T

eps > 0 damps the directions of small variance (eps -> 0 gives exactly identity covariance).
The fit runs through ``kornia.enhance.zca_mean`` (in the data's dtype and device; it holds one
centred copy of the data); application is batched so that tens of thousands of images need only
one batch of extra memory. :meth:`ZCA.save` writes a safetensors file whose metadata records eps,
the image shape, the number of images fitted on and the dataset name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from kornia.enhance import linear_transform, zca_mean
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

MTT_EPS = 0.1


class ZCA:
    """ZCA whitening fitted on a set of images of one shape; ``zca(x)`` whitens, ``invert`` undoes it."""

    def __init__(self, eps: float = MTT_EPS, dataset: str | None = None):
        if not eps >= 0:
            raise ValueError(f"eps={eps} must be >= 0 (MTT uses {MTT_EPS})")
        self.eps = float(eps)
        self.dataset = dataset
        self.shape: tuple[int, ...] | None = None  # one image's shape, e.g. (3, 32, 32)
        self.num_fit = 0
        self.mean: Tensor | None = None       # (1, D)
        self.transform: Tensor | None = None  # W, (D, D)
        self.inverse: Tensor | None = None    # W^-1, (D, D)

    @property
    def fitted(self) -> bool:
        return self.transform is not None

    def fit(self, x: Tensor) -> "ZCA":
        """Fit mu and W on images ``x`` of shape (N, ...) with N >= 2 (unbiased covariance)."""
        if x.ndim < 2 or x.shape[0] < 2:
            raise ValueError(f"ZCA.fit needs at least two images, shape (N, ...); got {tuple(x.shape)}")
        transform, mean, inverse = zca_mean(x.detach(), dim=0, unbiased=True, eps=self.eps, return_inverse=True)
        self.transform, self.mean, self.inverse = transform, mean, inverse
        self.shape = tuple(x.shape[1:])
        self.num_fit = int(x.shape[0])
        return self

    def _check(self, x: Tensor) -> None:
        if not self.fitted:
            raise RuntimeError("this ZCA is not fitted: call fit(train_images) or ZCA.load(path) first")
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"ZCA was fitted on images of shape {self.shape}; got a batch of shape "
                             f"{tuple(x.shape)} (expected (N, {', '.join(map(str, self.shape))}))")

    def _batched(self, x: Tensor, matrix: Tensor, offset: Tensor, batch_size: int) -> Tensor:
        matrix = matrix.to(device=x.device, dtype=x.dtype)
        offset = offset.to(device=x.device, dtype=x.dtype)
        outs = [linear_transform(x[i:i + batch_size], matrix, offset, 0) for i in range(0, x.shape[0], batch_size)]
        return torch.cat(outs) if outs else x.clone()

    def apply(self, x: Tensor, batch_size: int = 4096) -> Tensor:
        """Whitened images (x - mu) W, same shape as ``x``; differentiable in ``x``."""
        self._check(x)
        return self._batched(x, self.transform, self.mean, batch_size)

    __call__ = apply

    def invert(self, z: Tensor, batch_size: int = 4096) -> Tensor:
        """Back from whitened space: z W^-1 + mu (e.g. to display synthetic images)."""
        self._check(z)
        # linear_transform computes (z - offset) M, so offset = -mu W gives z W^-1 + mu
        offset = -self.mean.mm(self.transform)
        return self._batched(z, self.inverse, offset, batch_size)

    def to(self, device=None, dtype=None) -> "ZCA":
        """Move (and optionally cast) the fitted state, in place."""
        for name in ("mean", "transform", "inverse"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device=device, dtype=dtype))
        return self

    # ------------------------------------------------------------------------- files

    def save(self, path: str | Path) -> Path:
        """Safetensors file with the fitted state; metadata: eps, shape, num_fit, dataset."""
        if not self.fitted:
            raise RuntimeError("cannot save an unfitted ZCA")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"kind": "ddlib.zca", "eps": repr(self.eps), "shape": json.dumps(list(self.shape)),
                "num_fit": str(self.num_fit), "dataset": json.dumps(self.dataset), "unbiased": "true"}
        tensors = {"mean": self.mean, "transform": self.transform, "inverse": self.inverse}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "ZCA":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("kind") != "ddlib.zca":
            raise ValueError(f"{path} is not a ddlib ZCA file (metadata kind={meta.get('kind')!r})")
        zca = cls(float(meta["eps"]), json.loads(meta["dataset"]))
        tensors = load_file(str(path), device=str(device))
        zca.mean, zca.transform, zca.inverse = tensors["mean"], tensors["transform"], tensors["inverse"]
        zca.shape = tuple(json.loads(meta["shape"]))
        zca.num_fit = int(meta["num_fit"])
        return zca

    def __repr__(self) -> str:
        state = f"shape={self.shape}, num_fit={self.num_fit}" if self.fitted else "unfitted"
        return f"ZCA(eps={self.eps}, dataset={self.dataset!r}, {state})"
