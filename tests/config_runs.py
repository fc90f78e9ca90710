"""Run one paper-scale parameter file through the same planner and runner as ``make reproduce SCALE=paper``,
with tiny overrides, in a temporary project folder (the notebook config tests of 05 and 06 share this)."""

from __future__ import annotations

from pathlib import Path

import yaml

from ddlib import reproduce


def run_config(nb: reproduce.Notebook, number: str, stem: str, overrides: dict, tmp_path: Path, monkeypatch) -> str:
    """Write ``configs/<number>/<stem>.yaml`` = ``overrides`` under ``tmp_path``, plan and run it on CPU with
    results and caches under ``tmp_path``; assert it ran and return the text of the summary it wrote."""
    monkeypatch.setenv("DDLIB_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("DDLIB_CACHE", str(tmp_path / "cache"))
    configs = tmp_path / "configs"
    (configs / number).mkdir(parents=True)
    (configs / number / f"{stem}.yaml").write_text(yaml.safe_dump(overrides))
    jobs, _ = reproduce.plan([nb], "paper", configs, tmp_path / "results", device="cpu", config=stem)
    assert len(jobs) == 1
    outcome = reproduce.run_job(jobs[0], reproduce.resolve_kernel(), cwd=nb.path.parent)
    assert outcome.ok, f"{stem}: {outcome.error} (executed copy: {jobs[0].output})"
    return (tmp_path / "results" / "summary.csv").read_text()
