"""Dataset Distillation (ddlib.dd) and its baselines (ddlib.coreset) on tiny problems."""

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ddlib import coreset, dd


def _blobs(n=200, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    x = centers[y] + torch.randn(n, d, generator=g)
    return x.view(n, 1, 1, d), y


def _mlp(d=6, k=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, k))


def _cfg(**kw):
    base = dict(ipc=1, distill_steps=2, distill_epochs=2, outer_iters=40, outer_lr=0.05, real_batch=64,
                decay_every=1000, checkpoint_every=0)
    return dd.DDConfig(**{**base, **kw})


def test_distillation_lowers_the_real_loss_and_beats_chance():
    x, y = _blobs()
    net = _mlp()
    g = torch.Generator().manual_seed(0)
    distilled, log = dd.distill(net, dd.fixed_init(net), x, y, _cfg(outer_iters=80), 3, generator=g, progress=False)
    curve = log.loss_curve()
    assert curve[-10:].mean() < 0.5 * curve[:5].mean()
    assert dd.final_accuracy(distilled, net, dd.init_params(net), x, y) > 0.9
    assert distilled.x.shape == (2 * 3, 1, 1, 6) and distilled.lrs.shape == (4,)
    assert torch.equal(distilled.y, torch.tensor([0, 1, 2, 0, 1, 2]))


def test_full_and_lowmem_modes_give_the_same_distilled_set():
    x, y = _blobs()
    out = {}
    for mode in ("full", "lowmem"):
        net = _mlp()
        g = torch.Generator().manual_seed(0)
        out[mode], _ = dd.distill(net, dd.fixed_init(net), x, y, _cfg(outer_iters=5, unroll_mode=mode), 3,
                                  generator=g, progress=False)
    assert torch.allclose(out["full"].x, out["lowmem"].x, atol=1e-5)
    assert torch.allclose(out["full"].raw_lrs, out["lowmem"].raw_lrs, atol=1e-5)


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    x, y = _blobs()
    # the outer lr halves every 3 iterations: the resumed run must continue the decayed schedule
    cfg = _cfg(outer_iters=12, checkpoint_every=5, decay_every=3)

    def run(sampler_fails_at=None, path=None):
        net = _mlp()
        fixed = dd.fixed_init(net)

        def sampler(i):
            if sampler_fails_at is not None and i == sampler_fails_at:
                raise KeyboardInterrupt("simulated interruption")
            return fixed(i)

        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        return dd.distill(net, sampler, x, y, cfg, 3, generator=g, checkpoint=path, progress=False)

    reference, ref_log = run()
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        run(sampler_fails_at=7, path=path)       # dies after the checkpoint at iteration 5
    resumed, log = run(path=path)
    assert log.resumed_from == 5
    assert torch.allclose(resumed.x, reference.x, atol=1e-6)
    assert torch.allclose(resumed.raw_lrs, reference.raw_lrs, atol=1e-6)
    assert torch.allclose(log.loss_curve(), ref_log.loss_curve(), atol=1e-6)
    assert log.final_outer_lr == ref_log.final_outer_lr == pytest.approx(cfg.outer_lr * 0.5 ** 4)
    # the wall time covers the interrupted part too (what the notebooks report as `seconds`)
    assert 0 < log.resumed_seconds < log.seconds

    # a checkpoint without a recorded wall time: the total is unknown, not just the resumed part
    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "seconds"}
    save_file(load_file(str(path)), str(path), metadata=meta)
    _, log = run(path=path)
    assert math.isnan(log.seconds) and math.isnan(log.resumed_seconds)


def test_a_finished_checkpoint_is_reused_unchanged_and_a_longer_one_refused(tmp_path):
    x, y = _blobs()
    path = tmp_path / "ckpt.safetensors"

    def run(iters):
        net = _mlp()
        return dd.distill(net, dd.fixed_init(net), x, y, _cfg(outer_iters=iters, checkpoint_every=4), 3,
                          generator=torch.Generator().manual_seed(0), checkpoint=path, progress=False)

    first, _ = run(8)
    stored = path.read_bytes()
    again, log = run(8)  # nothing left to run: the same set, and the file is not rewritten
    assert log.resumed_from == 8 and torch.equal(again.x, first.x)
    assert path.read_bytes() == stored
    with pytest.raises(ValueError, match="more than outer_iters=5"):
        run(5)  # the checkpoint is 3 iterations past what is asked for
    assert path.read_bytes() == stored


def test_nan_loss_names_the_lr_and_keeps_the_last_good_set(tmp_path):
    x, y = _blobs()
    net = _mlp()
    path = tmp_path / "run.safetensors"
    with pytest.raises(FloatingPointError, match="Lower lr_init") as info:
        dd.distill(net, dd.fixed_init(net), x, y, _cfg(lr_init=1e30, checkpoint_every=100), 3,
                   generator=torch.Generator().manual_seed(0), checkpoint=path, progress=False)
    assert "last good distilled set" in str(info.value)
    good = dd.DistilledSet.load(tmp_path / "run_last_good.safetensors")
    assert torch.isfinite(good.x).all()


@pytest.mark.parametrize("field,value", [("ipc", 0), ("distill_steps", 0), ("distill_epochs", 0),
                                         ("lr_init", 0.0), ("lr_init", -1.0), ("outer_lr", float("nan")),
                                         ("unroll_mode", "tesla")])
def test_bad_configuration_is_a_clear_error(field, value):
    with pytest.raises(ValueError, match=field):
        _cfg(**{field: value}).validate()


def test_distilled_set_roundtrip_and_layout(tmp_path):
    cfg = _cfg(ipc=2, distill_steps=3)
    s = dd.init_distilled_set(cfg, (1, 4, 4), 5, generator=torch.Generator().manual_seed(0))
    assert s.x.shape == (3 * 2 * 5, 1, 4, 4)
    assert s.lrs == pytest.approx([0.02] * 6)
    s.meta = {"dataset": "digits"}
    loaded = dd.DistilledSet.load(s.save(tmp_path / "set.safetensors"))
    assert torch.equal(loaded.x, s.x) and torch.equal(loaded.y, s.y) and loaded.meta == {"dataset": "digits"}
    assert len(loaded.schedule()) == 6 and loaded.per_step == 10
    # class blocks -> step layout: step s holds, class by class, images s*ipc .. (s+1)*ipc-1 of every class
    blocks = torch.arange(5 * 3 * 2).float().view(-1, 1, 1, 1)   # class c owns values 6c .. 6c+5
    steps = dd.to_step_layout(blocks, 3, 2, 5).flatten()
    assert steps[:4].tolist() == [0, 1, 6, 7] and steps[10:12].tolist() == [2, 3]
    with pytest.raises(ValueError, match="needs 30"):
        dd.init_distilled_set(cfg, (1, 4, 4), 5, x_init=torch.zeros(7, 1, 4, 4))


def test_random_init_sampler_is_reproducible_and_varies():
    sample = dd.random_init(lambda: nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), generator_seed=3)
    a, b, a_again = sample(0), sample(1), sample(0)
    assert all(torch.equal(a[n], a_again[n]) for n in a)
    assert not torch.equal(a["1.weight"], b["1.weight"])


def test_coreset_baselines():
    x, y = _blobs(n=60)
    g = torch.Generator().manual_seed(0)
    xr, yr = coreset.random_real(x, y, 2, 3, g)
    assert xr.shape == (6, 1, 1, 6) and yr.tolist() == [0, 0, 1, 1, 2, 2]
    means, ym = coreset.class_means(x, y, 3)
    assert torch.allclose(means[1], x[y == 1].mean(0))
    km1, _ = coreset.kmeans_centroids(x, y, 1, 3)
    assert torch.allclose(km1, means, atol=1e-5)            # k = 1 is the class mean
    km4, yk = coreset.kmeans_centroids(x, y, 4, 3)
    assert km4.shape == (12, 1, 1, 6) and yk.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # every centroid is the mean of the class points closest to it (a Lloyd fixed point)
    pts = x[y == 0].flatten(1)
    assign = torch.cdist(pts, km4[:4].flatten(1)).argmin(1)
    for j in range(4):
        assert torch.allclose(km4[j].flatten(), pts[assign == j].mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="cannot pick 30"):
        coreset.random_real(x, y, 30, 3)
    with pytest.raises(ValueError, match="per_class=0"):
        coreset.kmeans_centroids(x, y, 0, 3)


def test_checkpoint_key_ignores_only_the_run_length():
    base = dd.config_key(_cfg(), dataset="digits")
    assert dd.config_key(_cfg(outer_iters=999, checkpoint_every=7, real_chunk=16), dataset="digits") == base
    assert dd.config_key(_cfg(outer_lr=0.5), dataset="digits") != base
    assert dd.config_key(_cfg(), dataset="mnist") != base


@pytest.mark.parametrize("nets", [1, 2])
def test_chunked_real_loss_gives_the_same_distillation(nets):
    x, y = _blobs(n=96)
    out = {}
    for chunk in (0, 25):
        net = _mlp()
        sampler = dd.random_init(lambda: _mlp(seed=5), generator_seed=1) if nets > 1 else dd.fixed_init(net)
        g = torch.Generator().manual_seed(0)
        out[chunk] = dd.distill(net, sampler, x, y, _cfg(outer_iters=4, real_batch=96, real_chunk=chunk,
                                                         nets_per_iter=nets), 3, generator=g, progress=False)
    assert torch.allclose(out[0][0].x, out[25][0].x, atol=1e-5)
    assert torch.allclose(out[0][1].loss_curve(), out[25][1].loss_curve(), atol=1e-5)
    with pytest.raises(ValueError, match="real_chunk"):
        _cfg(real_chunk=-1).validate()
