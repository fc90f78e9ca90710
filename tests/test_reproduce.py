"""The papermill batch driver (ddlib.reproduce) and the README results table (ddlib.readme).

Everything runs in temporary folders with tiny notebooks; three tests start a real kernel.
"""

from __future__ import annotations

import sys

import nbformat
import pytest

from ddlib import nbtools, readme, reproduce
from ddlib.reproduce import ReproduceError
from ddlib.results import repo_root, write_summary_rows

PARAMS = "alpha = 1\nlearning_rate = 0.1\nscale = 'quick'\ndevice = 'auto'\ntag = None"


def run(project, **kw):
    """Call the driver on ``project`` and collect what it prints."""
    lines = []
    rc = reproduce.reproduce(notebooks_dir=project.notebooks, configs_dir=project.configs,
                             results_dir=project.results, echo=lines.append, **kw)
    return rc, "\n".join(lines)


# ----------------------------------------------------------------------------- no kernel

def test_discover_and_select(project):
    project.add("01_first", PARAMS)
    project.add("02_second", PARAMS)
    project.add("scratch", PARAMS)  # not NN_name: ignored
    found = reproduce.discover_notebooks(project.notebooks)
    assert [nb.name for nb in found] == ["01_first", "02_second"]
    assert [nb.name for nb in reproduce.select_notebooks(found, "2")] == ["02_second"]
    assert [nb.name for nb in reproduce.select_notebooks(found, "02,01")] == ["01_first", "02_second"]
    assert len(reproduce.select_notebooks(found, "")) == 2


def test_unknown_only_lists_available(project):
    project.add("01_first", PARAMS)
    with pytest.raises(ReproduceError, match=r"--only 07.*available: 01_first"):
        run(project, only="07")


def test_unknown_scale_lists_scales(project, capsys):
    project.add("01_first", PARAMS)
    with pytest.raises(ReproduceError, match=r"quick, paper"):
        run(project, scale="huge")
    rc = reproduce.main(["--scale", "huge", "--notebooks", str(project.notebooks)])
    assert rc == 2 and "unknown scale" in capsys.readouterr().err


def test_misspelt_config_key_is_rejected_before_anything_runs(project, monkeypatch):
    project.add("01_first", PARAMS)
    project.add("02_second", PARAMS)
    project.config("01", "paper_ok", "alpha: 2\n")
    project.config("02", "paper_typo", "lerning_rate: 0.5\n")
    monkeypatch.setattr(reproduce, "run_job", lambda *a, **k: pytest.fail("nothing may run"))
    with pytest.raises(ReproduceError) as err:
        run(project, scale="paper")
    message = str(err.value)
    assert "paper_typo.yaml" in message and "'lerning_rate'" in message
    assert "did you mean 'learning_rate'" in message
    assert not project.results.exists()


def test_paper_plan_injects_only_what_differs(project):
    project.add("01_first", PARAMS)
    project.add("02_no_configs", PARAMS)
    project.config("01", "paper_fixed_init", "alpha: 1\nlearning_rate: 0.3\nscale: paper\n")
    project.config("01", "paper_random_init", "alpha: 5\n")
    notebooks = reproduce.discover_notebooks(project.notebooks)
    jobs, notes = reproduce.plan(notebooks, "paper", project.configs, project.results, device="cuda")
    assert [j.tag for j in jobs] == ["paper_fixed_init", "paper_random_init"]
    assert jobs[0].parameters == {"tag": "paper_fixed_init", "learning_rate": 0.3, "device": "cuda", "scale": "paper"}
    assert jobs[1].parameters["alpha"] == 5
    assert jobs[0].output == project.results / "paper" / "01_first__paper_fixed_init.ipynb"
    assert any("02_no_configs" in n and "skipped" in n for n in notes)

    quick, _ = reproduce.plan(notebooks, "quick", project.configs, project.results)
    assert [j.parameters for j in quick] == [{}, {}]  # defaults are quick mode: nothing injected
    assert quick[0].output == project.results / "quick" / "01_first.ipynb"


def test_write_back_refuses_overrides(project):
    project.add("01_first", PARAMS)
    with pytest.raises(ReproduceError, match="write-back"):
        run(project, device="cpu", write_back_ok=True)


def test_repository_configs_match_their_notebooks():
    root = repo_root()
    notebooks = reproduce.discover_notebooks(root / "notebooks")
    reproduce.check_all_configs(notebooks, root / "configs")  # raises on a misspelt key


# ----------------------------------------------------------------------------- real runs

def test_failing_notebook_does_not_stop_the_batch(project):
    project.add("01_broken", PARAMS, "raise ValueError('boom')")
    good = project.add("02_fine", PARAMS, "print('result', round(alpha / 3, 3))", tags={0: ["nbval-ignore-output"]})
    rc, out = run(project, write_back_ok=True)
    assert rc == 1
    assert "01_broken" in out and "ValueError: boom" in out and "01_broken.ipynb" in out
    table = out[out.index("notebook  "):]
    assert "01_broken" in table and "FAILED" in table and "02_fine" in table
    for name in ("01_broken", "02_fine"):
        executed = nbformat.read(project.results / "quick" / f"{name}.ipynb", as_version=4)
        assert "papermill" not in executed.metadata
        assert all("papermill" not in c.metadata and "execution" not in c.metadata for c in executed.cells)
    written = nbformat.read(good, as_version=4)
    assert written.cells[1].outputs[0]["text"] == "result 0.333\n"
    assert written.cells[1].metadata["tags"] == ["nbval-ignore-output"]
    assert written.cells[0].metadata["tags"] == ["parameters"]
    assert written.metadata["kernelspec"]["name"] == "ddlab"
    assert nbtools.made_on(written) == nbtools.machine_signature()  # nbval compares exactly only on this machine
    assert not nbformat.read(project.notebooks / "01_broken.ipynb", as_version=4).cells[1].outputs


def test_paper_run_writes_tagged_copy_with_injected_values(project):
    project.add("01_first", PARAMS, "import os, sys\nprint(alpha, scale, tag, os.path.basename(os.getcwd()))",
                "print(sys.executable)")
    project.config("01", "paper_a", "alpha: 7\n")
    rc, out = run(project, scale="paper")
    assert rc == 0, out
    executed = nbformat.read(project.results / "paper" / "01_first__paper_a.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    assert executed.cells[-2].outputs[0]["text"] == "7 paper paper_a notebooks\n"  # cwd is notebooks/
    assert executed.cells[-1].outputs[0]["text"].strip() == sys.executable  # the kernel is this interpreter


# ----------------------------------------------------------------------------- README table

def _summary(tmp_path):
    path = tmp_path / "summary.csv"
    write_summary_rows([
        dict(notebook="02_single_step", scale="paper", dataset="mnist", model="lenet", method="dd",
             setting="fixed init, 10 img", metric="test_acc", value=0.9412, std=0.012, runs=5,
             paper_value=0.94, seconds=812.3),
        dict(notebook="01_linear", scale="quick", dataset="synthetic", model="linear", method="closed form",
             setting="M=D", metric="loss_gap", value=2.5e-3, seconds=0.42),
        dict(notebook="02_single_step", scale="quick", dataset="digits", model="mlp", method="dd",
             setting="fixed init", metric="test_acc", value=0.87, runs=1),
    ], path)
    return path


def test_results_table(tmp_path):
    rows = readme.load_rows(_summary(tmp_path))
    table = readme.render_table(rows).splitlines()
    assert table[0].startswith("| notebook | scale | dataset")
    assert [line.split("|")[1].strip() + "/" + line.split("|")[2].strip() for line in table[2:]] == [
        "01_linear/quick", "02_single_step/quick", "02_single_step/paper"]
    assert "| 94.1% ± 1.2 | 94.0 | 5 | 812 |" in table[4]
    assert "| 87.0% |  | 1 |  |" in table[3]
    assert "| 0.0025 |" in table[2] and "0.4" in table[2]
    assert readme.render_table([]) == readme.NO_RESULTS
    assert readme.load_rows(tmp_path / "missing.csv") == []


def test_readme_update_and_check(tmp_path):
    summary = _summary(tmp_path)
    doc = tmp_path / "README.md"
    doc.write_text(f"# t\n\n## Results\n\n{readme.START}\nold\n{readme.END}\n\nafter\n")
    args = ["--summary", str(summary), "--readme", str(doc)]
    assert readme.main(args + ["--check"]) == 1
    assert readme.main(args) == 0
    text = doc.read_text()
    assert "old" not in text and "94.1% ± 1.2" in text and text.endswith(f"{readme.END}\n\nafter\n")
    assert readme.main(args + ["--check"]) == 0
    doc.write_text("# no markers\n")
    assert readme.main(args) == 2


def test_repository_readme_is_up_to_date():
    doc = repo_root() / "README.md"
    if not doc.exists() or readme.START not in doc.read_text():
        pytest.skip("README.md has no results block yet")
    assert readme.main(["--check"]) == 0, "run `make readme` (python -m ddlib.readme)"


def test_every_parameter_of_the_real_notebooks_is_visible_to_papermill():
    """papermill silently skips a parameters-cell line it cannot parse (e.g. a comma in the comment);
    such a parameter could then never be set from a config file."""
    import ast

    import nbformat
    import papermill

    from ddlib.results import repo_root

    for path in sorted((repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        assigned = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)}
        assert assigned == set(papermill.inspect_notebook(str(path))), path.name


def test_config_filter_selects_one_paper_file(tmp_path):
    from ddlib.reproduce import ReproduceError, discover_notebooks, plan, reproduce

    nb_dir, cfg_dir = tmp_path / "notebooks", tmp_path / "configs"
    nb_dir.mkdir()
    (cfg_dir / "01").mkdir(parents=True)
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell("alpha = 1")
    cell.metadata["tags"] = ["parameters"]
    nb.cells.append(cell)
    nbformat.write(nb, nb_dir / "01_demo.ipynb")
    (cfg_dir / "01" / "paper_a.yaml").write_text("alpha: 2\n")
    with pytest.raises(ReproduceError, match="available: \\['paper_a'\\]"):
        reproduce("paper", None, config="paper_b", notebooks_dir=nb_dir, configs_dir=cfg_dir, results_dir=tmp_path / "r")
    with pytest.raises(ReproduceError, match="quick mode"):
        reproduce("quick", None, config="paper_a", notebooks_dir=nb_dir, configs_dir=cfg_dir, results_dir=tmp_path / "r")
    # the stem, the file name and the path (as typed from the checkout, e.g. configs/01/paper_a.yaml) all name it
    (cfg_dir / "01" / "paper_b2.yaml").write_text("alpha: 3\n")
    for given in ("paper_a", "paper_a.yaml", str(cfg_dir / "01" / "paper_a.yaml")):
        jobs, _ = plan(discover_notebooks(nb_dir), "paper", cfg_dir, tmp_path / "r", config=given)
        assert [j.tag for j in jobs] == ["paper_a"], given
    (tmp_path / "paper_a.yaml").write_text("alpha: 4\n")
    jobs, _ = plan(discover_notebooks(nb_dir), "paper", cfg_dir, tmp_path / "r", config=str(tmp_path / "paper_a.yaml"))
    assert jobs == []  # a path elsewhere is not that file, even with the same name
