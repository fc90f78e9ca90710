"""Shared pytest configuration and fixtures.

- ``DDLIB_RESULTS`` defaults to ``<repo>/.pytest_results`` (gitignored) so that a bare
  ``pytest tests`` can never write into the committed ``results/``; ``make test`` sets it too.
- Notebooks are checked by nbval from the Makefile (``make test-notebooks``) with
  ``--nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg``; this conftest is not
  loaded for ``notebooks/`` and needs no nbval settings.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("DDLIB_RESULTS", str(REPO / ".pytest_results"))


def make_notebook(parameters: str | None, *cells: str, tags: dict[int, list[str]] | None = None):
    """An in-memory notebook: an optional ``parameters``-tagged cell, then code ``cells``.

    ``tags`` maps a code-cell index (0 = first of ``cells``) to extra tags.
    """
    nb = nbformat.v4.new_notebook()
    if parameters is not None:
        nb.cells.append(nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}))
    for i, source in enumerate(cells):
        meta = {"tags": list(tags[i])} if tags and i in tags else {}
        nb.cells.append(nbformat.v4.new_code_cell(source, metadata=meta))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


@pytest.fixture
def project(tmp_path):
    """A throwaway project layout: ``notebooks/``, ``configs/``, ``results/`` under ``tmp_path``.

    Returns an object with those three paths and ``add(name, parameters, *cells)`` which writes
    ``notebooks/<name>.ipynb`` and returns its path, and ``config(number, tag, text)`` which
    writes ``configs/<number>/<tag>.yaml``.
    """

    class Project:
        root = tmp_path
        notebooks = tmp_path / "notebooks"
        configs = tmp_path / "configs"
        results = tmp_path / "results"

        def add(self, name: str, parameters: str | None, *cells: str, **kw) -> Path:
            self.notebooks.mkdir(exist_ok=True)
            path = self.notebooks / f"{name}.ipynb"
            nbformat.write(make_notebook(parameters, *cells, **kw), path)
            return path

        def config(self, number: str, tag: str, text: str) -> Path:
            folder = self.configs / number
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{tag}.yaml"
            path.write_text(text)
            return path

    return Project()
