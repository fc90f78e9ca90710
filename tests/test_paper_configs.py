"""Paper-scale parameter files that need a GPU or data this machine lacks are checked to *start*:
the notebook runs end to end with the file's values, tiny sizes and generated data."""

from pathlib import Path

import pytest
import yaml

from ddlib.results import repo_root

from fake_data import write_cifar10  # tests/ is on sys.path (pytest rootdir-relative import)

# Per notebook: parameter overrides that shrink a run to seconds without changing its code path.
TINY = {
    "02": {"outer_iters": 2, "baseline_iters": 1, "eval_nets": 1, "n_fixed_inits": 1, "real_batch": 16,
           "nets_per_iter": 1, "checkpoint_every": 0, "device": "cpu", "check_claims": False},
}
# Config files whose data is generated here (the rest are run for real: see the README's results table).
GENERATED = {"cifar10": write_cifar10}


def _configs():
    for number, overrides in TINY.items():
        for path in sorted((repo_root() / "configs" / number).glob("*.yaml")):
            values = yaml.safe_load(path.read_text())
            if values.get("dataset") in GENERATED:
                yield pytest.param(number, path, id=f"{number}/{path.stem}")


@pytest.mark.parametrize("number,path", list(_configs()))
def test_paper_config_starts_on_tiny_generated_data(number, path, tmp_path, monkeypatch):
    import papermill

    values = yaml.safe_load(path.read_text())
    GENERATED[values["dataset"]](tmp_path / "data")
    monkeypatch.setenv("DDLIB_RESULTS", str(tmp_path / "results"))
    notebook = next((repo_root() / "notebooks").glob(f"{number}_*.ipynb"))
    params = {**values, **TINY[number], "data_root": str(tmp_path / "data"), "scale": "paper", "tag": path.stem}
    papermill.execute_notebook(str(notebook), str(tmp_path / "out.ipynb"), parameters=params,
                               cwd=str(notebook.parent), kernel_name="python3", progress_bar=False)
    rows = (tmp_path / "results" / "summary.csv").read_text()
    assert values["dataset"] in rows and values["model"] in rows
