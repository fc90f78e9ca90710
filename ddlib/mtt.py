"""Matching Training Trajectories (Cazenavette, Wang, Torralba, Efros, Zhu; CVPR 2022).

Each distillation iteration (sec. 3.2, Algorithm 1):

1. sample an expert trajectory theta*_0..theta*_E from the buffer (:mod:`ddlib.buffers`) and a start
   epoch t < ``max_start_epoch``;
2. from theta_hat_0 = theta*_t, take N = ``syn_steps`` SGD steps on (mini-batches of) the synthetic
   set with one learned step size alpha (the shared differentiable unroll, :func:`ddlib.unroll.unroll`,
   full or exact low-memory mode, with differentiable augmentation as its per-step ``transform``);
3. score the student against the expert M = ``expert_epochs`` epochs later (eq. 2)::

       L = || theta_hat_N - theta*_{t+M} ||^2  /  || theta*_t - theta*_{t+M} ||^2

   (the normaliser makes late epochs, where experts move little, count as much as early ones);
4. update the images (SGD, ``lr_img``, momentum 0.5), alpha (SGD, ``lr_lr``, momentum 0.5) and,
   optionally, learned labels or targets (``lr_label``).

The inner objective is a parameter: cross-entropy on class labels (MTT), cross-entropy on learned
soft labels, or MSE to learned target representations (MKDT, :mod:`ddlib.mkdt`). The known failure
of the method, a learned alpha that turns NaN, negative or explodes, stops the run with an error that
says which lr to lower; the last good state is saved, and runs checkpoint and resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .alloc import heap_reuse
from .buffers import ExpertBuffer
from .checkpoints import refuse_longer_checkpoint
from .train import EvalResult, evaluate_protocol, soft_cross_entropy, train_classifier
from .unroll import MODES, Transform, minibatch_schedule, unroll

TransformFactory = Callable[[int], "Transform | None"]   # base seed -> transform(x, step)
InnerLoss = Callable[[Tensor, Tensor], Tensor]


@dataclass
class MTTConfig:
    """Hyper-parameters of one MTT run (defaults: the paper's CIFAR-10 IPC 10 row)."""

    ipc: int = 10                 # synthetic images per class
    syn_steps: int = 30           # N: student steps per iteration
    expert_epochs: int = 2        # M: expert epochs the N steps must match
    max_start_epoch: int = 20     # start epochs t are drawn from 0..max_start_epoch-1
    iterations: int = 5000        # distillation iterations
    lr_img: float = 1000.0        # SGD lr on the pixels
    lr_lr: float = 1e-5           # SGD lr on the learned student lr alpha
    lr_teacher: float = 0.01      # alpha's initial value (the experts' lr)
    lr_label: float = 0.0         # >0: learn the labels / targets too, with this SGD lr
    momentum: float = 0.5         # of the three SGD optimisers (the official value)
    batch_syn: int = 0            # synthetic images per student step (0: all)
    unroll_mode: str = "full"     # "full" or "lowmem" (same gradients, flat activation memory)
    lr_explode: float = 100.0     # stop when alpha exceeds this multiple of lr_teacher
    checkpoint_every: int = 100   # iterations between checkpoints (0: never)

    def validate(self) -> "MTTConfig":
        for name in ("ipc", "syn_steps", "expert_epochs", "max_start_epoch", "iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("lr_img", "lr_lr", "lr_teacher"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value} must be a positive number")
        if self.lr_label < 0 or self.batch_syn < 0:
            raise ValueError(f"lr_label={self.lr_label} and batch_syn={self.batch_syn} must be >= 0")
        if self.unroll_mode not in MODES:
            raise ValueError(f"unroll_mode={self.unroll_mode!r} is unknown; use one of {MODES}")
        return self

    def key(self, **extra) -> str:
        """Hash of what shapes the run (not ``iterations`` or ``checkpoint_every``): resume key."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("iterations", "checkpoint_every")}
        blob = json.dumps({**fields, **{k: str(v) for k, v in extra.items()}}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class SyntheticSet:
    """Images ``x`` (in the model's input space: normalised, ZCA-whitened if the run whitens), labels
    or targets ``y`` and the learned student lr ``lr``."""

    x: Tensor
    y: Tensor
    lr: Tensor
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"x": self.x.detach().cpu().contiguous(), "y": self.y.detach().cpu().contiguous(),
                   "lr": self.lr.detach().cpu().reshape(1)}, str(path),
                  metadata={"meta": json.dumps(self.meta, sort_keys=True, default=str)})
        return path

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "SyntheticSet":
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        t = load_file(str(path), device=str(device))
        return cls(t["x"], t["y"], t["lr"].reshape(()), meta)


def trajectory_loss(theta_hat: Mapping[str, Tensor], start: Mapping[str, Tensor],
                    target: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Eq. (2): normalised squared distance of the student to the expert's later checkpoint.

    Returns (loss, ||start - target||^2); the second is the normaliser (detached).
    """
    num = sum(((theta_hat[k] - target[k]) ** 2).sum() for k in target)
    den = sum(((start[k] - target[k]) ** 2).sum() for k in target)
    return num / den, den.detach()


@dataclass
class MTTLog:
    """Per-iteration loss, learned lr and start epoch; evaluations at chosen iterations; wall time."""

    losses: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    starts: list = field(default_factory=list)
    evals: list = field(default_factory=list)     # (iteration, value) pairs from ``evaluate_every``
    seconds: float = 0.0
    resumed_from: int = 0
    resumed_seconds: float = 0.0

    def curve(self, name: str) -> Tensor:
        values = getattr(self, name)
        return torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values]).cpu() if values \
            else torch.empty(0)


class LearnedLrError(FloatingPointError):
    """The learned student lr (or the loss) became NaN, non-positive or exploded."""


def distill(model: nn.Module, buffer: ExpertBuffer, x_init: Tensor, y_init: Tensor, cfg: MTTConfig, *,
            inner_loss: InnerLoss = soft_cross_entropy, transform: TransformFactory | None = None,
            generator: torch.Generator | None = None, checkpoint: str | Path | None = None,
            evaluate: Callable[[SyntheticSet], float] | None = None, evaluate_every: int = 0,
            progress: bool = True, reuse_heap: bool = True) -> tuple[SyntheticSet, MTTLog]:
    """Algorithm 1 of Cazenavette et al. 2022 on the experts in ``buffer``. Returns the set and the log.

    ``x_init``/``y_init``: the starting synthetic set (real images or noise; class indices, soft-label
    logits or target vectors). ``transform(seed)`` gives the differentiable augmentation of one
    iteration as a ``transform(x, step)`` (its seed is drawn from ``generator``, so a resumed run
    continues the same random stream). ``evaluate(current_set)`` is called every ``evaluate_every``
    iterations and at the end, its values kept in ``log.evals``. ``reuse_heap``: on CPU, run the loop
    under :func:`ddlib.alloc.heap_reuse` (same numbers; CIFAR-10 IPC 10: 45.6 instead of 79.7 CPU
    seconds per iteration, results/bench/mtt_shipped.md; a small set's activations gain little).
    """
    cfg.validate()
    buffer.check_range(cfg.max_start_epoch, cfg.expert_epochs)
    device = x_init.device
    generator = generator or torch.Generator().manual_seed(0)
    x_syn = x_init.detach().clone().requires_grad_(True)
    learn_y = cfg.lr_label > 0
    if learn_y and not y_init.is_floating_point():
        raise ValueError("lr_label > 0 learns the labels: pass float y_init (soft-label logits or targets)")
    y_syn = y_init.detach().clone().requires_grad_(learn_y)
    lr_syn = torch.tensor(cfg.lr_teacher, device=device, requires_grad=True)
    opt_img = torch.optim.SGD([x_syn], lr=cfg.lr_img, momentum=cfg.momentum)
    opt_lr = torch.optim.SGD([lr_syn], lr=cfg.lr_lr, momentum=cfg.momentum)
    opt_y = torch.optim.SGD([y_syn], lr=cfg.lr_label, momentum=cfg.momentum) if learn_y else None
    optimisers = [o for o in (opt_img, opt_lr, opt_y) if o is not None]
    learned = {"x_syn": x_syn, "y_syn": y_syn, "lr_syn": lr_syn}

    log = MTTLog()
    ckpt = Path(checkpoint) if checkpoint else None
    start = _load_checkpoint(ckpt, learned, optimisers, generator, log) if ckpt and ckpt.exists() else 0
    if start:
        refuse_longer_checkpoint(ckpt, start, cfg.iterations, "iterations")
    last_good = _snapshot(learned, start)
    n_syn = x_syn.shape[0]
    batch = cfg.batch_syn or None

    iterator = range(start, cfg.iterations)
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, initial=start, total=cfg.iterations, desc="mtt", mininterval=2.0)
    t0 = time.perf_counter()
    # CPU: freed activations stay in the heap between student steps (ddlib.alloc; results unchanged)
    with heap_reuse(device, enabled=reuse_heap):
        for it in iterator:
            expert = int(torch.randint(len(buffer), (1,), generator=generator))
            t = int(torch.randint(cfg.max_start_epoch, (1,), generator=generator))
            theta_start = buffer.params(expert, t, device)
            theta_target = buffer.params(expert, t + cfg.expert_epochs, device)
            batches = minibatch_schedule(n_syn, batch, cfg.syn_steps, generator, device)
            aug = transform(int(torch.randint(2**31 - 1, (1,), generator=generator))) if transform else None

            theta_hat = unroll(model, theta_start, x_syn, y_syn, lr_syn, batches, loss_fn=inner_loss,
                               mode=cfg.unroll_mode, transform=aug)
            loss, _ = trajectory_loss(theta_hat, theta_start, theta_target)
            for o in optimisers:
                o.zero_grad(set_to_none=True)
            loss.backward()
            # one host sync per iteration: catch the learned lr's blow-up before it poisons the images
            loss_value, lr_value = float(loss.detach()), float(lr_syn.detach())
            if not (math.isfinite(loss_value) and math.isfinite(lr_value)):
                _fail(it, f"the trajectory loss is {loss_value} and the learned lr {lr_value}", cfg, last_good, ckpt)
            for o in optimisers:
                o.step()
            new_lr = float(lr_syn.detach())
            if not (0 < new_lr < cfg.lr_explode * cfg.lr_teacher) or not math.isfinite(new_lr):
                _fail(it, f"the learned lr became {new_lr} (started at {cfg.lr_teacher})", cfg, last_good, ckpt)
            log.losses.append(loss_value)
            log.lrs.append(new_lr)
            log.starts.append(t)
            last_good = _snapshot(learned, it + 1)
            done = it + 1
            if evaluate is not None and evaluate_every and done % evaluate_every == 0 and done < cfg.iterations:
                log.evals.append((done, evaluate(_current(learned, cfg))))
            if ckpt is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                _save_checkpoint(ckpt, learned, optimisers, generator, done, log, log.seconds + time.perf_counter() - t0)
    log.seconds += time.perf_counter() - t0
    if ckpt is not None and cfg.checkpoint_every and start < cfg.iterations:  # a finished checkpoint stays as it is
        _save_checkpoint(ckpt, learned, optimisers, generator, cfg.iterations, log, log.seconds)
    result = _current(learned, cfg)
    if evaluate is not None and (not log.evals or log.evals[-1][0] != cfg.iterations):
        log.evals.append((cfg.iterations, evaluate(result)))
    return result, log


def _current(learned: dict, cfg: MTTConfig) -> SyntheticSet:
    return SyntheticSet(learned["x_syn"].detach().clone(), learned["y_syn"].detach().clone(),
                        learned["lr_syn"].detach().clone(), asdict(cfg))


def _snapshot(learned: dict, iteration: int) -> tuple[dict, int]:
    return {k: v.detach().clone() for k, v in learned.items()}, iteration


def _fail(it: int, what: str, cfg: MTTConfig, last_good, ckpt: Path | None):
    state, good_it = last_good
    where = ""
    if ckpt is not None:
        path = ckpt.with_name(ckpt.stem + "_last_good.safetensors")
        SyntheticSet(state["x_syn"], state["y_syn"], state["lr_syn"], {"iteration": good_it}).save(path)
        where = f" The last good set (iteration {good_it}) is saved at {path}."
    raise LearnedLrError(
        f"MTT diverged at iteration {it}: {what}. This is the method's known failure mode: lower lr_lr "
        f"(now {cfg.lr_lr}) so the learned lr moves more slowly, or lr_img (now {cfg.lr_img}) if the images "
        f"blow up first; a smaller lr_teacher or fewer syn_steps also stabilise the student.{where}")


def _save_checkpoint(path: Path, learned, optimisers, generator, iteration, log: MTTLog, seconds: float):
    tensors = {k: v.detach().cpu().contiguous().reshape(v.shape) for k, v in learned.items()}
    for i, o in enumerate(optimisers):
        for j, p in enumerate(o.param_groups[0]["params"]):
            buf = o.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"opt{i}.{j}"] = buf.detach().cpu().contiguous()
    tensors["rng"] = generator.get_state()
    for name in ("losses", "lrs", "starts"):
        tensors[f"log.{name}"] = log.curve(name).contiguous()
    meta = {"iteration": str(iteration), "seconds": str(seconds), "evals": json.dumps(log.evals)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def _load_checkpoint(path: Path, learned, optimisers, generator, log: MTTLog) -> int:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    t = load_file(str(path))
    for k, v in learned.items():
        if k not in t or t[k].shape != v.shape:
            raise ValueError(f"checkpoint {path} was made for another configuration; delete it or change the path")
        with torch.no_grad():
            v.copy_(t[k])
    for i, o in enumerate(optimisers):
        for j, p in enumerate(o.param_groups[0]["params"]):
            if f"opt{i}.{j}" in t:
                o.state[p]["momentum_buffer"] = t[f"opt{i}.{j}"].to(p.device)
    generator.set_state(t["rng"])
    log.losses = t["log.losses"].tolist()
    log.lrs = t["log.lrs"].tolist()
    log.starts = [int(s) for s in t["log.starts"].tolist()]
    log.evals = [tuple(e) for e in json.loads(meta.get("evals", "[]"))]
    log.seconds = log.resumed_seconds = float(meta.get("seconds", "nan"))  # unknown, as in dd._load_checkpoint
    log.resumed_from = int(meta["iteration"])
    return log.resumed_from


# ----------------------------------------------------------------------------- evaluation

def evaluate_synthetic(x: Tensor, y: Tensor, lr: float, make_model: Callable[[], nn.Module], x_test: Tensor,
                       y_test: Tensor, *, epochs: int = 1000, batch_size: int = 256,
                       augment: Callable[[torch.Generator], "Callable[[Tensor], Tensor] | None"] | None = None,
                       num_nets: int = 5, seed: int = 0) -> EvalResult:
    """The MTT evaluation protocol (sec. 4): ``num_nets`` fresh networks trained on (x, y) with SGD
    (momentum 0.9, weight decay 5e-4, batch 256) at the learned lr, decayed x0.1 half-way, with
    differentiable augmentation (``augment(generator)``); test accuracy mean and std."""
    def fit(model: nn.Module, k: int):
        g = torch.Generator().manual_seed(seed * 7_919 + k)
        train_classifier(model, x, y, epochs=epochs, lr=float(lr), batch_size=batch_size, momentum=0.9,
                         weight_decay=5e-4, decay_at=0.5, augment=augment(g) if augment else None, generator=g)
        return None

    return evaluate_protocol(make_model, fit, x_test, y_test, num_nets=num_nets, seed=seed)


def real_init(x: Tensor, y: Tensor, ipc: int, num_classes: int, generator: torch.Generator | None = None
              ) -> tuple[Tensor, Tensor]:
    """The paper's default start: ``ipc`` random real images of each class (class blocks)."""
    from .coreset import random_real
    return random_real(x, y, ipc, num_classes, generator)


def noise_init(shape, ipc: int, num_classes: int, generator: torch.Generator | None = None, device="cpu"
               ) -> tuple[Tensor, Tensor]:
    """Start from N(0, 1) pixels (in the normalised input space), labels in class blocks."""
    x = torch.randn(ipc * num_classes, *shape, generator=generator).to(device)
    return x, torch.arange(num_classes, device=device).repeat_interleave(ipc)


# ----------------------------------------------------------------------------- diagnostics

def sample_windows(buffer: ExpertBuffer, max_start_epoch: int, expert_epochs: int, count: int,
                   generator: torch.Generator) -> list[tuple[int, int]]:
    """``count`` (expert, start epoch) pairs drawn like the distillation draws them (held-out windows)."""
    buffer.check_range(max_start_epoch, expert_epochs)
    return [(int(torch.randint(len(buffer), (1,), generator=generator)),
             int(torch.randint(max_start_epoch, (1,), generator=generator))) for _ in range(count)]


@torch.no_grad()
def matching_distance(model: nn.Module, buffer: ExpertBuffer, synthetic: SyntheticSet, syn_steps: int,
                      expert_epochs: int, windows: list[tuple[int, int]], batch_syn: int = 0,
                      inner_loss: InnerLoss = soft_cross_entropy, seed: int = 0) -> float:
    """Mean eq. (2) distance over given windows: how close ``syn_steps`` steps on the synthetic set (at its
    learned lr, without augmentation) bring a student from theta*_t to theta*_{t+expert_epochs}."""
    device = synthetic.x.device
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for expert, t in windows:
        start = buffer.params(expert, t, device)
        target = buffer.params(expert, t + expert_epochs, device)
        batches = minibatch_schedule(synthetic.x.shape[0], batch_syn or None, syn_steps, g, device)
        theta = unroll(model, start, synthetic.x, synthetic.y, synthetic.lr, batches, loss_fn=inner_loss)
        total += float(trajectory_loss(theta, start, target)[0])
    return total / len(windows)
