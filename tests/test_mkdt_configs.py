"""The MKDT parameter files (configs/06) are checked to *start*: every file passes the papermill driver's
key check against notebook 06, and one file per dataset runs the notebook end to end through the driver with its own values,
tiny overrides and generated data (random pixels: only shapes and plumbing are exercised, not accuracy)."""

from __future__ import annotations

import pytest
import yaml

from ddlib import reproduce
from ddlib.data import DATASETS
from ddlib.results import repo_root

from config_runs import run_config
from fake_data import write_cifar10, write_cifar100, write_mnist

NUMBER = "06"
CONFIGS = repo_root() / "configs" / NUMBER
FILES = sorted(CONFIGS.glob("*.yaml"))

# Shrinks a run to seconds without changing its code path (the file's own values stay otherwise).
TINY = {"teacher_epochs": 1, "teacher_batch": 32, "projector_dims": [16, 16], "num_experts": 1,
        "expert_train_epochs": 3, "batch_train": 32, "syn_steps": 2, "iterations": 2, "batch_syn": 0,
        "pretrain_epochs": 1, "eval_seeds": [0], "transfer_seeds": [0], "label_draws": 1, "probe_steps": 5,
        "variance_batches": 2, "variance_batch_sizes": [8], "check_claims": False, "net_width": 4, "teacher_width": 4,
        "train_limit": 40, "test_limit": 20}


def _write_data(dataset: str, root):
    if dataset == "cifar10":
        return write_cifar10(root)  # 15 train images per class, 2 test
    if dataset == "cifar100":
        return write_cifar100(root, train=200, test=100)
    if dataset == "mnist":
        return write_mnist(root)
    return root  # digits: embedded


def _notebook() -> reproduce.Notebook:
    return reproduce.find_notebook(repo_root() / "notebooks", NUMBER)


def test_the_expected_files_exist_and_are_consistent():
    stems = {p.stem for p in FILES}
    assert stems == {f"paper_{d}_{p}pct" for d in ("cifar10", "cifar100") for p in (2, 5)} | {"cpu_mnist"}
    for path in FILES:
        text = path.read_text()
        v = yaml.safe_load(text)
        assert v["dataset"] in DATASETS and v["scale"] == "paper"
        assert 0 < v["subset_fraction"] <= 1 and all(0 < f <= 1 for f in v["label_fractions"])
        assert v["lr_label"] > 0 and v["max_start_epoch"] - 1 + v["expert_epochs"] <= v["expert_train_epochs"]
        assert "Sources:" in text.split("\nscale:")[0]
        if path.stem.startswith("paper_cifar"):
            assert v["teacher_model"] == "resnet18" and "GPU" in text
            assert (v["num_experts"], v["expert_train_epochs"], v["lr_expert"], v["syn_steps"]) == (100, 20, 0.1, 40)
            assert (v["net_width"], v["net_depth"], v["iterations"], v["lr_teacher"]) == (128, 3, 5000, 0.1)
            assert v["subset_fraction"] == int(path.stem.split("_")[-1][:-3]) / 100


def test_every_config_passes_the_driver_key_check(tmp_path):
    nb = _notebook()
    declared = reproduce.notebook_parameters(nb.path)
    jobs, notes = reproduce.plan([nb], "paper", repo_root() / "configs", tmp_path, device="cuda")
    assert [j.tag for j in jobs] == [p.stem for p in FILES] and not notes
    for job in jobs:
        assert set(job.parameters) <= set(declared)


# One executed file per dataset; the 5% files differ from the 2% ones only in subset_fraction.
EXECUTED = ("paper_cifar10_2pct", "paper_cifar100_2pct", "cpu_mnist")


@pytest.mark.parametrize("stem", EXECUTED)
def test_config_runs_on_tiny_generated_data(stem, tmp_path, monkeypatch):
    nb = _notebook()
    values = yaml.safe_load((CONFIGS / f"{stem}.yaml").read_text())
    root = tmp_path / "data"
    for name in (values["dataset"], values["transfer"]):  # the transfer probe's dataset is read too
        _write_data(name, root)
    overrides = {**values, **TINY, "data_root": str(root)}
    rows = run_config(nb, NUMBER, stem, overrides, tmp_path, monkeypatch)
    assert values["dataset"] in rows and "mkdt" in rows and "random_subset" in rows and "full_kd" in rows
    transfer_rows = [r for r in rows.splitlines() if f"{values['dataset']}->" in r]
    assert len(transfer_rows) == 5 * len(values["label_fractions"])  # mkdt, highloss, random, none, full_kd
