"""Notebook hygiene: make executed notebooks small, stable under re-execution, and safe to commit.

Executed notebooks (papermill runs, ``make notebooks``) pass through :func:`strip_volatile`
before they are written anywhere. It removes what changes on every run without carrying
information (timestamps, durations, widget state), keeps what nbval and readers need
(outputs, execution counts, cell tags), and collapses progress-bar redraws so that a tqdm bar
is stored as its final line instead of hundreds of ``\\r`` updates.

nbval policy (see README, "Notebook conventions for nbval"): stderr streams are *kept* and
compared, after the regexes in ``tests/nbval_sanitize.cfg`` have normalised tqdm timings and
rates, machine-specific paths and memory addresses. nbval compares output fields by stream
name, so dropping stderr from the committed notebooks would make every cell with a progress
bar fail ("Unexpected output fields: stderr"); keeping it also means an unexpected new warning
shows up as a test failure instead of passing silently.

Command line: ``python -m ddlib.nbtools strip FILE.ipynb ...`` rewrites notebooks in place
(handy after saving from Jupyter).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import nbformat

KERNEL_NAME = "ddlab"
KERNEL_DISPLAY_NAME = "Python (ddlab)"
INJECTED_TAG = "injected-parameters"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

# The same carriage-return / backspace rules nbval applies before comparing streams.
_CARRIAGE_RETURN = re.compile(r"^.*\r(?=[^\n])", re.MULTILINE)
_BACKSPACE = re.compile(r"[^\n]\x08")


def kernelspec() -> dict:
    """The kernelspec every committed notebook carries (registered by ``make kernel``)."""
    return {"name": KERNEL_NAME, "display_name": KERNEL_DISPLAY_NAME, "language": "python"}


def collapse_redraws(text: str) -> str:
    """Apply ``\\b`` and ``\\r`` the way a terminal would, leaving only what stays visible.

    A trailing ``\\r`` (a bar that erased itself, or text continued by a later stream output)
    is kept, so collapsing before or after merging streams gives the same result.
    """
    previous = None
    while previous != text:
        previous, text = text, _BACKSPACE.sub("", text)
    return _CARRIAGE_RETURN.sub("", text)


def merge_streams(outputs: list) -> list:
    """Merge consecutive stream outputs of the same name and collapse their redraws."""
    merged: list = []
    for out in outputs:
        if out.get("output_type") == "stream":
            last = merged[-1] if merged else None
            if last is not None and last.get("output_type") == "stream" and last.get("name") == out.get("name"):
                last["text"] = last["text"] + out["text"]
                continue
            out = nbformat.from_dict({**out, "text": out.get("text", "")})
        merged.append(out)
    for out in merged:
        if out.get("output_type") == "stream":
            out["text"] = collapse_redraws(out["text"])
    return merged


def _is_widget_output(out) -> bool:
    return WIDGET_MIME in out.get("data", {})


def strip_volatile(nb):
    """Remove run-specific metadata from ``nb`` in place and return it.

    Removed: notebook- and cell-level ``papermill`` metadata, cell ``execution`` timestamps,
    ``widgets`` state, widget outputs, empty ``tags`` lists. Normalised: ``kernelspec`` (to
    the project kernel), stream outputs (merged, progress-bar redraws collapsed). Kept: cell
    tags (``parameters``, ``injected-parameters``, ``nbval-ignore-output``, ...), outputs,
    execution counts (nbval skips the comparison for cells without one).
    """
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = kernelspec()
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.metadata.get("tags") == []:
            del cell.metadata["tags"]
        if cell.cell_type == "code":
            outputs = [o for o in cell.get("outputs", []) if not _is_widget_output(o)]
            cell.outputs = merge_streams(outputs)
    return nb


def strip_injected_parameters(nb):
    """Drop papermill's ``injected-parameters`` cells (never commit a parameter override)."""
    nb.cells = [c for c in nb.cells if INJECTED_TAG not in c.metadata.get("tags", [])]
    return nb


def clean_file(path: Path, drop_injected: bool = False) -> Path:
    """Read ``path``, strip it (and optionally its injected cells) and write it back."""
    nb = nbformat.read(path, as_version=4)
    strip_volatile(nb)
    if drop_injected:
        strip_injected_parameters(nb)
    nbformat.write(nb, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddlib.nbtools", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    strip = sub.add_parser("strip", help="strip volatile metadata from notebooks, in place")
    strip.add_argument("paths", nargs="+", type=Path)
    strip.add_argument("--drop-injected", action="store_true", help="also remove injected-parameters cells")
    args = parser.parse_args(argv)
    for path in args.paths:
        clean_file(path, drop_injected=args.drop_injected)
        print(f"stripped {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
