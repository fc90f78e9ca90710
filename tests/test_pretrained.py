"""Pools of pre-trained networks (ddlib.pretrained): training, safe storage with checked metadata, samplers."""

import pickle

import pytest
import torch
from torch import nn

from ddlib import pretrained


def _blobs(n=120, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    return (centers[y] + torch.randn(n, d, generator=g)).view(n, 1, 1, d), y


def _make():
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


SPEC = dict(model="mlp", dataset="blobs", num_classes=3)


def _pool(tmp_path, seeds=(1, 2, 3), **kw):
    x, y = _blobs()
    return pretrained.cached_pool(tmp_path, _make, x, y, seeds=list(seeds), epochs=10, lr=0.05, batch_size=32,
                                  progress=False, **{**SPEC, **kw})


def test_pool_members_are_trained_and_differ_by_seed(tmp_path):
    pool, path, reused = _pool(tmp_path)
    x, y = _blobs()
    accs = pool.accuracies(_make(), x, y)
    assert len(pool) == 3 and not reused and path.exists()
    assert min(accs) > 0.9
    assert not torch.equal(pool.params[0]["1.weight"], pool.params[1]["1.weight"])
    assert pool.meta["seeds"] == [1, 2, 3] and pool.meta["training"]["epochs"] == 10


def test_save_load_round_trip_with_metadata(tmp_path):
    pool, path, _ = _pool(tmp_path)
    meta = pretrained.read_pool_meta(path)
    for key in ("model", "dataset", "input_shape", "num_classes", "seeds", "training", "ddlib_version"):
        assert key in meta
    loaded = pretrained.load_pool(path, input_shape=(1, 1, 6), **SPEC)
    for a, b in zip(pool.params, loaded.params):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cached_pool_is_reused_without_training(tmp_path, monkeypatch):
    pool, path, _ = _pool(tmp_path)
    monkeypatch.setattr(pretrained, "train_pool", lambda *a, **k: pytest.fail("retrained a cached pool"))
    again, path2, reused = _pool(tmp_path)
    assert reused and path2 == path
    assert torch.equal(again.params[2]["3.bias"], pool.params[2]["3.bias"])


def test_a_changed_setting_gets_its_own_pool(tmp_path):
    _, path_a, _ = _pool(tmp_path)
    _, path_b, reused = _pool(tmp_path, seeds=(1, 2, 4))
    assert path_a != path_b and not reused


@pytest.mark.parametrize("field,value", [("model", "lenet"), ("dataset", "mnist"), ("input_shape", (1, 28, 28)),
                                         ("num_classes", 10)])
def test_loading_a_pool_of_another_setting_names_both(tmp_path, field, value):
    _, path, _ = _pool(tmp_path)
    want = {**SPEC, "input_shape": (1, 1, 6), field: value}
    with pytest.raises(ValueError) as err:
        pretrained.load_pool(path, **want)
    message = str(err.value)
    assert field in message and str(list(value) if field == "input_shape" else value) in message


def test_a_pickle_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "pool.safetensors"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="never read with pickle|not a safetensors"):
        pretrained.load_pool(path, input_shape=(1, 1, 6), **SPEC)
    assert not marker.exists()


def test_samplers_fixed_and_random_with_held_out_split(tmp_path):
    pool, _, _ = _pool(tmp_path, seeds=(1, 2, 3, 4, 5))
    train, test = pool.split(3)
    assert train == [0, 1, 2] and test == [3, 4]
    fixed = pool.fixed(1)
    assert fixed(0) is pool.params[1] and fixed(7) is pool.params[1]
    sample = pool.sampler(train, seed=0)
    drawn = [sample(i) for i in range(60)]
    ids = {next(j for j, p in enumerate(pool.params) if p is d) for d in drawn}
    assert ids == {0, 1, 2}                                    # every training member, never a held-out one
    assert all(sample(i) is drawn[i] for i in range(10))       # reproducible
    with pytest.raises(ValueError, match="held out"):
        pool.split(5)
    with pytest.raises(ValueError, match="does not exist"):
        pool.fixed(5)
