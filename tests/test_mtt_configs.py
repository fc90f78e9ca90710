"""The paper-scale MTT parameter files (configs/05) are checked to *start*: every file passes the
papermill driver's key check against notebook 05, and one file per dataset family (CIFAR-10,
CIFAR-100, Tiny ImageNet, an ImageNet subset) runs the notebook end to end through the driver with
its own values, tiny overrides and generated data (random pixels: only shapes and plumbing are
exercised, not accuracy)."""

from __future__ import annotations

import re

import pytest
import yaml

from ddlib import reproduce
from ddlib.data import DATASETS
from ddlib.imagefolders import IMAGENET_SUBSETS
from ddlib.models import MODELS
from ddlib.results import repo_root

from config_runs import run_config
from fake_data import write_cifar10, write_cifar100, write_imagenet, write_tinyimagenet

NUMBER = "05"
CONFIGS = repo_root() / "configs" / NUMBER
FILES = sorted(CONFIGS.glob("paper_*.yaml"))  # the paper's rows (GPU)
CPU_FILES = sorted(CONFIGS.glob("cpu_*.yaml"))  # reduced runs made on a CPU (real MNIST), executed by hand

# Shrinks a run to seconds without changing its code path (the file's own values stay otherwise).
TINY = {"num_experts": 1, "train_epochs": 2, "max_start_epoch": 1, "expert_epochs": 1, "syn_steps": 2,
        "iterations": 2, "eval_epochs": 2, "eval_nets": 1, "cross_arch_nets": 1, "cross_arch_epochs": 2, "eval_every": 0,
        "coresets": ["random"],
        "ablation": False, "check_claims": False, "net_width": 8, "batch_train": 8,
        # random pixels and 2-epoch experts give the learned lr gradients no run of the paper sees; with the
        # files' lr_lr (up to 1e-4) it turns negative at once and the divergence guard stops the run
        "lr_lr": 1e-9}
# One executed file per family; the others share its code path and pass the key check.
EXECUTED = ("paper_cifar10_ipc1", "paper_cifar100_ipc1", "paper_tinyimagenet_ipc1", "paper_imagenette_ipc1")


def _family(dataset: str) -> str:
    return "imagenet_subset" if dataset in IMAGENET_SUBSETS else dataset


def _write_data(dataset: str, root):
    if dataset == "cifar10":
        return write_cifar10(root)  # 15 train images per class, 2 test
    if dataset == "cifar100":
        return write_cifar100(root, train=200, test=100)  # 2 / 1 per class
    if dataset == "tinyimagenet":
        return write_tinyimagenet(root, num_classes=10, train_per_class=3, val_per_class=2)  # 10 of the 200
    return write_imagenet(root, IMAGENET_SUBSETS[dataset][0], train_per_class=3, val_per_class=2)


def _notebook() -> reproduce.Notebook:
    return reproduce.find_notebook(repo_root() / "notebooks", NUMBER)


# --------------------------------------------------------------------------- the files themselves


def test_the_expected_files_exist():
    stems = {p.stem for p in FILES}
    wanted = {f"paper_{d}_ipc{i}" for d in ("cifar10", "cifar100", "tinyimagenet") for i in (1, 10, 50)}
    wanted |= {f"paper_{d}_ipc{i}" for d in IMAGENET_SUBSETS for i in (1, 10)}
    assert stems == wanted
    assert set(EXECUTED) <= stems
    # every dataset family of the folder has an executed representative
    assert {_family(yaml.safe_load(p.read_text())["dataset"]) for p in FILES} == \
        {_family(yaml.safe_load((CONFIGS / f"{s}.yaml").read_text())["dataset"]) for s in EXECUTED}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_config_values_are_consistent(path):
    """Registered dataset and model, one IPC matching the file name, paper-scale sizes, typed values,
    and a header that says where the numbers come from."""
    text = path.read_text()
    v = yaml.safe_load(text)
    m = re.fullmatch(r"paper_(\w+)_ipc(\d+)", path.stem)
    assert v["dataset"] == m.group(1) and v["dataset"] in DATASETS
    assert v["ipcs"] == [int(m.group(2))]
    assert v["model"] in MODELS and v["model"] in {"convnet", "convnet_d4", "convnet_d5"}
    depth = {"convnet": 3, "convnet_d4": 4, "convnet_d5": 5}[v["model"]]
    assert v["net_depth"] == depth
    assert depth == (4 if v["dataset"] == "tinyimagenet" else 5 if v["dataset"] in IMAGENET_SUBSETS else 3)
    assert (v["num_experts"], v["train_epochs"], v["batch_train"], v["iterations"]) == (100, 50, 256, 5000)
    assert (v["eval_epochs"], v["eval_nets"], v["net_width"], v["dsa"]) == (1000, 5, 128, True)
    for key in ("lr_img", "lr_lr", "lr_teacher"):
        assert isinstance(v[key], float) and v[key] > 0, key  # e.g. "1e-5" would be a YAML string
    for key in ("syn_steps", "expert_epochs", "max_start_epoch", "batch_syn"):
        assert isinstance(v[key], int) and v[key] >= 0, key
    assert v["max_start_epoch"] + v["expert_epochs"] <= v["train_epochs"]
    assert isinstance(v["zca"], bool)
    assert v["dataset"] not in IMAGENET_SUBSETS or v["zca"] is False  # 49152-dim ZCA: not used by MTT
    assert v["paper_value"] is None or 0 < v["paper_value"] < 1
    header = text.split("\nscale:")[0]
    assert "GPU" in header and "Sources:" in header and "paper_value:" in header
    if v["paper_value"] is None:
        assert "NOT VERIFIED" in header


def test_every_config_passes_the_driver_key_check(tmp_path):
    """What ``make reproduce SCALE=paper ONLY=05`` checks before running anything, for all files."""
    nb = _notebook()
    declared = reproduce.notebook_parameters(nb.path)
    jobs, notes = reproduce.plan([nb], "paper", repo_root() / "configs", tmp_path, device="cuda")
    assert [j.tag for j in jobs] == sorted(p.stem for p in FILES + CPU_FILES) and not notes
    for job in jobs:
        assert job.parameters["scale"] == "paper" and job.parameters["device"] == "cuda"
        assert set(job.parameters) <= set(declared)


# --------------------------------------------------------------------------- one run per family


@pytest.mark.parametrize("stem", EXECUTED)
def test_config_runs_on_tiny_generated_data(stem, tmp_path, monkeypatch):
    nb = _notebook()
    values = yaml.safe_load((CONFIGS / f"{stem}.yaml").read_text())
    root = _write_data(values["dataset"], tmp_path / "data")
    overrides = {**values, **TINY, "eval_models": [values["model"]], "data_root": str(root)}
    rows = run_config(nb, NUMBER, stem, overrides, tmp_path, monkeypatch)
    assert values["dataset"] in rows and values["model"] in rows
