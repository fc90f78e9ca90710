"""Matching Training Trajectories (ddlib.mtt) on a tiny buffer of MLP experts."""

import pytest
import torch

from ddlib import buffers, mtt
from ddlib.train import soft_cross_entropy


def _data(n=120, d=8, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 2 * torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    return (centers[y] + torch.randn(n, d, generator=g)).view(n, 1, 1, d), y


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    x, y = _data()
    spec = buffers.ExpertSpec(dataset="blobs", model="mlp", input_shape=(1, 1, 8), num_outputs=3,
                              model_kwargs={"hidden": [16]}, lr=0.05, batch_size=16, epochs=6, seed=0)
    buf = buffers.ensure_experts(spec, x, y, tmp_path_factory.mktemp("buf"), 2, progress=False)
    return x, y, spec, buf


def _cfg(**kw):
    base = dict(ipc=2, syn_steps=6, expert_epochs=2, max_start_epoch=3, iterations=30, lr_img=10.0, lr_lr=1e-5,
                lr_teacher=0.05, checkpoint_every=0)
    return mtt.MTTConfig(**{**base, **kw})


def _run(setup, cfg, **kw):
    x, y, spec, buf = setup
    g = torch.Generator().manual_seed(1)
    x0, y0 = mtt.real_init(x, y, cfg.ipc, 3, g)
    return mtt.distill(spec.build_model(), buf, x0, y0, cfg, generator=g, progress=False, **kw)


def test_trajectory_loss_is_the_normalised_squared_distance():
    g = torch.Generator().manual_seed(0)
    a, b, c = ({"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)} for _ in range(3))
    flat = lambda p: torch.cat([p["w"].flatten(), p["b"]])  # noqa: E731
    loss, den = mtt.trajectory_loss(a, b, c)
    expected = (flat(a) - flat(c)).pow(2).sum() / (flat(b) - flat(c)).pow(2).sum()
    assert torch.allclose(loss, expected) and torch.allclose(den, (flat(b) - flat(c)).pow(2).sum())
    assert mtt.trajectory_loss(b, b, c)[0].item() == pytest.approx(1.0)   # not moving scores exactly 1


def test_distillation_lowers_the_matching_loss(setup):
    synthetic, log = _run(setup, _cfg(iterations=60))
    losses = log.curve("losses")
    assert losses[-15:].mean() < 0.8 * losses[:5].mean()
    assert synthetic.x.shape == (6, 1, 1, 8) and torch.equal(synthetic.y, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert synthetic.lr.item() > 0 and len(log.lrs) == 60
    assert max(log.starts) < 3


def test_full_and_lowmem_modes_and_minibatches_agree(setup):
    out = {mode: _run(setup, _cfg(iterations=4, unroll_mode=mode, batch_syn=4))[0] for mode in ("full", "lowmem")}
    assert torch.allclose(out["full"].x, out["lowmem"].x, atol=1e-5)
    assert torch.allclose(out["full"].lr, out["lowmem"].lr, rtol=1e-5)


def test_heap_reuse_changes_no_result(setup, monkeypatch):
    from ddlib import alloc
    for var in alloc._ENV_VARS:  # let ddlib.alloc act even under the Makefile's MALLOC_TUNING
        monkeypatch.delenv(var, raising=False)
    (a, log_a), (b, log_b) = (_run(setup, _cfg(iterations=5), reuse_heap=r) for r in (True, False))
    assert torch.equal(a.x, b.x) and torch.equal(a.lr, b.lr) and log_a.losses == log_b.losses


def test_interrupted_run_resumes_to_the_uninterrupted_result(setup, tmp_path):
    cfg = _cfg(iterations=12, checkpoint_every=5)
    reference, ref_log = _run(setup, cfg)
    calls = {"n": 0}

    def evaluate(s):                       # called at iterations 4 and 8: dies at 8, after the checkpoint at 5
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return float(s.lr)

    path = tmp_path / "mtt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        _run(setup, cfg, checkpoint=path, evaluate=evaluate, evaluate_every=4)
    resumed, log = _run(setup, cfg, checkpoint=path)
    assert log.resumed_from == 5 and 0 < log.resumed_seconds < log.seconds
    assert torch.allclose(resumed.x, reference.x, atol=1e-6)
    assert torch.allclose(resumed.lr, reference.lr)
    assert torch.allclose(log.curve("losses"), ref_log.curve("losses"), atol=1e-6)
    assert log.evals[0][0] == 4            # the evaluation before the interruption is kept


def test_a_finished_checkpoint_is_reused_unchanged_and_a_longer_one_refused(setup, tmp_path):
    path = tmp_path / "mtt.safetensors"
    first, _ = _run(setup, _cfg(iterations=6, checkpoint_every=3), checkpoint=path)
    stored = path.read_bytes()
    again, log = _run(setup, _cfg(iterations=6, checkpoint_every=3), checkpoint=path)
    assert log.resumed_from == 6 and torch.equal(again.x, first.x)
    assert path.read_bytes() == stored
    with pytest.raises(ValueError, match="more than iterations=4"):
        _run(setup, _cfg(iterations=4, checkpoint_every=3), checkpoint=path)
    assert path.read_bytes() == stored


def test_learned_soft_labels_move(setup):
    x, y, spec, buf = setup
    cfg = _cfg(iterations=5, lr_label=5.0)
    g = torch.Generator().manual_seed(1)
    x0, y0 = mtt.real_init(x, y, cfg.ipc, 3, g)
    logits = 3 * torch.nn.functional.one_hot(y0, 3).float()
    synthetic, _ = mtt.distill(spec.build_model(), buf, x0, logits, cfg, inner_loss=soft_cross_entropy,
                               generator=g, progress=False)
    assert not torch.allclose(synthetic.y, logits)
    with pytest.raises(ValueError, match="float y_init"):
        mtt.distill(spec.build_model(), buf, x0, y0, cfg, generator=g, progress=False)


def test_exploding_learned_lr_is_caught_and_the_last_good_state_saved(setup, tmp_path):
    path = tmp_path / "run.safetensors"
    with pytest.raises(mtt.LearnedLrError, match="lower lr_lr"):
        _run(setup, _cfg(lr_lr=10.0, checkpoint_every=100), checkpoint=path)
    good = mtt.SyntheticSet.load(tmp_path / "run_last_good.safetensors")
    assert torch.isfinite(good.x).all() and good.lr.item() > 0


def test_bad_configuration_is_refused_before_work(setup):
    with pytest.raises(ValueError, match="ipc=0"):
        _cfg(ipc=0).validate()
    with pytest.raises(ValueError, match="lr_img"):
        _cfg(lr_img=-1).validate()
    with pytest.raises(ValueError, match="train longer experts"):
        _run(setup, _cfg(max_start_epoch=6, expert_epochs=2))


def test_synthetic_set_roundtrip_and_evaluation(setup, tmp_path):
    x, y, spec, _ = setup
    s = mtt.SyntheticSet(x[:6], y[:6], torch.tensor(0.05), {"ipc": 2})
    loaded = mtt.SyntheticSet.load(s.save(tmp_path / "s.safetensors"))
    assert torch.equal(loaded.x, s.x) and loaded.lr.item() == pytest.approx(0.05) and loaded.meta == {"ipc": 2}
    res = mtt.evaluate_synthetic(x, y, 0.05, spec.build_model, x, y, epochs=20, num_nets=2, batch_size=32)
    assert res.runs == 2 and res.mean > 0.8


def test_matching_distance_is_one_for_a_student_that_does_not_move(setup):
    x, y, spec, buf = setup
    windows = mtt.sample_windows(buf, 3, 2, 4, torch.Generator().manual_seed(0))
    assert len(windows) == 4 and all(0 <= e < len(buf) and 0 <= t < 3 for e, t in windows)
    frozen = mtt.SyntheticSet(x[:6], y[:6], torch.tensor(0.0))
    assert mtt.matching_distance(spec.build_model(), buf, frozen, 5, 2, windows) == pytest.approx(1.0)
    trained, _ = _run(setup, _cfg(iterations=40))
    moving = mtt.matching_distance(spec.build_model(), buf, trained, 6, 2, windows)
    assert moving < 1.0   # the distilled steps bring the student closer to the expert's later checkpoint
