"""tests/nbval_tolerance.py: exact on the machine that made the outputs, within a tolerance on any other."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import nbval_tolerance as tol
from ddlib import nbtools
from conftest import make_notebook

REPO = Path(__file__).resolve().parent.parent


def test_numbers_within_the_tolerance_read_as_equal():
    assert tol.numbers_close("dd 0.926 random 0.873", "dd 0.944 random 0.858")  # hardware noise, seen
    assert tol.numbers_close("gain +0.022", "gain +0.011")
    assert tol.numbers_close("ratio 84.5x", "ratio 83.8x")
    assert not tol.numbers_close("classes [1, 4, 15, 22]", "classes [1, 5, 15, 22]")
    assert tol.numbers_close("classes [1, 4, 15, 22]", "classes [1, 5, 15, 22]", tol.LOOSE)  # seen (06)
    assert tol.numbers_close("step sizes [0.358, 3.161]", "step sizes [0.464, 2.829]", tol.LOOSE)  # seen (02)
    assert not tol.numbers_close("step sizes [0.358, 3.161]", "step sizes [0.358, 31.61]", tol.LOOSE)
    assert tol.numbers_close("mkdt   0.587\nnone   0.605", "mkdt 0.59\nnone  0.605")  # re-aligned columns
    assert not tol.numbers_close("dd 0.94", "dd 0.60")                  # a real regression
    assert not tol.numbers_close("loss 12.0", "loss 20.0")
    assert not tol.numbers_close("beats random by 0.3", "loses to random by 0.3")  # the words are compared exactly
    assert not tol.numbers_close("acc 0.9", "acc 0.9 0.9")              # so is the count of numbers


def test_machine_signature_names_the_processor_torch_and_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    two = nbtools.machine_signature()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert two != nbtools.machine_signature() and two.endswith("OMP_NUM_THREADS=2")
    assert "torch 2." in two


def test_mode_follows_the_stamp_and_the_override(monkeypatch):
    monkeypatch.delenv("DDLIB_NBVAL", raising=False)
    here = nbtools.stamp(nbformat.v4.new_notebook(), nbtools.machine_signature())
    other = nbtools.stamp(nbformat.v4.new_notebook(), "AuthenticAMD family 25 model 1; torch 0; OMP_NUM_THREADS=2")
    assert nbtools.made_on(here) == nbtools.machine_signature()
    assert tol.mode_for(here) == "exact"
    assert tol.mode_for(other) == "tolerant"
    assert tol.mode_for(nbformat.v4.new_notebook()) == "tolerant"     # unstamped: made who knows where
    monkeypatch.setenv("DDLIB_NBVAL", "exact")
    assert tol.mode_for(other) == "exact"
    monkeypatch.setenv("DDLIB_NBVAL", "loose")
    with pytest.raises(ValueError, match="DDLIB_NBVAL"):
        tol.mode_for(other)


def test_cells_tagged_loose_get_the_loose_tolerance():
    assert tol.tolerance_for(nbformat.v4.new_code_cell("x", metadata={"tags": [tol.LOOSE_TAG]})) == tol.LOOSE
    assert tol.tolerance_for(nbformat.v4.new_code_cell("x")) == tol.TIGHT


def _notebook(stored: str, signature: str):
    nb = make_notebook(None, 'print("accuracy 0.930 on 12 images")')
    cell = nb.cells[0]
    cell.execution_count = 1
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=stored)]
    return nbtools.stamp(nb, signature)


def test_nbval_with_the_plugin_end_to_end(tmp_path):
    """Three notebooks whose stored output differs from what the cell prints: on the stamped machine the last
    digit fails; from another machine it passes, and a gross difference still fails."""
    here = "accuracy 0.931 on 12 images\n"
    cases = {"same_machine": (here, None), "other_machine": (here, "another CPU"),
             "other_machine_regressed": ("accuracy 0.731 on 12 images\n", "another CPU")}
    env = {k: v for k, v in os.environ.items() if k != "DDLIB_NBVAL"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # the signature the pytest subprocess will compute (same environment, same machine)
    signature = subprocess.run([sys.executable, "-c", "from ddlib import nbtools; print(nbtools.machine_signature())"],
                               env=env, capture_output=True, text=True, check=True).stdout.strip()
    for name, (stored, made_on) in cases.items():
        nbformat.write(_notebook(stored, made_on or signature), tmp_path / f"{name}.ipynb")
    done = subprocess.run([sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env", "-p", "nbval_tolerance",
                           "-p", "no:cacheprovider", "-q", "-rA", *sorted(p.name for p in tmp_path.glob("*.ipynb"))],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    report = done.stdout
    assert "PASSED other_machine.ipynb" in report, report
    assert "FAILED same_machine.ipynb" in report, report
    assert "FAILED other_machine_regressed.ipynb" in report, report
