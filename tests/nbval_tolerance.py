"""pytest plugin for nbval: exact comparison on the machine the outputs were made on, a numeric tolerance elsewhere.

Loaded by ``make test-notebooks`` (``PYTHONPATH=tests``, ``-p nbval_tolerance``). Why: a CPU run's last bits depend on the
processor (vector width, oneDNN's cache blocking), and a few hundred training iterations amplify them: the same
notebooks, seeds and thread count, re-run on an Intel Xeon after an AMD EPYC made the committed outputs, printed
accuracies up to 0.026 apart (notebooks 02-06) and learned step sizes up to 25% apart. ``make notebooks`` stamps
each notebook with the machine it ran on (:func:`ddlib.nbtools.stamp`). Here:

- same machine signature: nbval's own comparison, character for character (after the sanitize patterns);
- another machine, or an unstamped notebook: the text between the numbers must still match exactly (runs of
  whitespace count as one space, so re-aligned tables pass), and every printed number ``new`` must satisfy
  ``|new - ref| <= atol + rtol * max(|new|, |ref|)``: ``TIGHT`` by default (an accuracy of 0.93 may move by
  0.09, twice the largest hardware difference seen), ``LOOSE`` in cells tagged ``nbval-loose-numbers``, which
  print quantities that the trajectory moves a lot (learned step sizes, per-class counts of selected images).

The notebooks' own ``assert`` cells check the papers' claims with margins on every machine; this keeps the rest of
the printed record honest without failing on hardware noise. ``DDLIB_NBVAL=exact`` forces exact comparison
everywhere, ``DDLIB_NBVAL=tolerant`` the tolerant one (default ``auto``).
"""

from __future__ import annotations

import functools
import os
import re

from ddlib import nbtools

TIGHT = (0.04, 0.05)   # (atol, rtol): accuracies, their std, losses, gains near zero
LOOSE = (0.05, 0.5)    # cells tagged LOOSE_TAG: within a factor of two, same text
LOOSE_TAG = "nbval-loose-numbers"
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
_SPACE = re.compile(r"\s+")


def _skeleton(text: str) -> str:
    return _SPACE.sub(" ", NUMBER.sub("#", text)).strip()


def numbers_close(ref: str, new: str, tolerance: tuple[float, float] = TIGHT) -> bool:
    """Whether ``new`` reads as ``ref`` with every number within ``tolerance`` = (atol, rtol) (module docstring)."""
    if _skeleton(ref) != _skeleton(new):
        return False
    atol, rtol = tolerance
    for a, b in zip(NUMBER.findall(ref), NUMBER.findall(new)):
        x, y = float(a), float(b)
        if abs(x - y) > atol + rtol * max(abs(x), abs(y)):
            return False
    return True


class TolerantText(str):
    """A sanitized output string that nbval's ``ref != new`` compares with :func:`numbers_close`."""

    tolerance = TIGHT

    def __new__(cls, text: str, tolerance: tuple[float, float] = TIGHT):
        obj = super().__new__(cls, text)
        obj.tolerance = tolerance
        return obj

    def __eq__(self, other):
        return isinstance(other, str) and numbers_close(str(self), str(other), self.tolerance)

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = str.__hash__


@functools.lru_cache(maxsize=1)
def _this_machine() -> str:
    return nbtools.machine_signature()


def mode_for(nb) -> str:
    """``exact`` or ``tolerant`` for this notebook on this machine."""
    forced = os.environ.get("DDLIB_NBVAL", "auto")
    if forced not in ("auto", "exact", "tolerant"):
        raise ValueError(f"DDLIB_NBVAL={forced!r}: use auto, exact or tolerant")
    if forced != "auto":
        return forced
    return "exact" if nbtools.made_on(nb) == _this_machine() else "tolerant"


def tolerance_for(cell) -> tuple[float, float]:
    return LOOSE if LOOSE_TAG in cell.get("metadata", {}).get("tags", []) else TIGHT


def pytest_configure(config):
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:  # nbval not installed: nothing to adapt
        return
    if getattr(IPyNbCell, "_ddlab_tolerance", False):
        return
    plain_sanitize = IPyNbCell.sanitize

    def sanitize(self, s):
        s = plain_sanitize(self, s)
        if isinstance(s, str) and mode_for(self.parent.nb) == "tolerant":
            return TolerantText(s, tolerance_for(self.cell))
        return s

    IPyNbCell.sanitize = sanitize
    IPyNbCell._ddlab_tolerance = True


def pytest_report_header(config):
    if config.getoption("nbval", default=False):
        return [f"nbval outputs: exact on the stamped machine, else (atol, rtol) {TIGHT}, {LOOSE} in cells tagged "
                f"{LOOSE_TAG} (DDLIB_NBVAL={os.environ.get('DDLIB_NBVAL', 'auto')}); this machine: {_this_machine()}"]
    return []
