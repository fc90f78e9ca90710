"""Where runs write what they produce: run folders, metrics, figures, image grids, summary rows.

Layout (``results_root()`` is ``<repo>/results`` unless ``DDLIB_RESULTS`` points elsewhere;
the test suite points it at a scratch folder so that ``make test`` never touches the
committed results)::

    results/
      summary.csv                 one row per headline result of the whole project
      <scale>/<notebook>/         metrics.json, figures (*.png), distilled sets (*.safetensors)
      <scale>/<notebook>.ipynb    executed copies written by the papermill driver

``summary.csv`` has exactly :data:`SUMMARY_COLUMNS`. A row is identified by
:data:`ROW_KEY`; writing a row replaces the row with the same key and leaves every other row
alone, so re-running one notebook never disturbs another's results.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

SUMMARY_COLUMNS = (
    "notebook", "scale", "dataset", "model", "method", "setting",
    "metric", "value", "std", "runs", "paper_value", "seconds",
)
ROW_KEY = ("notebook", "scale", "dataset", "model", "method", "setting", "metric")
SCALES = ("quick", "paper")


def repo_root() -> Path:
    """The checkout that contains ``ddlib/`` (works for editable installs)."""
    return Path(__file__).resolve().parent.parent


def results_root() -> Path:
    """``$DDLIB_RESULTS`` if set, else ``<repo>/results``."""
    env = os.environ.get("DDLIB_RESULTS")
    return Path(env).resolve() if env else repo_root() / "results"


def summary_path() -> Path:
    return results_root() / "summary.csv"


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is unknown; use one of {SCALES}")
    return scale


@dataclass(frozen=True)
class Run:
    """The output folder of one notebook at one scale. Create with :func:`run_dir`."""

    notebook: str
    scale: str
    path: Path

    def file(self, name: str) -> Path:
        """Path of an output file inside this run's folder (parent folders created)."""
        p = self.path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def save_json(self, name: str, obj: Any) -> Path:
        p = self.file(name if name.endswith(".json") else name + ".json")
        _atomic_write_text(p, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")
        return p

    def save_figure(self, fig, name: str, dpi: int = 110) -> Path:
        """Save a matplotlib figure as PNG (no timestamps in the file, so reruns are identical)."""
        p = self.file(name if name.endswith(".png") else name + ".png")
        fig.savefig(p, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
        return p

    def record(self, rows: Iterable[Mapping[str, Any]]) -> list[dict]:
        """Write headline rows for this notebook and scale into ``summary.csv`` (see module doc)."""
        full = [{"notebook": self.notebook, "scale": self.scale, **r} for r in rows]
        return write_summary_rows(full)


def run_dir(notebook: str, scale: str, tag: str | None = None) -> Run:
    """The folder for ``notebook`` (e.g. ``"01_linear_lower_bound"``) at ``scale``.

    ``tag`` separates several runs of one notebook at one scale (paper-scale config files).
    """
    check_scale(scale)
    name = notebook if not tag else f"{notebook}__{tag}"
    path = results_root() / scale / name
    path.mkdir(parents=True, exist_ok=True)
    return Run(notebook=notebook, scale=scale, path=path)


# ----------------------------------------------------------------------------- summary.csv

def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4g}"  # 0.9123, 12.35, 2.9e-15: four significant digits keep diffs small
    return str(value)


def _validate_row(row: Mapping[str, Any]) -> dict[str, str]:
    unknown = set(row) - set(SUMMARY_COLUMNS)
    if unknown:
        raise ValueError(f"summary row has unknown columns {sorted(unknown)}; allowed: {SUMMARY_COLUMNS}")
    required = [c for c in ROW_KEY if c != "setting"] + ["value"]  # an empty setting is allowed
    missing = [c for c in required if c not in row or row[c] in (None, "")]
    if missing:
        raise ValueError(f"summary row is missing {missing}: {dict(row)}")
    check_scale(str(row["scale"]))
    metric = str(row["metric"])
    if "acc" in metric:
        for col in ("value", "paper_value"):
            v = row.get(col)
            if v not in (None, "") and not (0.0 <= float(v) <= 1.0):
                raise ValueError(f"{col}={v} for metric {metric!r}: accuracies are fractions (0.94, not 94)")
    return {c: _format_cell(row.get(c)) for c in SUMMARY_COLUMNS}


def read_summary(path: Path | None = None) -> list[dict[str, str]]:
    path = path or summary_path()
    if not path.exists():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != SUMMARY_COLUMNS:
            raise ValueError(f"{path} has columns {reader.fieldnames}, expected {SUMMARY_COLUMNS}")
        return list(reader)


def write_summary_rows(rows: Iterable[Mapping[str, Any]], path: Path | None = None) -> list[dict]:
    """Upsert ``rows`` (dicts with :data:`SUMMARY_COLUMNS`) into the summary file, atomically.

    Rows whose :data:`ROW_KEY` matches a new row are replaced; all others are kept. The file is
    kept sorted by notebook, scale and key so that diffs stay small.
    """
    path = path or summary_path()
    new = [_validate_row(r) for r in rows]
    key = lambda r: tuple(r[c] for c in ROW_KEY)  # noqa: E731
    new_keys = {key(r) for r in new}
    if len(new_keys) != len(new):
        raise ValueError("two summary rows share the same key; give them distinct method/setting/metric")
    kept = [r for r in read_summary(path) if key(r) not in new_keys]
    merged = sorted(kept + new, key=key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", newline="", dir=path.parent, delete=False, suffix=".tmp") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(merged)
    os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600; results are meant to be shared
    os.replace(f.name, path)
    return new


# ----------------------------------------------------------------------------- helpers

def _atomic_write_text(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def _jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values and paths to plain JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def image_grid(x, mean=None, std=None, nrow: int | None = None, padding: int = 1):
    """Tile images ``x`` of shape (N, C, H, W) into one (H', W', C) array in [0, 1] for ``imshow``.

    ``mean``/``std`` (per channel) undo the dataset normalisation; each image is then clipped to
    [0, 1]. Single-channel grids come back as (H', W') for a grey colormap.
    """
    import torch
    from torchvision.utils import make_grid

    x = x.detach().float().cpu()
    if mean is not None and std is not None:
        m = torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
        x = x * s + m
    x = x.clamp(0, 1)
    nrow = nrow or int(math.ceil(math.sqrt(x.shape[0])))
    grid = make_grid(x, nrow=nrow, padding=padding, pad_value=1.0)
    arr = grid.permute(1, 2, 0).numpy()
    return arr[..., 0] if x.shape[1] == 1 else arr


def show_images(ax, x, mean=None, std=None, nrow: int | None = None, title: str | None = None):
    """Draw :func:`image_grid` on a matplotlib axis with no ticks."""
    grid = image_grid(x, mean, std, nrow)
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return ax
