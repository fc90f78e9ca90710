"""Rules shared by the resumable loops (:mod:`ddlib.dd`, :mod:`ddlib.mtt`), which each write their own
safetensors checkpoints: what to do with a checkpoint that does not fit the run being asked for."""

from __future__ import annotations

from pathlib import Path


def refuse_longer_checkpoint(path: Path, done: int, asked: int, name: str) -> None:
    """Refuse a checkpoint that is further along (``done`` iterations) than the run asks for (``asked``).

    It belongs to a longer run of the same settings (iteration counts are left out of the checkpoint
    key so that a run can be extended): returning its state would not be what was asked for, and
    rewriting it as a shorter run would lose the iterations beyond ``asked``.
    """
    if done > asked:
        raise ValueError(f"checkpoint {path} has {done} iterations, more than {name}={asked}: it belongs to a "
                         f"longer run of these settings. Set {name} to at least {done} to use it, or pass "
                         f"another checkpoint path (or delete it) to run {asked} from the start")
