"""MKDT (ddlib.mkdt): KD experts recorded with their teacher and refused for another, the high-loss
initialisation, the distillation through ddlib.mtt, the evaluation, and the bad-input errors."""

import pytest
import torch
import torch.nn.functional as F

from ddlib import buffers, mkdt, mtt, ssl
from ddlib.models import build


def _images(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    centers = 2 * torch.randn(4, 1, 8, 8, generator=g)
    return centers[y] + 0.5 * torch.randn(n, 1, 8, 8, generator=g), y


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mkdt")
    x, y = _images()
    spec = ssl.TeacherSpec(dataset="blobs", model="convnet", input_shape=(1, 8, 8),
                           model_kwargs={"width": 4, "depth": 2}, projector=(8, 8), epochs=1, batch_size=20,
                           train_size=len(x), seed=0)
    teacher = ssl.ensure_teacher(spec, x, root / "teachers", progress=False)
    reps = ssl.representations(teacher, x)
    kw = {"width": 4, "depth": 2}
    espec = mkdt.kd_spec(teacher, "blobs", "convnet", (1, 8, 8), teacher.width, kw, lr=0.1, batch_size=10, epochs=3)
    buf = mkdt.kd_experts(espec, teacher, x, reps, root / "buffers", num_experts=2, progress=False)
    return dict(root=root, x=x, y=y, teacher=teacher, reps=reps, spec=espec, buf=buf, kw=kw)


def test_kd_experts_record_the_teacher_and_are_refused_for_another(setup):
    buf, teacher = setup["buf"], setup["teacher"]
    assert buf.spec.objective == "mse" and buf.spec.teacher == teacher.key
    assert buf.spec.num_outputs == teacher.width and len(buf) == 2 and buf.epochs == 3
    assert mkdt.load_kd_buffer(buf.folder, teacher).spec == buf.spec
    other_spec = ssl.TeacherSpec(**{**teacher.spec.__dict__, "seed": 5})
    other = ssl.Teacher(teacher.backbone, other_spec)
    assert other.key != teacher.key
    with pytest.raises(buffers.BufferMismatchError, match="teacher"):
        mkdt.load_kd_buffer(buf.folder, other)
    with pytest.raises(buffers.BufferMismatchError, match="teacher"):
        buffers.load_buffer(buf.folder, teacher=other.key)
    with pytest.raises(buffers.BufferMismatchError):
        mkdt.kd_experts(setup["spec"], other, setup["x"], setup["reps"], setup["root"] / "buffers", 1, progress=False)
    with pytest.raises(buffers.BufferMismatchError):  # distillation checks the buffer against its teacher
        cfg = mtt.MTTConfig(ipc=1, syn_steps=2, expert_epochs=1, max_start_epoch=1, iterations=1, lr_label=1.0,
                            checkpoint_every=0)
        mkdt.distill(build("convnet", (1, 8, 8), teacher.width, **setup["kw"]), buf, other, setup["x"][:4],
                     setup["reps"][:4], cfg, progress=False)
    # the experts learn to regress the teacher: KD loss falls along the trajectory
    net = build("convnet", (1, 8, 8), teacher.width, **setup["kw"])
    first = mkdt.kd_losses(net, buf, 0, setup["x"], setup["reps"]).mean()
    last = mkdt.kd_losses(net, buf, 3, setup["x"], setup["reps"]).mean()
    assert last < first


def test_head_of_another_width_is_refused_before_training(setup, tmp_path):
    teacher = setup["teacher"]
    with pytest.raises(ssl.TeacherMismatchError, match=str(teacher.width)):
        mkdt.kd_spec(teacher, "blobs", "convnet", (1, 8, 8), teacher.width + 1, setup["kw"])
    with pytest.raises(ssl.TeacherMismatchError):
        mkdt.check_head(teacher, 512)
    with pytest.raises(ssl.TeacherMismatchError, match="trained on"):
        mkdt.kd_spec(teacher, "cifar10", "convnet", (1, 8, 8), teacher.width, setup["kw"])
    wrong = buffers.ExpertSpec(**{**setup["spec"].__dict__, "num_outputs": teacher.width + 2})
    with pytest.raises(ssl.TeacherMismatchError):
        mkdt.kd_experts(wrong, teacher, setup["x"], setup["reps"], tmp_path, 1, progress=False)
    assert not any(tmp_path.iterdir())  # nothing was trained


def test_kd_losses_average_the_experts_and_high_loss_picks_the_largest(setup):
    buf, x, reps = setup["buf"], setup["x"], setup["reps"]
    net = build("convnet", (1, 8, 8), setup["teacher"].width, **setup["kw"])
    losses = mkdt.kd_losses(net, buf, 1, x, reps, batch_size=7)
    by_hand = torch.stack([((torch.func.functional_call(net, buf.params(e, 1), (x,)) - reps) ** 2).mean(1)
                           for e in range(len(buf))]).mean(0)
    assert torch.allclose(losses, by_hand, atol=1e-6)
    picked = mkdt.high_loss_indices(losses, 5)
    assert set(picked.tolist()) == set(torch.topk(losses, 5).indices.tolist())
    rest = torch.ones(len(losses), dtype=torch.bool)
    rest[picked] = False
    assert losses[picked].min() >= losses[rest].max()
    assert mkdt.high_loss_indices(torch.tensor([0.1, 0.5, 0.5, 0.2]), 2).tolist() == [1, 2]
    with pytest.raises(ValueError):
        mkdt.high_loss_indices(losses, 0)


def test_distill_goes_through_mtt_with_mse_and_learned_targets(setup):
    teacher, buf, x, reps = setup["teacher"], setup["buf"], setup["x"], setup["reps"]
    model = build("convnet", (1, 8, 8), teacher.width, **setup["kw"])
    cfg = mtt.MTTConfig(ipc=1, syn_steps=3, expert_epochs=1, max_start_epoch=2, iterations=3, lr_img=10.0,
                        lr_lr=1e-5, lr_teacher=0.1, lr_label=1.0, checkpoint_every=0)
    idx = torch.arange(6)
    synthetic, log = mkdt.distill(model, buf, teacher, x[idx], reps[idx], cfg, progress=False,
                                  generator=torch.Generator().manual_seed(0))
    assert synthetic.x.shape == (6, 1, 8, 8) and synthetic.y.shape == (6, teacher.width)
    assert not torch.equal(synthetic.y, reps[idx]) and not torch.equal(synthetic.x, x[idx])
    assert synthetic.meta["teacher"] == teacher.key and len(log.losses) == 3
    # the same call to ddlib.mtt.distill with an MSE inner loss gives the same set: no second loop
    ref, _ = mtt.distill(model, buf, x[idx], reps[idx], cfg, inner_loss=F.mse_loss, progress=False,
                         generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ref.x, synthetic.x) and torch.allclose(ref.y, synthetic.y)
    with pytest.raises(ValueError, match="targets_init"):
        mkdt.distill(model, buf, teacher, x[idx], reps[idx, :3], cfg, progress=False)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), "half", None])
def test_fractions_outside_0_1_are_refused(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        mkdt.check_fraction("subset_fraction", bad)
    with pytest.raises(ValueError, match="label_fraction"):
        mkdt.labelled_indices(torch.arange(20) % 4, bad)


def test_fraction_sizes_and_labelled_subsets():
    assert mkdt.check_fraction("f", 1) == 1.0
    assert mkdt.subset_size(1347, 0.05) == 67 and mkdt.subset_size(10, 0.01) == 1
    y = torch.arange(100) % 5
    idx = mkdt.labelled_indices(y, 0.01)  # 1 example, raised to one per class
    assert torch.bincount(y[idx], minlength=5).tolist() == [1] * 5
    assert len(mkdt.labelled_indices(y, 0.2, seed=3)) == 20


def test_linear_probe_and_evaluation_protocol(setup):
    x, y = setup["x"], setup["y"]
    feats = F.one_hot(y, 4).float() + 0.01 * torch.randn(len(y), 4, generator=torch.Generator().manual_seed(0))
    assert mkdt.linear_probe(feats, y, feats, y, 4, steps=100) == 1.0
    teacher, reps = setup["teacher"], setup["reps"]

    def make():
        return build("convnet", (1, 8, 8), teacher.width, **setup["kw"])

    runs = [mkdt.Pretraining("none"), mkdt.Pretraining("random_subset", x[:8], reps[:8], 0.01)]
    res = mkdt.evaluate_pretraining(runs, make, x, y, x, y, [0.5, 1.0], [0, 1], epochs=2, batch_size=4,
                                    probe_steps=20)
    assert set(res) == {"none", "random_subset"}
    for r in res.values():
        assert set(r.accs) == {0.5, 1.0} and all(a.runs == 2 and 0 <= a.mean <= 1 for a in r.accs.values())
    # same seeds: evaluation is deterministic
    again = mkdt.evaluate_pretraining(runs[:1], make, x, y, x, y, [0.5], [0, 1], epochs=2, probe_steps=20)
    assert again["none"].accs[0.5].accs == res["none"].accs[0.5].accs
    with pytest.raises(ValueError):
        mkdt.evaluate_pretraining(runs, make, x, y, x, y, [0.0], [0])


def test_transfer_probes_reuse_the_main_evaluations_encoders(setup, monkeypatch):
    x, y, reps, teacher = setup["x"], setup["y"], setup["reps"], setup["teacher"]

    def make():
        return build("convnet", (1, 8, 8), teacher.width, **setup["kw"])

    other_x = x.flip(-1)  # another dataset of the same shape and labels
    runs = [mkdt.Pretraining("none"), mkdt.Pretraining("subset", x[:8], reps[:8], 0.01)]
    kw = dict(epochs=2, batch_size=4, probe_steps=20)
    # independent computation: one evaluation per dataset, each pre-training its own encoders
    main = mkdt.evaluate_pretraining(runs, make, x, y, x, y, [0.5], [0, 1, 2], **kw)
    transfer = mkdt.evaluate_pretraining(runs, make, other_x, y, other_x, y, [0.5], [1, 2], **kw)
    calls = []
    real_pretrain = mkdt.pretrain
    monkeypatch.setattr(mkdt, "pretrain", lambda *a, **k: calls.append(1) or real_pretrain(*a, **k))
    both = mkdt.evaluate_pretraining_on(runs, make, [mkdt.ProbeSet("main", x, y, x, y, [0, 1, 2]),
                                                     mkdt.ProbeSet("flipped", other_x, y, other_x, y, [1, 2])],
                                        [0.5], **kw)
    assert len(calls) == 3  # one pre-training per seed for the one run that pre-trains, shared by both probes
    for name in ("none", "subset"):
        assert both[0][name].accs[0.5].accs == main[name].accs[0.5].accs
        assert both[1][name].accs[0.5].accs == transfer[name].accs[0.5].accs
    with pytest.raises(ValueError, match="seed"):
        mkdt.evaluate_pretraining_on(runs, make, [mkdt.ProbeSet("main", x, y, x, y, [])], [0.5])


def test_label_draws_average_the_probe_over_labelled_subsets(setup):
    x, y = setup["x"], setup["y"]
    g = torch.Generator().manual_seed(1)
    f_train = F.one_hot(y, 4).float() + 0.8 * torch.randn(len(y), 4, generator=g)
    f_test = F.one_hot(y, 4).float() + 0.8 * torch.randn(len(y), 4, generator=g)
    one = mkdt.probe_accuracy(f_train, y, f_test, y, 0.1, seed=2, steps=50)
    idx = mkdt.labelled_indices(y, 0.1, seed=2)  # draw 0 is the seed's own subset
    assert one == mkdt.linear_probe(f_train[idx], y[idx], f_test, y, 4, steps=50)
    manual = [mkdt.linear_probe(f_train[i], y[i], f_test, y, 4, steps=50)
              for i in (mkdt.labelled_indices(y, 0.1, mkdt.label_draw_seed(2, d)) for d in range(3))]
    assert len({tuple(mkdt.labelled_indices(y, 0.1, mkdt.label_draw_seed(2, d)).tolist()) for d in range(3)}) == 3
    assert mkdt.probe_accuracy(f_train, y, f_test, y, 0.1, seed=2, label_draws=3, steps=50) == pytest.approx(
        sum(manual) / 3, abs=1e-12)
    with pytest.raises(ValueError, match="label_draws"):
        mkdt.probe_accuracy(f_train, y, f_test, y, 0.1, seed=2, label_draws=0)
    with pytest.raises(ValueError, match=r"\(P, n, d\)"):
        mkdt.linear_probes(f_train, y, f_test, y, 4)  # one set must be given as a batch of one


def test_trajectory_probe_reads_each_expert_checkpoint(setup):
    x, y, buf, teacher = setup["x"], setup["y"], setup["buf"], setup["teacher"]
    model = build("convnet", (1, 8, 8), teacher.width, **setup["kw"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = mkdt.trajectory_probe(model, buf, x, y, x, y, [0.25, 1.0], [0, 1], epochs=[0, 3], probe_steps=30)
    assert set(res) == {0.25, 1.0} and all(len(v) == 2 and all(r.runs == len(buf) for r in v) for v in res.values())
    # independent: a fresh network loaded through load_state_dict, probed with the same subsets
    ref = build("convnet", (1, 8, 8), teacher.width, **setup["kw"])
    for k, (j, e) in [(0, (0, 0)), (1, (1, 3))]:
        ref.load_state_dict(buf.params(k, e))
        ft = mkdt.features(ref, x)
        want = sum(mkdt.probe_accuracy(ft, y, ft, y, 0.25, s, steps=30) for s in (0, 1)) / 2
        assert res[0.25][j].accs[k] == pytest.approx(want, abs=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the caller's weights come back
    with pytest.raises(ValueError, match="epochs"):
        mkdt.trajectory_probe(model, buf, x, y, x, y, [0.5], [0], epochs=[buf.epochs + 1])


def test_each_pretraining_run_may_set_its_batch_size(setup, monkeypatch):
    x, y, reps, teacher = setup["x"], setup["y"], setup["reps"], setup["teacher"]
    seen = []
    monkeypatch.setattr(mkdt, "pretrain", lambda model, xs, ts, **kw: seen.append(kw["batch_size"]) or model)
    runs = [mkdt.Pretraining("default", x[:8], reps[:8], 0.01), mkdt.Pretraining("own", x[:8], reps[:8], 0.01, 3),
            mkdt.Pretraining("none")]
    mkdt.evaluate_pretraining(runs, lambda: build("convnet", (1, 8, 8), teacher.width, **setup["kw"]), x, y, x, y,
                              [0.5], [0], batch_size=5, probe_steps=2)
    assert seen == [5, 3]  # 'none' pre-trains on nothing
