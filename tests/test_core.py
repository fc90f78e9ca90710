"""runtime (seeding, devices), results (summary.csv, run folders) and train (evaluation protocol)."""

import csv

import pytest
import torch
from torch import nn

from ddlib import results
from ddlib.runtime import get_device, seed_everything
from ddlib.train import EvalResult, accuracy, evaluate_protocol, soft_cross_entropy, train_classifier


def test_seeded_runs_are_identical():
    def run():
        seed_everything(3)
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
        x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
        train_classifier(model, x, y, epochs=3, lr=0.1, batch_size=16)
        return torch.cat([p.flatten() for p in model.parameters()])

    assert torch.equal(run(), run())


def test_device_selection():
    assert get_device("cpu").type == "cpu"
    assert get_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device='tpu'"):
        get_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no GPU"):
            get_device("cuda")


def test_summary_rows_upsert_and_keep_others(tmp_path):
    path = tmp_path / "summary.csv"
    base = {"notebook": "02", "scale": "quick", "dataset": "digits", "model": "lenet", "setting": "ipc=1",
            "metric": "test_acc"}
    results.write_summary_rows([{**base, "method": "dd", "value": 0.5, "std": 0.01, "runs": 5},
                                {**base, "method": "random", "value": 0.3, "runs": 5}], path)
    results.write_summary_rows([{**base, "notebook": "03", "method": "dd", "value": 0.6}], path)
    # re-running notebook 02's "dd" row replaces it; the other rows survive
    results.write_summary_rows([{**base, "method": "dd", "value": 0.55, "paper_value": 0.94, "seconds": 12.5}], path)
    rows = results.read_summary(path)
    assert len(rows) == 3
    by = {(r["notebook"], r["method"]): r for r in rows}
    assert by[("02", "dd")]["value"] == "0.55" and by[("02", "dd")]["paper_value"] == "0.94"
    assert by[("02", "dd")]["std"] == ""          # a replaced row does not inherit old columns
    assert by[("02", "random")]["value"] == "0.3" and by[("03", "dd")]["value"] == "0.6"
    with path.open() as f:
        assert tuple(next(csv.reader(f))) == results.SUMMARY_COLUMNS


def test_summary_rows_reject_bad_input(tmp_path):
    path = tmp_path / "summary.csv"
    ok = {"notebook": "02", "scale": "quick", "dataset": "d", "model": "m", "method": "x", "setting": "s",
          "metric": "test_acc", "value": 0.5}
    with pytest.raises(ValueError, match="fractions"):
        results.write_summary_rows([{**ok, "value": 94.0}], path)
    with pytest.raises(ValueError, match="unknown columns"):
        results.write_summary_rows([{**ok, "acc": 1}], path)
    with pytest.raises(ValueError, match="scale"):
        results.write_summary_rows([{**ok, "scale": "huge"}], path)
    with pytest.raises(ValueError, match="missing"):
        results.write_summary_rows([{k: v for k, v in ok.items() if k != "method"}], path)
    assert not path.exists()


def test_run_dir_respects_ddlib_results(tmp_path, monkeypatch):
    monkeypatch.setenv("DDLIB_RESULTS", str(tmp_path))
    run = results.run_dir("99_demo", "quick", tag="a")
    assert run.path == tmp_path / "quick" / "99_demo__a"
    run.save_json("metrics", {"acc": torch.tensor(0.5), "curve": torch.arange(3)})
    assert (run.path / "metrics.json").read_text().count("0.5") == 1
    run.record([{"dataset": "d", "model": "m", "method": "x", "setting": "", "metric": "loss", "value": 1.5}])
    assert results.read_summary()[0]["notebook"] == "99_demo"
    grid = results.image_grid(torch.zeros(4, 1, 8, 8), mean=(0.5,), std=(0.25,), nrow=2)
    assert grid.shape == (19, 19) and abs(grid.max() - 1.0) < 1e-6  # padding is white, images mid-grey
    with pytest.raises(ValueError, match="scale"):
        results.run_dir("99_demo", "medium")


def test_evaluate_protocol_mean_std_and_same_inits():
    x = torch.randn(200, 4)
    y = (x[:, 0] > 0).long()
    make = lambda: nn.Linear(4, 2)  # noqa: E731
    inits = []

    def fit(model, k):
        inits.append(model.weight.detach().clone())
        train_classifier(model, x, y, epochs=20, lr=0.5, batch_size=50)

    res = evaluate_protocol(make, fit, x, y, num_nets=3, seed=7)
    inits_again = []
    evaluate_protocol(make, lambda m, k: inits_again.append(m.weight.detach().clone()), x, y, num_nets=3, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(inits, inits_again))
    assert not torch.equal(inits[0], inits[1])
    assert res.runs == 3 and res.mean > 0.9
    assert res.std == pytest.approx(torch.tensor(res.accs, dtype=torch.float64).std(unbiased=False).item(), abs=1e-12)
    assert "3 nets" in res.summary()
    # functional fit: returning params evaluates those, not the module's own
    zero = lambda m, k: {n: torch.zeros_like(p) for n, p in m.named_parameters()}  # noqa: E731
    # zero logits predict class 0 everywhere
    assert evaluate_protocol(make, zero, x, y, num_nets=1).mean == pytest.approx((y == 0).float().mean().item())
    assert accuracy(nn.Linear(4, 2), x, y, zero(nn.Linear(4, 2), 0)) == pytest.approx((y == 0).float().mean().item())


def test_soft_cross_entropy_matches_hard_labels():
    logits = torch.randn(6, 3)
    y = torch.randint(0, 3, (6,))
    hard = soft_cross_entropy(logits, y)
    soft = soft_cross_entropy(logits, torch.nn.functional.one_hot(y, 3).float() * 50)  # peaked logits
    assert soft == pytest.approx(hard.item(), rel=1e-4)
    with pytest.raises(ValueError, match="positive finite lr"):
        train_classifier(nn.Linear(2, 2), torch.zeros(2, 2), torch.zeros(2).long(), epochs=1, lr=0)


def test_eval_result_row():
    r = EvalResult([0.5, 0.7])
    assert r.row(method="dd") == {"metric": "test_acc", "value": pytest.approx(0.6), "std": pytest.approx(0.1),
                                  "runs": 2, "method": "dd"}
