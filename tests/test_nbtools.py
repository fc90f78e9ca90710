"""ddlib.nbtools (stripping executed notebooks) and the nbval sanitize policy."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbval.plugin import coalesce_streams, get_sanitize_patterns

from ddlib import nbtools
from conftest import make_notebook

SANITIZE = Path(__file__).with_name("nbval_sanitize.cfg")


def _stream(name, text):
    return nbformat.v4.new_output("stream", name=name, text=text)


def _papermill_like_notebook():
    nb = make_notebook("alpha = 1", "print(alpha)", tags={0: ["nbval-ignore-output"]})
    nb.cells.insert(1, nbformat.v4.new_code_cell("alpha = 2", metadata={"tags": ["injected-parameters"]}))
    nb.metadata["papermill"] = {"duration": 1.2, "parameters": {"alpha": 2}}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    for i, cell in enumerate(nb.cells, 1):
        cell.execution_count = i
        cell.metadata["papermill"] = {"duration": 0.1, "status": "completed"}
        cell.metadata["execution"] = {"iopub.execute_input": "2025-01-01T00:00:00Z"}
        cell.metadata.setdefault("tags", [])
    code = nb.cells[2]
    code.outputs = [
        _stream("stderr", "\rtrain:   0%|          | 0/3 [00:00<?, ?it/s]"),
        _stream("stderr", "\rtrain: 100%|##########| 3/3 [00:00<00:00, 97.1it/s]"),
        _stream("stderr", "\n"),
        _stream("stdout", "2\n"),
        nbformat.v4.new_output("display_data", data={nbtools.WIDGET_MIME: {"model_id": "x"}, "text/plain": "bar"}),
    ]
    return nb


def test_strip_volatile_removes_run_metadata_and_keeps_tags():
    nb = nbtools.strip_volatile(nbtools.stamp(_papermill_like_notebook(), "some machine"))
    assert "papermill" not in nb.metadata and "widgets" not in nb.metadata
    assert nbtools.made_on(nb) is None  # outputs saved from Jupyter are not vouched for
    assert nb.metadata["kernelspec"] == nbtools.kernelspec()
    for cell in nb.cells:
        assert "papermill" not in cell.metadata and "execution" not in cell.metadata
        assert cell.execution_count is not None  # nbval only compares cells that have one
    assert [c.metadata.get("tags") for c in nb.cells] == [["parameters"], ["injected-parameters"], ["nbval-ignore-output"]]
    outputs = nb.cells[2].outputs
    assert [o.output_type for o in outputs] == ["stream", "stream"]  # widget output dropped
    assert outputs[0].text == "train: 100%|##########| 3/3 [00:00<00:00, 97.1it/s]\n"
    nbformat.validate(nb)


def test_strip_injected_parameters():
    nb = nbtools.strip_injected_parameters(_papermill_like_notebook())
    assert all("injected-parameters" not in c.metadata.get("tags", []) for c in nb.cells)
    assert len(nb.cells) == 2


def test_collapse_redraws_agrees_with_nbval():
    text = "\r  0%| | 0/5\r 40%| | 2/5\r     \r"
    assert nbtools.collapse_redraws(text) == "     \r"
    merged = coalesce_streams([_stream("stderr", "a\r"), _stream("stderr", "b\n")])
    assert merged[0].text == nbtools.collapse_redraws("a\rb\n") == "b\n"


def _sanitize(text):
    import re

    for regex, replace in get_sanitize_patterns(SANITIZE.read_text()):
        text = re.sub(regex, replace, text)
    return text


def test_sanitize_hides_progress_timings_but_not_results():
    a = "/home/a/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: x\ntrain: 100%|#| 30/30 [00:01<00:00, 95.69it/s, loss=0.1]\n"
    b = "/ci/x/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: x\ntrain: 100%|#| 30/30 [01:02<00:00,  1.23s/it, loss=0.2]\n"
    assert _sanitize(a) == _sanitize(b)
    assert _sanitize("5it [00:00, 19.8it/s]") == _sanitize("5it [00:03, 1.2it/s]")
    assert _sanitize("          \r") == _sanitize("   \r")
    assert _sanitize("took 12.3 s") == _sanitize("took 850 ms")
    assert _sanitize("train: 100%|#| 30/30 [00:01<00:00]") != _sanitize("train: 97%|#| 29/30 [00:01<00:00]")
    assert _sanitize("test accuracy 0.912, 5 seeds") != _sanitize("test accuracy 0.913, 5 seeds")
