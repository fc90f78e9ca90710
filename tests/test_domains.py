"""The quick-mode domain pair (ddlib.domains) and input matching for the paper's pairs."""

import pytest
import torch

from ddlib import domains
from ddlib.data import load_dataset


def test_thicken_widens_a_stroke_by_one_pixel():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    out = domains.render(x, "thicken")
    assert out.sum() == 4 and out[0, 0, 2, 2] == 1 and out[0, 0, 1, 1] == 1
    assert torch.equal(domains.render(x, "invert"), 1 - x)
    with pytest.raises(ValueError, match="unknown"):
        domains.render(x, "blur")


def test_split_is_disjoint_shifted_and_self_normalised():
    data = load_dataset("digits")
    source, target = domains.split_domains(data, "thicken")
    assert len(source.y_train) + len(target.y_train) == len(data.y_train)
    # disjoint halves: the target is the re-rendered complement of the source half
    raw01 = data.denormalise(data.x_train)
    key = lambda t: [tuple(r) for r in (t.flatten(1) * 16).round().int().tolist()]
    src_rows = set(key(source.denormalise(source.x_train)))
    rest = torch.tensor([r not in src_rows for r in key(raw01)])
    assert int(rest.sum()) == len(target.y_train)
    rendered = domains.render(raw01[rest], "thicken")
    assert torch.allclose(target.denormalise(target.x_train), rendered, atol=1e-5)
    assert target.x_train.mean().abs() < 1e-4 and (target.x_train.std() - 1).abs() < 0.05
    assert torch.equal(target.y_test, data.y_test) and target.info.name == "digits_thicken"
    assert not torch.allclose(source.x_test, target.x_test)


def test_shifted_re_renders_every_image_and_keeps_the_labels():
    data = load_dataset("digits")
    other = domains.shifted(data, "thicken")
    assert other.x_train.shape == data.x_train.shape and other.x_test.shape == data.x_test.shape
    assert torch.equal(other.y_train, data.y_train) and torch.equal(other.y_test, data.y_test)
    # independent: thicken the [0, 1] pixels directly and normalise with their own train statistics
    raw_tr, raw_te = data.denormalise(data.x_train), data.denormalise(data.x_test)
    thick_tr = torch.nn.functional.max_pool2d(torch.nn.functional.pad(raw_tr, (0, 1, 0, 1)), 2, stride=1)
    thick_te = torch.nn.functional.max_pool2d(torch.nn.functional.pad(raw_te, (0, 1, 0, 1)), 2, stride=1)
    mean, std = thick_tr.mean(), thick_tr.std(unbiased=False)
    assert torch.allclose(other.x_train, (thick_tr - mean) / std, atol=1e-4)
    assert torch.allclose(other.x_test, (thick_te - mean) / std, atol=1e-4)
    assert other.info.name == "digits_thicken" and other.info.mean[0] > data.info.mean[0]  # thicker strokes: brighter
    with pytest.raises(ValueError, match="unknown"):
        domains.shifted(data, "blur")


def test_match_input_resizes_and_converts_channels():
    data = load_dataset("digits")
    grey28 = domains.match_input(data, (1, 28, 28))
    rgb32 = domains.match_input(data, (3, 32, 32))
    assert grey28.x_train.shape[1:] == (1, 28, 28) and grey28.input_shape == (1, 28, 28)
    assert rgb32.x_test.shape[1:] == (3, 32, 32) and len(rgb32.info.mean) == 3
    assert domains.match_input(data, (1, 8, 8)) is data
