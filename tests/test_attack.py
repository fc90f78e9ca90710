"""The poisoning attack (ddlib.attack): bad input, the objective, the baseline and the metrics."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddlib import attack, dd
from ddlib.train import train_classifier


def _blobs(n=300, d=6, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    return (centers[y] + torch.randn(n, d, generator=g)).view(n, 1, 1, d), y


def _trained(x, y, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    train_classifier(net, x, y, epochs=20, lr=0.05, batch_size=32, generator=torch.Generator().manual_seed(seed))
    return net


@pytest.mark.parametrize("k,t,match", [(2, 2, "different"), (4, 1, "attack_class=4"), (1, -1, "target_class=-1"),
                                       (1.5, 2, "attack_class=1.5"), (True, 2, "attack_class=True")])
def test_bad_classes_are_clear_errors(k, t, match):
    with pytest.raises(ValueError, match=match):
        attack.check_classes(k, t, 4)
    with pytest.raises(ValueError):
        attack.attack_outer_loss(k, t, 4)


def test_objective_is_cross_entropy_on_relabelled_targets():
    x, y = _blobs()
    net = _trained(x, y)
    params = dict(net.named_parameters())
    y2 = attack.relabel(y, 1, 3)
    assert torch.equal(y2[y == 1], torch.full_like(y2[y == 1], 3)) and torch.equal(y2[y != 1], y[y != 1])
    loss = attack.attack_outer_loss(1, 3, 4)(net, params, x, y)
    assert torch.allclose(loss, F.cross_entropy(net(x), y2))


def test_relabel_baseline_uses_class_k_images_labelled_t():
    x, y = _blobs()
    raw = torch.zeros(3)
    base = attack.relabel_baseline(x, y, 8, 1, 3, raw, attack_class=2, target_class=0,
                                   generator=torch.Generator().manual_seed(0))
    assert base.x.shape == (8, 1, 1, 6) and torch.equal(base.y, torch.zeros(8, dtype=torch.long))
    # every image is a real class-2 image
    matches = (base.x.view(8, 1, -1) == x.view(1, len(x), -1)).all(-1)
    assert bool((y[matches.float().argmax(1)] == 2).all()) and bool(matches.any(1).all())
    with pytest.raises(ValueError, match="fewer"):
        attack.relabel_baseline(x, y, 1000, 1, 3, raw, 2, 0)


def test_metrics_of_a_known_prediction():
    class Fixed(nn.Module):  # predicts class 0 for every input
        def forward(self, x):
            return torch.tensor([[1.0, 0, 0, 0]]).repeat(x.shape[0], 1)

    y = torch.tensor([0, 0, 1, 1, 2, 3])
    s, o, a = attack.attack_metrics(Fixed(), None, torch.zeros(6, 1, 1, 1), y, attack_class=1, target_class=0)
    assert s == 1.0 and o == pytest.approx(2 / 4) and a == pytest.approx(4 / 6)


def test_distilled_attack_flips_class_k_and_keeps_the_rest():
    x, y = _blobs()
    net = _trained(x, y)
    cfg = dd.DDConfig(ipc=1, distill_steps=1, distill_epochs=2, outer_iters=150, outer_lr=0.05, real_batch=128,
                      decay_every=1000, checkpoint_every=0)
    before = attack.evaluate_attack(None, net, [dict(net.named_parameters())], x, y, 1, 3)
    distilled, _ = dd.distill(net, dd.fixed_init(net), x, y, cfg, 4, generator=torch.Generator().manual_seed(0),
                              outer_loss=attack.attack_outer_loss(1, 3, 4), progress=False)
    after = attack.evaluate_attack(distilled, net, [dd.init_params(net)], x, y, 1, 3)
    assert before.success[0] < 0.1 and before.other_acc[0] > 0.9
    assert after.success[0] > 0.8 and after.other_acc[0] > before.other_acc[0] - 0.05
    # step by step: step 0 is the trained network itself
    at0 = attack.evaluate_attack(distilled, net, [dd.init_params(net)], x, y, 1, 3, steps=0)
    assert at0.success == before.success
    rows = after.rows(dataset="blobs", model="mlp", method="attack_dd", setting="")
    assert [r["metric"] for r in rows] == ["attack_success", "other_class_acc", "attacker_acc"]
