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

Where outputs were made: CPU results depend on the machine's floating-point kernels (vector width, oneDNN's
blocking for its caches), and a few hundred training iterations amplify a last-bit difference into a visible
one (notebook 02's quick baselines moved by up to two points between an AMD EPYC and an Intel Xeon with the
same threads and seeds). :func:`stamp` records :func:`machine_signature` in the notebook's metadata when
``make notebooks`` writes it back; ``tests/nbval_tolerance.py`` compares exactly on that machine and with a
numeric tolerance on any other.

Command line: ``python -m ddlib.nbtools strip FILE.ipynb ...`` rewrites notebooks in place
(handy after saving from Jupyter).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
from importlib import metadata
from pathlib import Path

import nbformat

KERNEL_NAME = "ddlab"
KERNEL_DISPLAY_NAME = "Python (ddlab)"
INJECTED_TAG = "injected-parameters"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
STAMP_KEY = "ddlab"  # notebook metadata: {"outputs_made_on": machine_signature()}

# The same carriage-return / backspace rules nbval applies before comparing streams.
_CARRIAGE_RETURN = re.compile(r"^.*\r(?=[^\n])", re.MULTILINE)
_BACKSPACE = re.compile(r"[^\n]\x08")


def kernelspec() -> dict:
    """The kernelspec every committed notebook carries (registered by ``make kernel``)."""
    return {"name": KERNEL_NAME, "display_name": KERNEL_DISPLAY_NAME, "language": "python"}


def machine_signature() -> str:
    """What decides the last bits of a CPU run: the processor (vendor, family, model, stepping, the cache size
    oneDNN blocks its kernels for), the torch release and the intra-op thread count (``OMP_NUM_THREADS``; the
    Makefile pins it)."""
    cpu = f"{platform.machine()} {platform.processor()}".strip()
    try:
        fields = {}
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
        cpu = (f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} "
               f"model {fields.get('model', '?')} stepping {fields.get('stepping', '?')}, "
               f"cache {fields.get('cache size', '?')} ({fields.get('model name', '?')})")
    except OSError:
        pass
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "none"
    return f"{cpu}; torch {torch_version}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


def stamp(nb, signature: str | None = None):
    """Record in ``nb``'s metadata the machine its outputs were made on (module docstring)."""
    nb.metadata[STAMP_KEY] = {"outputs_made_on": signature or machine_signature()}
    return nb


def made_on(nb) -> str | None:
    """The machine signature a notebook's outputs were stamped with, or None (unstamped)."""
    return nb.metadata.get(STAMP_KEY, {}).get("outputs_made_on")


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
    ``widgets`` state, widget outputs, empty ``tags`` lists, the machine stamp (only ``make notebooks``
    vouches for where the outputs were made, and stamps them again after stripping). Normalised: ``kernelspec`` (to
    the project kernel), stream outputs (merged, progress-bar redraws collapsed). Kept: cell
    tags (``parameters``, ``injected-parameters``, ``nbval-ignore-output``, ...), outputs,
    execution counts (nbval skips the comparison for cells without one).
    """
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)
    nb.metadata.pop(STAMP_KEY, None)
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
