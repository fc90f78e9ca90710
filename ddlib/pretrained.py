"""Pools of pre-trained networks: the "fixed pre-trained" and "random pre-trained" initialisations.

Wang et al. 2018, sec. 3.6, list four ways to draw theta_0 for distillation: a fixed random init,
random inits (eq. 3-4), one fixed **pre-trained** network, and **random pre-trained** networks
(networks trained on a task with different seeds, sampled afresh at every outer iteration). The
pre-trained kinds are what domain adaptation and the poisoning attack (sec. 3.7) start from.

A :class:`Pool` is ``n`` networks of one architecture, trained on one dataset from seeds ``seeds``,
with every seed's weights as a params dict for :func:`ddlib.unroll.unroll`. It is stored as one
safetensors file (tensors ``net{i}.{param}``) whose metadata records the model name, input shape,
number of classes, dataset, seeds, training hyper-parameters and the ddlib version.
:func:`load_pool` checks model, dataset, input shape and classes against what the caller expects
and raises a ``ValueError`` that names both before anything else happens; safetensors holds plain
arrays only, so loading a pool never unpickles anything.

:func:`cached_pool` trains a pool once and caches it under a run folder, keyed by a hash of
everything that determines it, so that re-running a notebook reuses it.

Samplers for :func:`ddlib.dd.distill`: ``pool.fixed(i)`` always returns member ``i`` (fixed
pre-trained); ``pool.sampler(members, seed)`` draws a member from ``members`` for every call
(random pre-trained). Keep the members used for distillation disjoint from those used for
evaluation (:meth:`Pool.split`), as the paper evaluates on held-out pre-trained networks.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import __version__
from .train import accuracy, train_classifier

FORMAT = "ddlib.pretrained_pool/1"


@dataclass
class Pool:
    """Pre-trained weights of ``len(seeds)`` networks of one architecture (see module doc)."""

    params: list[dict[str, Tensor]]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def seeds(self) -> list[int]:
        return list(self.meta.get("seeds", range(len(self.params))))

    def fixed(self, member: int = 0) -> Callable[[int], dict[str, Tensor]]:
        """Fixed pre-trained init: the same network ``member`` at every call."""
        self._check_member(member)
        theta = self.params[member]
        return lambda i: theta

    def sampler(self, members: Sequence[int] | None = None, seed: int = 0) -> Callable[[int], dict[str, Tensor]]:
        """Random pre-trained init: call ``i`` returns a member drawn uniformly from ``members``
        (default: all), reproducibly from ``(seed, i)``."""
        members = list(range(len(self))) if members is None else [int(m) for m in members]
        if not members:
            raise ValueError("sampler needs at least one pool member")
        for m in members:
            self._check_member(m)

        def sample(i: int) -> dict[str, Tensor]:
            g = torch.Generator().manual_seed((int(seed) + 1) * 1_000_003 + int(i))
            return self.params[members[int(torch.randint(len(members), (1,), generator=g))]]
        return sample

    def split(self, n_train: int) -> tuple[list[int], list[int]]:
        """Members ``0..n_train-1`` for distillation, the rest held out for evaluation."""
        if not 0 < n_train < len(self):
            raise ValueError(f"n_train={n_train}: a pool of {len(self)} networks needs 0 < n_train < {len(self)} "
                             f"so that some networks are held out for evaluation")
        return list(range(n_train)), list(range(n_train, len(self)))

    def to(self, device) -> "Pool":
        return Pool([{k: v.to(device) for k, v in p.items()} for p in self.params], dict(self.meta))

    def accuracies(self, model: nn.Module, x: Tensor, y: Tensor, members: Sequence[int] | None = None) -> list[float]:
        """Test accuracy of each member (no training)."""
        members = range(len(self)) if members is None else members
        return [accuracy(model, x, y, self.params[m]) for m in members]

    def _check_member(self, m: int) -> None:
        if not 0 <= m < len(self):
            raise ValueError(f"pool member {m} does not exist: the pool has {len(self)} networks (0..{len(self) - 1})")


# ----------------------------------------------------------------------------- training

def train_pool(make_model: Callable[[], nn.Module], x: Tensor, y: Tensor, seeds: Sequence[int], *, epochs: int,
               lr: float, batch_size: int = 64, momentum: float = 0.9, weight_decay: float = 5e-4,
               meta: dict | None = None, progress: bool = True) -> Pool:
    """Train one network per seed on (x, y) with :func:`ddlib.train.train_classifier` (SGD with momentum,
    lr x0.1 half-way). ``make_model()`` is called right after ``torch.manual_seed(seed)``, and the
    mini-batch order is drawn from a generator seeded the same way, so a member depends on its seed only."""
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds must be distinct and non-empty, got {seeds}")
    iterator = seeds
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(seeds, desc="pre-train", mininterval=2.0)
    params = []
    t0 = time.perf_counter()
    for s in iterator:
        torch.manual_seed(s)
        model = make_model().to(x.device)
        train_classifier(model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum,
                         weight_decay=weight_decay, generator=torch.Generator().manual_seed(s))
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    hyper = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "momentum": momentum,
             "weight_decay": weight_decay, "optimizer": "sgd", "lr_decay": "x0.1 at half"}
    return Pool(params, {**(meta or {}), "seeds": seeds, "training": hyper,
                         "train_seconds": round(time.perf_counter() - t0, 1)})


# ----------------------------------------------------------------------------- storage

def save_pool(pool: Pool, path: str | Path) -> Path:
    """One safetensors file; metadata as JSON strings (module doc). Written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"net{i}.{k}": v.detach().cpu().contiguous() for i, p in enumerate(pool.params) for k, v in p.items()}
    meta = {"format": FORMAT, "ddlib_version": __version__, "n": str(len(pool)),
            "meta": json.dumps(pool.meta, sort_keys=True)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def read_pool_meta(path: str | Path) -> dict:
    """The metadata of a pool file, without loading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pre-trained pool at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as err:  # not a safetensors file (e.g. a pickle): refuse, never unpickle
        raise ValueError(f"{path} is not a safetensors pool file ({err}); pools are never read with pickle") from err
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ddlib pre-trained pool (format {raw.get('format')!r}, expected {FORMAT!r})")
    return {**json.loads(raw["meta"]), "ddlib_version": raw.get("ddlib_version"), "n": int(raw["n"])}


def check_pool_meta(meta: dict, path, *, model: str, dataset: str, input_shape, num_classes: int) -> None:
    """ValueError naming the expected and the stored value for the first field that differs."""
    expected = {"model": str(model), "dataset": str(dataset), "input_shape": [int(s) for s in input_shape],
                "num_classes": int(num_classes)}
    for key, want in expected.items():
        have = meta.get(key)
        if have != want:
            raise ValueError(f"pre-trained pool {path} was trained with {key}={have!r}, but this run needs "
                             f"{key}={want!r}: use a pool of the same {key} (or delete the file to retrain)")


def load_pool(path: str | Path, *, model: str, dataset: str, input_shape, num_classes: int, device="cpu") -> Pool:
    """Load a pool saved by :func:`save_pool`, after checking that it fits (module doc)."""
    meta = read_pool_meta(path)
    check_pool_meta(meta, path, model=model, dataset=dataset, input_shape=input_shape, num_classes=num_classes)
    flat = load_file(str(path), device=str(device))
    params = [{} for _ in range(meta["n"])]
    for key, value in flat.items():
        net, name = key.split(".", 1)
        params[int(net[3:])][name] = value
    meta = {k: v for k, v in meta.items() if k not in ("n",)}
    return Pool(params, meta)


def pool_key(**fields) -> str:
    """A short hash of everything that determines a pool (its cache file name)."""
    blob = json.dumps({k: fields[k] for k in sorted(fields)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cached_pool(folder: str | Path, make_model: Callable[[], nn.Module], x: Tensor, y: Tensor, *, model: str,
                dataset: str, num_classes: int, seeds: Sequence[int], epochs: int, lr: float, batch_size: int = 64,
                momentum: float = 0.9, weight_decay: float = 5e-4, init: str = "xavier",
                progress: bool = True) -> tuple[Pool, Path, bool]:
    """The pool for these settings from ``folder/pool_<key>.safetensors``, trained and saved on first use.

    Returns ``(pool, path, reused)``. The key covers model, init, dataset, the data's shape and size,
    seeds and training hyper-parameters, so a changed setting never picks up a stale pool.
    """
    input_shape = [int(s) for s in x.shape[1:]]
    seeds = [int(s) for s in seeds]
    key = pool_key(model=model, init=init, dataset=dataset, input_shape=input_shape, n_train=int(x.shape[0]),
                   num_classes=int(num_classes), seeds=seeds, epochs=epochs, lr=lr, batch_size=batch_size,
                   momentum=momentum, weight_decay=weight_decay, version=__version__)
    path = Path(folder) / f"pool_{key}.safetensors"
    if path.exists():
        pool = load_pool(path, model=model, dataset=dataset, input_shape=input_shape, num_classes=num_classes,
                         device=x.device)
        return pool, path, True
    meta = {"model": model, "init": init, "dataset": dataset, "input_shape": input_shape,
            "num_classes": int(num_classes), "key": key}
    pool = train_pool(make_model, x, y, seeds, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum,
                      weight_decay=weight_decay, meta=meta, progress=progress)
    save_pool(pool, path)
    return pool, path, False
