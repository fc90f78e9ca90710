"""Self-supervised teachers (Barlow Twins) and the gradient-noise measurement behind MKDT.

Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny; ICML 2021, eq. 1). Two augmented views of a batch go
through the same backbone and projector, giving embeddings z^A, z^B of shape (N, D). Each embedding
dimension is standardised over the batch (mean 0, biased std 1, what a BatchNorm1d without affine
parameters does in training mode), and the cross-correlation matrix

    C_ij = (1/N) sum_b  zn^A_bi zn^B_bj

is pushed towards the identity:

    L_BT = sum_i (1 - C_ii)^2  +  lambda * sum_i sum_{j != i} C_ij^2        (lambda ~ 5e-3 in the paper).

The on-diagonal term makes the two views agree (invariance); the off-diagonal term decorrelates the
dimensions (no collapse). After training the projector is dropped: the teacher's *representation*
is the backbone's pooled feature vector (512-d for the CIFAR ResNet-18 used by MKDT).

Teachers are stored as one safetensors file holding the backbone's state (parameters and batch-norm
statistics) and, as metadata, the :class:`TeacherSpec` (dataset, model, width, epochs, seed, ...) and
the ddlib version; the file name carries the spec's hash, so a notebook run with the same parameters
reuses the stored teacher (:func:`ensure_teacher`). :func:`load_teacher` refuses a file made for
another dataset, model or width with a :class:`TeacherMismatchError`.

Augmentation (kornia, applied to normalised images: colour ops un-normalise, act in [0, 1], re-normalise):
``"digits"`` (small images of strokes: random resized crop with mild scale, small affine jitter, no flips
and no colour ops) and ``"cifar"`` (the Barlow Twins recipe at 32x32: resized crop, flip, colour jitter,
grayscale, solarisation; Gaussian blur is left out at this size as in most CIFAR re-implementations).

:func:`gradient_noise` is the measurement for MKDT's argument that SSL trajectories are hard to match:
the spread of mini-batch gradients around their mean, relative to the mean's size.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import __version__

FORMAT = "ddlib-teacher-v1"
AUGMENTATIONS = ("digits", "cifar", "none")


# ----------------------------------------------------------------------------- the loss

def standardise(z: Tensor, eps: float = 1e-5) -> Tensor:
    """Each column of ``z`` (N, D) to mean 0 and (biased) std 1 over the batch."""
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


def cross_correlation(z1: Tensor, z2: Tensor, eps: float = 1e-5) -> Tensor:
    """C (D, D) of two views' embeddings, each standardised over the batch."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"two views need embeddings of one shape (N, D); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError("the cross-correlation needs a batch of at least 2 examples")
    return standardise(z1, eps).T @ standardise(z2, eps) / z1.shape[0]


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 5e-3, eps: float = 1e-5) -> Tensor:
    """Zbontar et al. 2021, eq. 1: sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2."""
    c = cross_correlation(z1, z2, eps)
    diag = torch.diagonal(c)
    on = (1 - diag).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return on + lambd * off


def projector(in_dim: int, dims: Sequence[int]) -> nn.Sequential:
    """The Barlow Twins projector: (Linear -> BatchNorm1d -> ReLU) for every dim but the last, then Linear."""
    if not dims:
        return nn.Sequential(nn.Identity())
    layers: list[nn.Module] = []
    width = in_dim
    for d in dims[:-1]:
        layers += [nn.Linear(width, int(d), bias=False), nn.BatchNorm1d(int(d)), nn.ReLU()]
        width = int(d)
    layers.append(nn.Linear(width, int(dims[-1]), bias=False))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- augmentation

def two_view_augment(kind: str, input_shape: Sequence[int], mean: Sequence[float] = (0.0,),
                     std: Sequence[float] = (1.0,)) -> Callable[[Tensor], Tensor]:
    """``augment(x)`` -> one random view of the normalised batch ``x`` (call twice for two views).

    Randomness comes from torch's global generator (kornia's convention): seed it for reproducible runs.
    """
    import kornia.augmentation as K

    if kind not in AUGMENTATIONS:
        raise ValueError(f"augmentation {kind!r} is unknown; use one of {AUGMENTATIONS}")
    if kind == "none":
        return lambda x: x
    _, h, w = (int(s) for s in input_shape)
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    if kind == "digits":
        geometric = K.AugmentationSequential(
            K.RandomResizedCrop((h, w), scale=(0.6, 1.0), ratio=(0.8, 1.25)),
            K.RandomAffine(degrees=10.0, translate=(0.1, 0.1), p=0.5))
        colour = None
    else:
        geometric = K.AugmentationSequential(K.RandomResizedCrop((h, w), scale=(0.2, 1.0)),
                                             K.RandomHorizontalFlip())
        colour = K.AugmentationSequential(K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8), K.RandomGrayscale(p=0.2),
                                          K.RandomSolarize(0.0, 0.0, p=0.2))

    def augment(x: Tensor) -> Tensor:
        out = geometric(x)
        if colour is not None and x.shape[1] == 3:
            mm, ss = m.to(x.device), s.to(x.device)
            out = (colour((out * ss + mm).clamp(0, 1)) - mm) / ss
        return out

    return augment


# ----------------------------------------------------------------------------- teacher spec and storage

@dataclass(frozen=True)
class TeacherSpec:
    """Everything that defines a Barlow Twins teacher; stored with the teacher file."""

    dataset: str
    model: str
    input_shape: tuple
    model_kwargs: dict = field(default_factory=dict)
    projector: tuple = (256, 256)      # paper-scale Barlow Twins: (8192, 8192, 8192) on ImageNet, 2048 on CIFAR
    lambd: float = 5e-3
    augment: str = "digits"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3                   # Adam (weight decay below); the original uses LARS at large batch
    weight_decay: float = 1e-6
    train_size: int = 0                # number of training images seen (recorded, part of the key)
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(v) for v in self.input_shape))
        object.__setattr__(self, "projector", tuple(int(v) for v in self.projector))
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment={self.augment!r} is unknown; use one of {AUGMENTATIONS}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"epochs={self.epochs} must be >= 1 and batch_size={self.batch_size} >= 2")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TeacherSpec":
        return cls(**json.loads(text))

    def key(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    def file_name(self) -> str:
        return f"teacher_{self.dataset}_{self.model}_{self.key()}.safetensors"

    def build_backbone(self) -> nn.Module:
        from .models import build
        return build(self.model, self.input_shape, 0, **self.model_kwargs)


class TeacherMismatchError(ValueError):
    """A teacher made for another dataset, model or representation width than the run needs."""


@dataclass
class Teacher:
    """A trained SSL backbone (projector dropped), its spec and its training-loss curve."""

    backbone: nn.Module
    spec: TeacherSpec
    losses: list = field(default_factory=list)
    seconds: float = 0.0
    path: Path | None = None

    @property
    def key(self) -> str:
        return self.spec.key()

    @property
    def width(self) -> int:
        """The representation width D (the KD students' head must have this many outputs)."""
        return int(self.backbone.feature_dim)

    def check(self, dataset: str | None = None, model: str | None = None, width: int | None = None) -> "Teacher":
        diffs = []
        for name, want, have in (("dataset", dataset, self.spec.dataset), ("model", model, self.spec.model),
                                 ("width", width, self.width)):
            if want is not None and want != have:
                diffs.append(f"{name}: teacher has {have!r}, this run needs {want!r}")
        if diffs:
            where = f" ({self.path})" if self.path else ""
            raise TeacherMismatchError("the teacher" + where + " was made for another setting (" + "; ".join(diffs)
                                       + "). Train a teacher for this setting or point to its file.")
        return self


def save_teacher(teacher: Teacher, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in teacher.backbone.state_dict().items()}
    meta = {"format": FORMAT, "spec": teacher.spec.to_json(), "dataset": teacher.spec.dataset,
            "model": teacher.spec.model, "width": str(teacher.width), "epochs": str(teacher.spec.epochs),
            "seed": str(teacher.spec.seed), "ddlib_version": __version__, "losses": json.dumps(teacher.losses),
            "seconds": str(teacher.seconds)}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_teacher(path: str | Path, device="cpu", *, dataset: str | None = None, model: str | None = None,
                 width: int | None = None) -> Teacher:
    """Read a stored teacher and check it against what the run needs (:class:`TeacherMismatchError`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no teacher file at {path}; train one with ddlib.ssl.ensure_teacher")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ddlib teacher file (no '{FORMAT}' metadata)")
    spec = TeacherSpec.from_json(meta["spec"])
    backbone = spec.build_backbone()
    backbone.load_state_dict(load_file(str(path)))
    teacher = Teacher(backbone.to(device).eval(), spec, json.loads(meta.get("losses", "[]")),
                      float(meta.get("seconds", 0.0)), path)
    return teacher.check(dataset, model, width)


# ----------------------------------------------------------------------------- training

class BarlowTwins(nn.Module):
    """Backbone (features only) + projector; ``forward`` gives the projected embedding."""

    def __init__(self, backbone: nn.Module, projector_dims: Sequence[int]):
        super().__init__()
        self.backbone = backbone
        self.projector = projector(backbone.feature_dim, projector_dims)

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))


def train_teacher(spec: TeacherSpec, x: Tensor, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                  progress: bool = True) -> Teacher:
    """Barlow Twins on the images ``x`` (labels are never seen). Deterministic for a given spec on CPU."""
    if spec.train_size and spec.train_size != x.shape[0]:
        raise ValueError(f"the spec says train_size={spec.train_size} but x has {x.shape[0]} images")
    if tuple(x.shape[1:]) != spec.input_shape:
        raise ValueError(f"images of shape {tuple(x.shape[1:])} do not fit the spec's input_shape {spec.input_shape}")
    device = x.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        net = BarlowTwins(spec.build_backbone(), spec.projector).to(device)
        augment = two_view_augment(spec.augment, spec.input_shape, mean, std)
        opt = torch.optim.Adam(net.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        g = torch.Generator().manual_seed(spec.seed + 1)
        n, losses = x.shape[0], []
        epochs: Iterable[int] = range(spec.epochs)
        if progress:
            from tqdm.auto import tqdm
            epochs = tqdm(epochs, desc="Barlow Twins teacher", mininterval=2.0)
        t0 = time.perf_counter()
        net.train()
        for _ in epochs:
            perm = torch.randperm(n, generator=g).to(device)
            total, count = torch.zeros((), device=device), 0
            for i in range(0, n - 1, spec.batch_size):
                idx = perm[i:i + spec.batch_size]
                if idx.numel() < 2:
                    continue
                xb = x[idx]
                loss = barlow_twins_loss(net(augment(xb)), net(augment(xb)), spec.lambd)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count = total + loss.detach(), count + 1
            epoch_loss = float(total / max(count, 1))
            if not torch.isfinite(torch.tensor(epoch_loss)):
                raise FloatingPointError(f"Barlow Twins diverged (loss {epoch_loss}); lower the teacher lr ({spec.lr})")
            losses.append(epoch_loss)
        seconds = time.perf_counter() - t0
    backbone = net.backbone.eval()
    return Teacher(backbone, spec, losses, seconds)


def ensure_teacher(spec: TeacherSpec, x: Tensor, root: str | Path, mean: Sequence[float] = (0.0,),
                   std: Sequence[float] = (1.0,), progress: bool = True) -> Teacher:
    """The teacher for ``spec`` from ``root/<file named by its key>``, trained and stored first if missing."""
    path = Path(root) / spec.file_name()
    if path.exists():
        return load_teacher(path, x.device, dataset=spec.dataset, model=spec.model)
    teacher = train_teacher(spec, x, mean, std, progress=progress)
    save_teacher(teacher, path)
    teacher.path = path
    return teacher


@torch.no_grad()
def representations(teacher: Teacher | nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """The teacher's representations of ``x`` (eval mode, batched), shape (N, width)."""
    net = teacher.backbone if isinstance(teacher, Teacher) else teacher
    was_training = net.training
    net.eval()
    out = torch.cat([net(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    net.train(was_training)
    return out


# ----------------------------------------------------------------------------- gradient noise

def gradient_noise(loss_of_batch: Callable[[Tensor], Tensor], params: Sequence[Tensor],
                   batches: Sequence[Tensor]) -> float:
    """Relative variance of mini-batch gradients: mean_b ||g_b - g_bar||^2 / ||g_bar||^2.

    ``loss_of_batch(idx)`` computes a loss on the examples ``idx`` with the given ``params``; g_b is its
    gradient with respect to ``params`` and g_bar the mean over ``batches``. The ratio is 0 when every batch
    points the same way and grows as batches disagree: a trajectory built from such steps depends more on
    which batches it happened to see, which is what makes it hard to match (MKDT, sec. 4).
    """
    grads = []
    for idx in batches:
        g = torch.autograd.grad(loss_of_batch(idx), list(params))
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    stack = torch.stack(grads)
    mean = stack.mean(0)
    return float(((stack - mean) ** 2).sum(1).mean() / mean.pow(2).sum())
