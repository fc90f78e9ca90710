"""Expert trajectories: train networks on real data and store their parameters after every epoch.

Matching Training Trajectories (Cazenavette et al. 2022, sec. 3.1) needs a buffer of *expert
trajectories* theta*_0, theta*_1, ..., theta*_E: the parameters of networks trained on the full
real data, saved after each epoch (paper: 100 experts x 50 epochs, SGD lr 0.01, no momentum,
batch 256, differentiable augmentation). MKDT (Joshi et al. 2025) stores its knowledge-distillation
experts the same way, with a regression objective and a teacher named in the metadata.

Format (safe, no pickle): one safetensors file per expert, ``expert_0007.safetensors``, holding
``e003/<param name>`` for every epoch 0..E and, as metadata, the :class:`ExpertSpec` (dataset, model,
ZCA, augmentation, objective, teacher, hyper-parameters, seed) and the ddlib version. A folder holds
experts of one spec only; :func:`load_buffer` checks the spec against what the caller needs and
refuses a buffer made for another dataset, model, ZCA setting or teacher.

Sharding and resume: expert i is seeded from (spec.seed, i) alone, so experts can be trained in any
order, by any number of processes (:func:`shard_experts`; e.g. one per GPU under ``torchrun`` or one
papermill run per shard) writing into one folder or into several that :func:`merge_buffers` joins;
the result is the same as one process training them all. An expert in progress is saved every
``save_every`` epochs (with its momentum and random-number state) and continues from there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import __version__

OBJECTIVES = ("ce", "mse")  # class labels (MTT) or regression targets such as teacher representations (MKDT)
FORMAT = "ddlib-expert-v1"
AugmentFactory = Callable[[torch.Generator], "Callable[[Tensor], Tensor] | None"]


@dataclass(frozen=True)
class ExpertSpec:
    """Everything that defines an expert trajectory; stored with every expert file."""

    dataset: str
    model: str
    input_shape: tuple
    num_outputs: int                  # classes (objective "ce") or target width (objective "mse")
    model_kwargs: dict = field(default_factory=dict)
    init: str = "default"
    zca: bool = False
    augment: str = "none"             # DSA strategy used while training (ddlib.augment), "none" for plain
    objective: str = "ce"
    teacher: str = ""                 # MKDT: key of the teacher whose representations are the targets
    lr: float = 0.01                  # MTT: lr_teacher
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 256
    drop_last: bool = True            # an epoch = n // batch_size full batches of a fresh permutation (see below)
    epochs: int = 50
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} is unknown; use one of {OBJECTIVES}")
        for name in ("epochs", "batch_size", "num_outputs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ExpertSpec":
        values = json.loads(text)
        values.setdefault("drop_last", False)  # files written before the field existed kept the partial batch
        return cls(**values)

    def key(self) -> str:
        """Short hash of the spec: the folder name that lets notebook runs reuse their experts."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    def folder_name(self) -> str:
        return f"{self.dataset}_{self.model}_{self.key()}"

    def build_model(self) -> nn.Module:
        from .models import build
        return build(self.model, self.input_shape, self.num_outputs, init=self.init, **self.model_kwargs)


def expert_seed(spec: ExpertSpec, index: int) -> int:
    """Seed of expert ``index``: a function of (spec.seed, index) only, so shards agree."""
    return (spec.seed + 1) * 1_000_003 + index + 7_919


def shard_experts(num_experts: int, shard: int = 0, num_shards: int = 1) -> range:
    """The expert indices shard ``shard`` of ``num_shards`` trains (contiguous blocks)."""
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be >= 1")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard={shard} must be in [0, num_shards={num_shards})")
    per = -(-num_experts // num_shards)
    return range(min(shard * per, num_experts), min((shard + 1) * per, num_experts))


def expert_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"expert_{index:04d}.safetensors"


# ----------------------------------------------------------------------------- training

def _epoch_key(epoch: int, name: str) -> str:
    return f"e{epoch:03d}/{name}"


def _write(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def train_expert(spec: ExpertSpec, index: int, x: Tensor, y: Tensor, folder: str | Path,
                 augment: AugmentFactory | None = None, save_every: int = 5, progress: bool = False) -> Path:
    """Train expert ``index`` of ``spec`` on (x, y) and store its per-epoch parameters.

    ``y`` holds class indices (objective ``"ce"``) or regression targets (``"mse"``).
    ``augment(generator)`` returns the per-batch augmentation (e.g. ``ddlib.augment.batch_augment``)
    drawing its randomness from the expert's own generator. Resumes a partially trained expert;
    returns at once if the expert is complete.

    With ``spec.drop_last`` the images left over after the last full batch of an epoch's permutation sit
    that epoch out (each epoch draws a new permutation, so none is left out for long). A small remainder
    batch is a full-lr step on a very noisy gradient taken right before the epoch's parameters are stored:
    on digits (1347 training images, batch 32) a 3-image last step made the stored experts' test accuracy
    swing between 0.5 and 0.95 from epoch to epoch, and trajectory matching imitates exactly those points.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = expert_path(folder, index)
    partial = path.with_name(path.stem + ".partial.safetensors")
    if path.exists():
        return path
    if spec.objective == "ce" and y.dtype != torch.int64:
        raise ValueError("objective 'ce' needs integer class labels y")
    if spec.objective == "mse" and (y.ndim != 2 or y.shape[1] != spec.num_outputs):
        raise ValueError(f"objective 'mse' needs targets of shape (N, {spec.num_outputs}); got {tuple(y.shape)}")
    generator = torch.Generator().manual_seed(expert_seed(spec, index))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(expert_seed(spec, index))
        model = spec.build_model().to(x.device)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    names = [n for n, _ in model.named_parameters()]
    saved: dict[str, Tensor] = {_epoch_key(0, n): p.detach().clone() for n, p in model.named_parameters()}
    start = 0
    if partial.exists():
        start = _resume(partial, spec, model, opt, generator, saved)
    aug = augment(generator) if augment is not None else None
    loss_fn = F.cross_entropy if spec.objective == "ce" else F.mse_loss
    n = x.shape[0]
    epochs = range(start, spec.epochs)
    if progress:
        from tqdm.auto import tqdm
        epochs = tqdm(epochs, initial=start, total=spec.epochs, desc=f"expert {index}", leave=False)
    model.train()
    for epoch in epochs:
        perm = torch.randperm(n, generator=generator).to(x.device)
        end = max(n - n % spec.batch_size, min(n, spec.batch_size)) if spec.drop_last else n
        for i in range(0, end, spec.batch_size):
            idx = perm[i:i + spec.batch_size]
            xb = x[idx] if aug is None else aug(x[idx])
            loss = loss_fn(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"expert {index} diverged in epoch {epoch + 1} (loss {loss.item()}); "
                                     f"lower the expert lr (now {spec.lr})")
        saved.update({_epoch_key(epoch + 1, n): p.detach().clone() for n, p in model.named_parameters()})
        if save_every and (epoch + 1) % save_every == 0 and epoch + 1 < spec.epochs:
            _save_partial(partial, spec, index, epoch + 1, saved, model, opt, generator)
    meta = {"format": FORMAT, "spec": spec.to_json(), "expert": str(index), "epochs": str(spec.epochs),
            "params": json.dumps(names), "ddlib_version": __version__}
    _write(path, saved, meta)
    partial.unlink(missing_ok=True)
    return path


def _save_partial(path, spec, index, epochs_done, saved, model, opt, generator):
    state = dict(saved)
    for n, p in model.named_parameters():
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            state[f"momentum/{n}"] = buf
    state["rng"] = generator.get_state()
    _write(path, state, {"format": FORMAT + "-partial", "spec": spec.to_json(), "expert": str(index),
                         "epochs_done": str(epochs_done)})


def _resume(path, spec, model, opt, generator, saved) -> int:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("spec") != spec.to_json():
        raise ValueError(f"{path} belongs to another expert configuration; delete it to start over")
    t = load_file(str(path))
    done = int(meta["epochs_done"])
    saved.update({k: v.to(saved[_epoch_key(0, k.split('/', 1)[1])].device) for k, v in t.items()
                  if k.startswith("e")})
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(t[_epoch_key(done, n)])
            if f"momentum/{n}" in t:
                opt.state[p]["momentum_buffer"] = t[f"momentum/{n}"].to(p.device)
    generator.set_state(t["rng"])
    return done


def train_experts(spec: ExpertSpec, x: Tensor, y: Tensor, folder: str | Path, experts: Iterable[int],
                  augment: AugmentFactory | None = None, save_every: int = 5, progress: bool = True) -> list[Path]:
    """Train (or finish, or skip when done) the given expert indices; see :func:`shard_experts`."""
    experts = list(experts)
    iterator = experts
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(experts, desc="experts", mininterval=2.0)
    return [train_expert(spec, i, x, y, folder, augment, save_every, progress=False) for i in iterator]


# ----------------------------------------------------------------------------- loading

class BufferMismatchError(ValueError):
    """An expert buffer made for another dataset, model, ZCA setting or teacher."""


class ExpertBuffer:
    """The complete experts of one folder, read lazily (one expert file at a time)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"expert buffer folder {self.folder} does not exist; train experts first "
                                    f"(ddlib.buffers.train_experts) or point to the folder that holds them")
        self.paths = sorted(p for p in self.folder.glob("expert_*.safetensors") if ".partial" not in p.name)
        if not self.paths:
            partial = list(self.folder.glob("expert_*.partial.safetensors"))
            more = f" ({len(partial)} unfinished; re-run the expert training to finish them)" if partial else ""
            raise FileNotFoundError(f"no complete expert files (expert_NNNN.safetensors) in {self.folder}{more}")
        specs = {}
        for p in self.paths:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{p} is not a ddlib expert file (no '{FORMAT}' metadata); remove it from "
                                 f"{self.folder}")
            specs[p] = meta["spec"]
        if len(set(specs.values())) > 1:
            raise ValueError(f"{self.folder} mixes experts of different configurations; keep one per folder")
        self.spec = ExpertSpec.from_json(next(iter(specs.values())))
        self._cache: tuple[int, dict[str, Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def epochs(self) -> int:
        return self.spec.epochs

    def check(self, **expected) -> "ExpertBuffer":
        """Raise :class:`BufferMismatchError` if a spec field differs from ``expected`` (e.g.
        ``dataset="cifar10", model="convnet", zca=True``), naming every field that differs."""
        diffs = []
        for name, want in expected.items():
            if not hasattr(self.spec, name):
                raise TypeError(f"ExpertSpec has no field {name!r}")
            have = getattr(self.spec, name)
            if isinstance(have, tuple):
                want = tuple(want)
            if have != want:
                diffs.append(f"{name}: buffer has {have!r}, this run needs {want!r}")
        if diffs:
            raise BufferMismatchError(f"the expert buffer in {self.folder} was made for another setting ("
                                      + "; ".join(diffs) + "). Train experts for this setting or point to their folder.")
        return self

    def _load(self, expert: int) -> dict[str, Tensor]:
        if self._cache is None or self._cache[0] != expert:
            self._cache = (expert, load_file(str(self.paths[expert])))
        return self._cache[1]

    def params(self, expert: int, epoch: int, device="cpu") -> dict[str, Tensor]:
        """theta*_epoch of the expert-th expert in this folder, as a params dict."""
        if not 0 <= epoch <= self.epochs:
            raise IndexError(f"epoch {epoch} is outside this buffer's 0..{self.epochs}")
        t = self._load(expert)
        prefix = f"e{epoch:03d}/"
        return {k[len(prefix):]: v.to(device) for k, v in t.items() if k.startswith(prefix)}

    def check_range(self, max_start_epoch: int, expert_epochs: int) -> None:
        """MTT samples start epochs below ``max_start_epoch`` and needs ``expert_epochs`` more."""
        if max_start_epoch < 1 or expert_epochs < 1:
            raise ValueError(f"max_start_epoch={max_start_epoch} and expert_epochs={expert_epochs} must be >= 1")
        if max_start_epoch - 1 + expert_epochs > self.epochs:
            raise ValueError(f"max_start_epoch={max_start_epoch} + expert_epochs={expert_epochs} needs epoch "
                             f"{max_start_epoch - 1 + expert_epochs} but the experts in {self.folder} have "
                             f"{self.epochs} epochs; lower one of them or train longer experts")


def load_buffer(folder: str | Path, **expected) -> ExpertBuffer:
    """Open an expert folder and check it was made for ``expected`` (see :meth:`ExpertBuffer.check`)."""
    return ExpertBuffer(folder).check(**expected)


def merge_buffers(shard_folders: Iterable[str | Path], out: str | Path) -> ExpertBuffer:
    """Join expert folders trained as shards into ``out`` (copies; same spec required, distinct indices)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = None
    for folder in shard_folders:
        buf = ExpertBuffer(folder)
        if spec is not None and buf.spec != spec:
            raise BufferMismatchError(f"{folder} holds experts of another configuration than the other shards")
        spec = buf.spec
        for p in buf.paths:
            target = out / p.name
            if target.exists():
                if target.read_bytes() != p.read_bytes():
                    raise ValueError(f"{p.name} exists in two shards with different contents")
                continue
            shutil.copyfile(p, target)
    return ExpertBuffer(out)


def ensure_experts(spec: ExpertSpec, x: Tensor, y: Tensor, root: str | Path, num_experts: int,
                   augment: AugmentFactory | None = None, progress: bool = True) -> ExpertBuffer:
    """The buffer for ``spec`` under ``root/<spec folder>``, training whatever experts are missing.

    Notebook runs call this: a second run with the same spec reuses the stored experts.
    """
    folder = Path(root) / spec.folder_name()
    train_experts(spec, x, y, folder, range(num_experts), augment=augment, progress=progress)
    return ExpertBuffer(folder)


def trajectory_distances(buf: ExpertBuffer, expert: int = 0) -> Tensor:
    """||theta*_e - theta*_0|| for e = 0..E: how far an expert walks (a sanity figure)."""
    start = buf.params(expert, 0)
    out = []
    for e in range(buf.epochs + 1):
        p = buf.params(expert, e)
        out.append(torch.sqrt(sum(((p[k] - start[k]) ** 2).sum() for k in start)))
    return torch.stack(out)


def flat(params: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])
