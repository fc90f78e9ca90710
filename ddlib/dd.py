"""Dataset Distillation (Wang, Zhu, Torralba, Efros 2018): learn pixels and step sizes through training.

The distilled set is ``distill_steps`` batches of ``ipc`` images per class (fixed labels), and one
learned step size per step and epoch (sec. 3.5). One outer iteration (Algorithm 1):

1. draw initial weights theta_0: the same ones every time (**fixed init**, eq. 1-2) or fresh ones
   from p(theta_0) (**random init**, eq. 3-4), or from any sampler (pre-trained pools, notebook 04);
2. run T = distill_steps x distill_epochs differentiable SGD steps on the distilled batches
   (:func:`ddlib.unroll.unroll`, full or exact low-memory mode);
3. score theta_T on a batch of real data (cross-entropy, or any ``outer_loss``: the poisoning
   attack of notebook 04 swaps it) and update pixels and step sizes with Adam.

Step sizes are stored as raw values r with lr = softplus(r) so that they stay positive. Long runs
checkpoint to safetensors and resume when re-run with the same configuration.
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
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.func import functional_call

from .checkpoints import refuse_longer_checkpoint
from .train import EvalResult, accuracy, evaluate_protocol
from .unroll import MODES, dd_schedule, init_params, unroll

InitSampler = Callable[[int], "dict[str, Tensor]"]
OuterLoss = Callable[[nn.Module, "Mapping[str, Tensor]", Tensor, Tensor], Tensor]


@dataclass
class DDConfig:
    """Hyperparameters of one distillation run (defaults: the paper's MNIST settings)."""

    ipc: int = 1                 # distilled images per class in each step
    distill_steps: int = 1       # distinct distilled batches (GD steps per epoch)
    distill_epochs: int = 3      # passes over those batches
    lr_init: float = 0.02        # initial value of every learned step size
    outer_lr: float = 0.01       # Adam learning rate on pixels and step sizes
    outer_iters: int = 1000      # outer iterations (the paper: 400 epochs of 59 = 23,600 on MNIST)
    decay_every: int = 2360      # halve the outer lr every this many iterations (40 MNIST epochs)
    decay_factor: float = 0.5
    real_batch: int = 1024       # real images per outer iteration
    real_chunk: int = 0          # >0: evaluate the real-data loss in chunks of this size (same gradient, less memory)
    nets_per_iter: int = 1       # initialisations averaged per outer iteration (random init: > 1)
    unroll_mode: str = "full"    # "full" or "lowmem" (same gradient, flat memory in the steps)
    checkpoint_every: int = 500  # iterations between checkpoints (0: never)

    def validate(self) -> "DDConfig":
        for name in ("ipc", "distill_steps", "distill_epochs", "outer_iters", "real_batch", "nets_per_iter"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.real_chunk < 0:
            raise ValueError(f"real_chunk={self.real_chunk} must be >= 0 (0: the whole real batch at once)")
        for name in ("lr_init", "outer_lr"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value} must be a positive number")
        if self.unroll_mode not in MODES:
            raise ValueError(f"unroll_mode={self.unroll_mode!r} is unknown; use one of {MODES}")
        return self

    @property
    def total_steps(self) -> int:
        return self.distill_steps * self.distill_epochs


@dataclass
class DistilledSet:
    """Images ``x`` (distill_steps * ipc * classes, C, H, W), labels ``y`` and raw step sizes."""

    x: Tensor
    y: Tensor
    raw_lrs: Tensor
    distill_steps: int
    distill_epochs: int
    meta: dict = field(default_factory=dict)

    @property
    def lrs(self) -> Tensor:
        """The learned step size of every step (length distill_steps * distill_epochs)."""
        return F.softplus(self.raw_lrs)

    @property
    def per_step(self) -> int:
        return self.x.shape[0] // self.distill_steps

    def schedule(self) -> list[Tensor]:
        return dd_schedule(self.distill_steps, self.distill_epochs, self.per_step, device=self.x.device)

    def train(self, model: nn.Module, params: Mapping[str, Tensor], mode: str = "full") -> dict[str, Tensor]:
        """Apply the learned steps to ``params`` (differentiably if anything requires grad)."""
        return unroll(model, params, self.x, self.y, self.lrs, self.schedule(), mode=mode)

    def step_images(self, step: int) -> Tensor:
        return self.x[step * self.per_step:(step + 1) * self.per_step]

    def save(self, path: str | Path) -> Path:
        """Safetensors file; metadata (JSON strings) records how the set was made."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"distill_steps": str(self.distill_steps), "distill_epochs": str(self.distill_epochs),
                "meta": json.dumps(self.meta, sort_keys=True)}
        save_file({"x": self.x.detach().cpu().contiguous(), "y": self.y.cpu().contiguous(),
                   "raw_lrs": self.raw_lrs.detach().cpu().contiguous()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "DistilledSet":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        t = load_file(str(path), device=str(device))
        return cls(t["x"], t["y"], t["raw_lrs"], int(meta["distill_steps"]), int(meta["distill_epochs"]),
                   json.loads(meta["meta"]))


def init_distilled_set(cfg: DDConfig, input_shape, num_classes: int, device="cpu",
                       generator: torch.Generator | None = None, x_init: Tensor | None = None) -> DistilledSet:
    """Pixels from N(0, 1) in normalised space (the paper), or ``x_init`` (e.g. real images for baselines)."""
    cfg.validate()
    n = cfg.distill_steps * cfg.ipc * num_classes
    if x_init is None:
        x = torch.randn(n, *input_shape, generator=generator).to(device)
    else:
        if x_init.shape[0] != n:
            raise ValueError(f"x_init has {x_init.shape[0]} images; this configuration needs {n}")
        x = x_init.detach().clone().to(device)
    # labels 0,0,..,1,1,.. within each step (ipc images per class per step)
    y = torch.arange(num_classes).repeat_interleave(cfg.ipc).repeat(cfg.distill_steps).to(device)
    raw = torch.full((cfg.total_steps,), cfg.lr_init).expm1().log().to(device)  # softplus^-1(lr_init)
    return DistilledSet(x, y, raw, cfg.distill_steps, cfg.distill_epochs)


# ----------------------------------------------------------------------------- initialisations

def fixed_init(model: nn.Module) -> InitSampler:
    """Eq. (1-2): the same theta_0 at every iteration (a copy of the module's current weights)."""
    theta0 = init_params(model)
    return lambda i: theta0


def random_init(make_model: Callable[[], nn.Module], generator_seed: int = 0, device="cpu") -> InitSampler:
    """Eq. (3-4): a fresh theta_0 ~ p(theta_0) at every call, reproducible from ``generator_seed``.

    Init i is seeded with (generator_seed + 1) * 1_000_003 + i: for seeds below 10^6 this range never
    meets the evaluation networks of :func:`ddlib.train.evaluate_protocol` (seeded seed + k), so a
    distilled set is never evaluated on a network it was trained on.
    """
    def sample(i: int) -> dict[str, Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((generator_seed + 1) * 1_000_003 + i)
            return init_params(make_model().to(device))
    return sample


def to_step_layout(x_class_blocks: Tensor, distill_steps: int, ipc: int, num_classes: int) -> Tensor:
    """Reorder images given as class blocks (all of class 0, then class 1, ...; ``distill_steps * ipc`` each)
    into the distilled-set layout: step by step, and within a step class by class."""
    shape = x_class_blocks.shape[1:]
    x = x_class_blocks.reshape(num_classes, distill_steps, ipc, *shape).transpose(0, 1)
    return x.reshape(distill_steps * num_classes * ipc, *shape)


def cross_entropy_outer(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """The default objective: classification loss of theta_T on real data (eq. 2)."""
    return F.cross_entropy(functional_call(model, dict(params), (x,)), y)


# ----------------------------------------------------------------------------- the outer loop

_NOT_IN_KEY = ("outer_iters", "checkpoint_every", "real_chunk")


def config_key(cfg: DDConfig, **extra) -> str:
    """A short hash of everything that shapes the trajectory: checkpoints resume only for the same key.

    Fields that do not change the trajectory are left out on purpose: ``outer_iters`` and
    ``checkpoint_every`` (the same run can be resumed to go further, or stopped earlier) and
    ``real_chunk`` (the same gradient computed in slices).
    """
    fields = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_KEY}
    blob = json.dumps({**fields, **{k: str(v) for k, v in extra.items()}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class DistillLog:
    """Per-iteration outer loss (a tensor, synced once at the end) and wall time.

    ``seconds`` is the distillation's whole wall time, including the runs it resumed from
    (``resumed_seconds`` of it, up to iteration ``resumed_from``); NaN when it resumed from a
    checkpoint that did not record its wall time.
    """

    losses: list = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    resumed_seconds: float = 0.0
    final_outer_lr: float = 0.0  # the Adam lr the schedule had reached at the end

    def loss_curve(self) -> Tensor:
        return torch.stack(self.losses).cpu() if self.losses else torch.empty(0)


def distill(model: nn.Module, sample_init: InitSampler, x_real: Tensor, y_real: Tensor, cfg: DDConfig,
            num_classes: int, *, generator: torch.Generator | None = None, outer_loss: OuterLoss = cross_entropy_outer,
            distilled: DistilledSet | None = None, learn_images: bool = True, checkpoint: str | Path | None = None,
            progress: bool = True) -> tuple[DistilledSet, DistillLog]:
    """Algorithm 1 of Wang et al. 2018. Returns the distilled set and the loss log.

    ``distilled`` starts from a given set (default: noise images); ``learn_images=False`` keeps the
    pixels frozen and learns only the step sizes (how the baselines get tuned step sizes).
    ``checkpoint`` (a ``.safetensors`` path) is written every ``cfg.checkpoint_every`` iterations and,
    if it exists for the same configuration, the run resumes from it. A NaN or infinite real-data loss
    stops the run with an error naming the lr to lower; the last good state is saved first.
    """
    cfg.validate()
    device = x_real.device
    if distilled is None:
        distilled = init_distilled_set(cfg, tuple(x_real.shape[1:]), num_classes, device, generator)
    x_syn = distilled.x.detach().clone().requires_grad_(learn_images)
    raw_lrs = distilled.raw_lrs.detach().clone().requires_grad_(True)
    y_syn = distilled.y
    learned = [x_syn, raw_lrs] if learn_images else [raw_lrs]
    opt = torch.optim.Adam(learned, lr=cfg.outer_lr, betas=(0.5, 0.999))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(cfg.decay_every, 1), gamma=cfg.decay_factor)
    batches = distilled.schedule()
    log = DistillLog()
    start = 0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        start = _load_checkpoint(ckpt, x_syn, raw_lrs, opt, sched, generator, log)
        refuse_longer_checkpoint(ckpt, start, cfg.outer_iters, "outer_iters")
    n_real = x_real.shape[0]
    last_good = (x_syn.detach().clone(), raw_lrs.detach().clone(), start)

    iterator = range(start, cfg.outer_iters)
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, initial=start, total=cfg.outer_iters, desc="distill", mininterval=2.0)
    t0 = time.perf_counter()
    for it in iterator:
        opt.zero_grad(set_to_none=True)
        idx = torch.randint(n_real, (min(cfg.real_batch, n_real),), generator=generator).to(device)
        total = 0.0
        for k in range(cfg.nets_per_iter):  # gradients of the nets accumulate in .grad
            theta0 = sample_init(it * cfg.nets_per_iter + k)
            theta_T = unroll(model, theta0, x_syn, y_syn, F.softplus(raw_lrs), batches, mode=cfg.unroll_mode)
            total = total + _outer_backward(model, theta_T, x_real, y_real, idx, outer_loss, cfg.real_chunk,
                                            1 / cfg.nets_per_iter)
        log.losses.append(total)
        # A host sync every 50 iterations is enough to catch divergence without slowing the loop.
        if it % 50 == 0 or it == cfg.outer_iters - 1:
            if not torch.isfinite(total):
                _fail_nonfinite(it, cfg, last_good, y_syn, distilled, ckpt, opt, sched, generator, log)
            last_good = (x_syn.detach().clone(), raw_lrs.detach().clone(), it)
        opt.step()
        sched.step()
        if ckpt is not None and cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt, x_syn, raw_lrs, opt, sched, generator, it + 1, log,
                             seconds=log.seconds + time.perf_counter() - t0)
    log.seconds += time.perf_counter() - t0
    log.final_outer_lr = opt.param_groups[0]["lr"]
    if log.losses and not torch.isfinite(log.losses[-1]):
        _fail_nonfinite(cfg.outer_iters - 1, cfg, last_good, y_syn, distilled, ckpt, opt, sched, generator, log)
    if ckpt is not None and cfg.checkpoint_every and start < cfg.outer_iters:  # a finished checkpoint stays as it is
        _save_checkpoint(ckpt, x_syn, raw_lrs, opt, sched, generator, cfg.outer_iters, log)
    result = DistilledSet(x_syn.detach(), y_syn, raw_lrs.detach(), distilled.distill_steps, distilled.distill_epochs,
                          {**distilled.meta, **asdict(cfg)})
    return result, log


def _outer_backward(model, theta_T, x_real, y_real, idx, outer_loss, chunk: int, scale: float = 1.0) -> Tensor:
    """Back-propagate ``scale`` x the real-data loss of theta_T on ``x_real[idx]`` to the distilled set
    (scale: 1 / nets).

    With ``chunk`` the loss is evaluated on slices of the real batch, each gathered only when it is
    used: the gradient with respect to theta_T is accumulated slice by slice on a detached copy, then
    pushed through the unroll once. For a loss that is a mean over examples this is the same gradient
    with the real batch's memory (its pixels and activations) cut to one slice. Returns the scaled
    loss value (detached).
    """
    if not chunk or chunk >= idx.shape[0]:
        loss = outer_loss(model, theta_T, x_real[idx], y_real[idx]) * scale
        loss.backward()
        return loss.detach()
    leaves = {k: v.detach().requires_grad_(True) for k, v in theta_T.items()}
    total = torch.zeros((), device=x_real.device)
    for part_idx in idx.split(chunk):
        weight = scale * part_idx.shape[0] / idx.shape[0]  # slice means -> the whole batch's mean
        part = outer_loss(model, leaves, x_real[part_idx], y_real[part_idx]) * weight
        part.backward()
        total = total + part.detach()
    torch.autograd.backward(list(theta_T.values()), [leaves[k].grad for k in theta_T])
    return total


def _fail_nonfinite(it, cfg, last_good, y_syn, distilled, ckpt, opt, sched, generator, log):
    x_good, lr_good, it_good = last_good
    where = ""
    if ckpt is not None:
        good = ckpt.with_name(ckpt.stem + "_last_good.safetensors")
        DistilledSet(x_good, y_syn, lr_good, distilled.distill_steps, distilled.distill_epochs,
                     {"iteration": it_good}).save(good)
        where = f" The last good distilled set (iteration {it_good}) is saved at {good}."
    raise FloatingPointError(
        f"the real-data loss became NaN/inf by outer iteration {it}: the unrolled steps diverged. "
        f"Lower lr_init (now {cfg.lr_init}) or outer_lr (now {cfg.outer_lr}).{where}")


def _save_checkpoint(path: Path, x_syn, raw_lrs, opt, sched, generator, iteration: int, log: DistillLog,
                     seconds: float | None = None):
    tensors = {"x_syn": x_syn.detach().cpu().contiguous(), "raw_lrs": raw_lrs.detach().cpu().contiguous(),
               "losses": log.loss_curve().float().contiguous()}
    for i, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"opt.{i}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    if generator is not None:
        tensors["generator"] = generator.get_state()
    seconds = log.seconds if seconds is None else seconds  # wall time up to this iteration
    meta = {"iteration": str(iteration), "scheduler": json.dumps(sched.state_dict()), "seconds": str(seconds)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def _load_checkpoint(path: Path, x_syn, raw_lrs, opt, sched, generator, log: DistillLog) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(path))
    if t["x_syn"].shape != x_syn.shape or t["raw_lrs"].shape != raw_lrs.shape:
        raise ValueError(f"checkpoint {path} was made for another configuration; delete it or change the path")
    with torch.no_grad():
        x_syn.copy_(t["x_syn"])
        raw_lrs.copy_(t["raw_lrs"])
    state = opt.state_dict()
    n_params = len(state["param_groups"][0]["params"])
    state["state"] = {i: {k.split(".", 2)[2]: v.to(x_syn.device) if v.ndim else v
                          for k, v in t.items() if k.startswith(f"opt.{i}.")} for i in range(n_params)}
    state["state"] = {i: s for i, s in state["state"].items() if s}
    opt.load_state_dict(state)  # param_groups come from the fresh optimiser: its lr is the initial outer_lr ...
    sched.load_state_dict(json.loads(meta["scheduler"]))
    # ... and the scheduler decays whatever lr the optimiser holds, so put back the lr it had reached
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):
        group["lr"] = lr
    if generator is not None and "generator" in t:
        generator.set_state(t["generator"])
    log.losses = list(t["losses"].to(x_syn.device).unbind()) if t["losses"].numel() else []
    # a checkpoint written before wall times were stored: the total is unknown (NaN, an empty
    # `seconds` cell in summary.csv), never the few seconds of the resumed part alone
    log.seconds = log.resumed_seconds = float(meta.get("seconds", "nan"))
    log.resumed_from = int(meta["iteration"])
    return log.resumed_from


# ----------------------------------------------------------------------------- evaluation

def evaluate_distilled(distilled: DistilledSet, make_model: Callable[[], nn.Module], x_test: Tensor, y_test: Tensor,
                       inits: InitSampler | None = None, num_nets: int = 5, seed: int = 0) -> EvalResult:
    """Train networks by the learned steps and measure test accuracy (the paper's protocol).

    ``inits=None`` draws fresh random initialisations (seed + k), as for random-init DD; pass
    :func:`fixed_init` to evaluate at the fixed initialisation the set was learned for.
    """
    def fit(model: nn.Module, k: int):
        theta0 = init_params(model) if inits is None else inits(k)
        with torch.no_grad():
            return distilled.train(model, theta0)

    return evaluate_protocol(make_model, fit, x_test, y_test, num_nets=num_nets, seed=seed)


def final_accuracy(distilled: DistilledSet, model: nn.Module, theta0: Mapping[str, Tensor], x: Tensor, y: Tensor) -> float:
    """Test accuracy after the learned steps from one given initialisation."""
    with torch.no_grad():
        return accuracy(model, x, y, distilled.train(model, theta0))
