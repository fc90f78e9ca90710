"""Expert trajectories (ddlib.buffers): format, sharding, resume and the mismatch errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ddlib import buffers


def _data(n=96, d=8, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    return (centers[y] + torch.randn(n, d, generator=g)).view(n, 1, 1, d), y


def _spec(**kw):
    base = dict(dataset="blobs", model="mlp", input_shape=(1, 1, 8), num_outputs=3, model_kwargs={"hidden": [16]},
                lr=0.05, batch_size=16, epochs=4, seed=3)
    return buffers.ExpertSpec(**{**base, **kw})


def _all_tensors(folder):
    from safetensors.torch import load_file
    return {p.name: load_file(str(p)) for p in sorted(folder.glob("expert_*.safetensors"))}


def test_expert_stores_every_epoch_and_epoch_0_is_the_seeded_init(tmp_path):
    x, y = _data()
    spec = _spec()
    buf = buffers.ensure_experts(spec, x, y, tmp_path, num_experts=2, progress=False)
    assert len(buf) == 2 and buf.epochs == 4
    torch.manual_seed(buffers.expert_seed(spec, 1))
    fresh = spec.build_model()
    for name, p in fresh.named_parameters():
        assert torch.equal(buf.params(1, 0)[name], p.detach())
    # the expert learns: its loss on the training data falls along the trajectory
    net = spec.build_model()
    from torch.func import functional_call
    losses = [torch.nn.functional.cross_entropy(functional_call(net, buf.params(0, e), (x,)), y).item()
              for e in range(5)]
    assert losses[-1] < 0.6 * losses[0]
    assert (buffers.trajectory_distances(buf, 0)[1:] > 0).all()


def test_shards_merge_to_what_one_process_trains(tmp_path):
    x, y = _data()
    spec = _spec()
    buffers.train_experts(spec, x, y, tmp_path / "one", range(3), progress=False)
    for shard in range(2):
        buffers.train_experts(spec, x, y, tmp_path / f"shard{shard}", buffers.shard_experts(3, shard, 2),
                              progress=False)
    merged = buffers.merge_buffers([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged")
    assert len(merged) == 3
    one, both = _all_tensors(tmp_path / "one"), _all_tensors(tmp_path / "merged")
    assert one.keys() == both.keys()
    for name in one:
        assert all(torch.equal(one[name][k], both[name][k]) for k in one[name])
    assert list(buffers.shard_experts(10, 2, 3)) == [8, 9]


def test_interrupted_expert_resumes_to_the_same_trajectory(tmp_path):
    x, y = _data()
    spec = _spec(momentum=0.9, epochs=6)
    calls = {"n": 0}

    def failing_augment(generator):
        def aug(xb):
            calls["n"] += 1
            if calls["n"] == 6 * 4 + 2:   # in epoch 5, after the checkpoint at epoch 4
                raise KeyboardInterrupt("simulated interruption")
            return xb + 0.01 * torch.randn(xb.shape, generator=generator)
        return aug

    def augment(generator):
        return lambda xb: xb + 0.01 * torch.randn(xb.shape, generator=generator)

    buffers.train_expert(spec, 0, x, y, tmp_path / "ref", augment=augment, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        buffers.train_expert(spec, 0, x, y, tmp_path / "run", augment=failing_augment, save_every=2)
    assert (tmp_path / "run" / "expert_0000.partial.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="1 unfinished"):
        buffers.ExpertBuffer(tmp_path / "run")
    buffers.train_expert(spec, 0, x, y, tmp_path / "run", augment=augment, save_every=2)
    ref, run = _all_tensors(tmp_path / "ref"), _all_tensors(tmp_path / "run")
    for k in ref["expert_0000.safetensors"]:
        assert torch.allclose(ref["expert_0000.safetensors"][k], run["expert_0000.safetensors"][k], atol=1e-6), k
    assert not (tmp_path / "run" / "expert_0000.partial.safetensors").exists()


def test_a_buffer_for_another_setting_is_refused_with_the_differences_named(tmp_path):
    x, y = _data()
    folder = buffers.ensure_experts(_spec(), x, y, tmp_path, 1, progress=False).folder
    buffers.load_buffer(folder, dataset="blobs", model="mlp", zca=False)
    with pytest.raises(buffers.BufferMismatchError, match=r"dataset: buffer has 'blobs', this run needs 'mnist'"):
        buffers.load_buffer(folder, dataset="mnist", model="mlp")
    with pytest.raises(buffers.BufferMismatchError, match="zca"):
        buffers.load_buffer(folder, zca=True)
    with pytest.raises(buffers.BufferMismatchError, match="teacher"):
        buffers.load_buffer(folder, teacher="barlow_abc")


def test_empty_and_foreign_folders_and_an_out_of_range_window_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        buffers.ExpertBuffer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete expert files"):
        buffers.ExpertBuffer(tmp_path / "empty")
    (tmp_path / "foreign").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign" / "expert_0000.safetensors"))
    with pytest.raises(ValueError, match="not a ddlib expert file"):
        buffers.ExpertBuffer(tmp_path / "foreign")
    x, y = _data()
    buf = buffers.ensure_experts(_spec(), x, y, tmp_path / "ok", 1, progress=False)
    buf.check_range(max_start_epoch=3, expert_epochs=1)       # starts 0..2, targets up to epoch 3 <= 4
    with pytest.raises(ValueError, match="train longer experts"):
        buf.check_range(max_start_epoch=3, expert_epochs=3)


def test_spec_validation():
    with pytest.raises(ValueError, match="objective"):
        _spec(objective="hinge")
    with pytest.raises(ValueError, match="epochs"):
        _spec(epochs=0)
    assert _spec().key() != _spec(zca=True).key()
    assert buffers.ExpertSpec.from_json(_spec().to_json()) == _spec()


def test_drop_last_skips_only_the_remainder_batch(tmp_path):
    """An epoch is n // batch_size full batches: identical to keeping the last batch when there is none, different
    when there is a remainder; a set smaller than one batch is still one batch; old files meant drop_last=False."""
    def final(n, drop_last, name):
        x, y = _data(n=n)
        spec = _spec(drop_last=drop_last, epochs=2)
        path = buffers.train_expert(spec, 0, x, y, tmp_path / name)
        return buffers.ExpertBuffer(path.parent).params(0, 2)

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(final(96, True, "a"), final(96, False, "b"))        # 96 = 6 x 16: nothing to drop
    assert not same(final(99, True, "c"), final(99, False, "d"))    # a 3-image remainder batch: dropped or not
    x, y = _data(n=10)
    tiny = buffers.ExpertBuffer(buffers.train_expert(_spec(epochs=1), 0, x, y, tmp_path / "e").parent)
    assert not same(tiny.params(0, 0), tiny.params(0, 1))           # 10 < 16 images: one batch, the expert moves
    old = {k: v for k, v in json.loads(_spec().to_json()).items() if k != "drop_last"}
    assert buffers.ExpertSpec.from_json(json.dumps(old)).drop_last is False
