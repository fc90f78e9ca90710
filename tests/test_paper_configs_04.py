"""Notebook 04 with every configs/04 file, checked to *start* on tiny generated MNIST / USPS / SVHN files
(the adaptation pairs need data this machine lacks; the MNIST files are run for real, see the README), and the
notebook's bad-input errors, raised before any work starts."""

from pathlib import Path

import pytest
import yaml

from ddlib.results import repo_root

from fake_data import write_mnist, write_svhn, write_usps  # tests/ is on sys.path

NOTEBOOK = repo_root() / "notebooks" / "04_dd_variants.ipynb"
# Shrinks every part to seconds without changing its code path.
TINY = {"outer_iters": 2, "baseline_iters": 1, "eval_nets": 1, "n_fixed": 1, "real_batch": 16, "nets_per_iter": 1,
        "pool_train": 2, "pool_test": 1, "pretrain_epochs": 1, "adapt_ipc": [1], "finetune_epochs": 1,
        "checkpoint_every": 0, "device": "cpu", "check_claims": False}
WRITERS = {"mnist": lambda root: write_mnist(root, train=120, test=40), "usps": write_usps, "svhn": write_svhn}


def _datasets(values):
    return {values.get(k) for k in ("dataset", "source_dataset", "target_dataset")} & set(WRITERS)


def _run(tmp_path, monkeypatch, params):
    import papermill

    monkeypatch.setenv("DDLIB_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("DDLIB_CACHE", str(tmp_path / "cache"))
    return papermill.execute_notebook(str(NOTEBOOK), str(tmp_path / "out.ipynb"), parameters=params,
                                      cwd=str(NOTEBOOK.parent), kernel_name="python3", progress_bar=False)


CONFIGS = sorted((repo_root() / "configs" / "04").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_paper_config_starts_on_tiny_generated_data(path, tmp_path, monkeypatch):
    values = yaml.safe_load(path.read_text())
    for name in _datasets(values):
        WRITERS[name](tmp_path / "data")
    _run(tmp_path, monkeypatch, {**values, **TINY, "data_root": str(tmp_path / "data"), "scale": "paper",
                                 "tag": path.stem})
    rows = (tmp_path / "results" / "summary.csv").read_text()
    assert values["model"] in rows
    part = {"inits": "pretrained", "adapt": "adapt_", "attack": "attack_"}
    for section in values["sections"]:
        assert part[section] in rows
    assert list((tmp_path / "results" / "paper" / f"04_dd_variants__{path.stem}" / "pools").glob("*.safetensors"))


def test_every_part_and_every_pair_has_a_config():
    stems = {p.stem for p in CONFIGS}
    assert {"paper_mnist_pretrained_inits", "paper_mnist_attack", "paper_adapt_mnist_usps", "paper_adapt_usps_mnist",
            "paper_adapt_svhn_mnist"} <= stems


def _fails_before_work(tmp_path, monkeypatch, params, match):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as err:
        _run(tmp_path, monkeypatch, {**TINY, **params})
    assert match in str(err.value)
    assert not list((tmp_path / "results").rglob("*.safetensors"))   # no pool trained, nothing distilled


@pytest.mark.parametrize("params,match", [
    ({"attack_class": 4, "target_class": 4}, "different"),
    ({"attack_class": 10, "target_class": 1}, "attack_class=10"),
    ({"attack_class": 2, "target_class": -3}, "target_class=-3"),
])
def test_bad_attack_classes_fail_before_any_work(params, match, tmp_path, monkeypatch):
    _fails_before_work(tmp_path, monkeypatch, {"sections": ["attack"], **params}, match)


def test_a_pool_of_another_architecture_or_dataset_fails_before_any_work(tmp_path, monkeypatch):
    import torch
    from ddlib import pretrained
    from ddlib.models import build

    def pool_file(model, dataset, shape, name):
        torch.manual_seed(0)
        net = build(model, shape, 10)
        pool = pretrained.Pool([dict(net.named_parameters())],
                               {"model": model, "dataset": dataset, "input_shape": list(shape), "num_classes": 10})
        return pretrained.save_pool(pool, tmp_path / "pools" / name)

    other_arch = pool_file("lenet", "digits", (1, 8, 8), "lenet.safetensors")
    other_data = pool_file("mlp", "mnist", (1, 28, 28), "mnist.safetensors")
    for path, match in ((other_arch, "model='lenet'"), (other_data, "dataset='mnist'")):
        run = tmp_path / path.stem
        run.mkdir()
        _fails_before_work(run, monkeypatch, {"pretrained_path": str(path)}, match)
