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


def test_match_input_resizes_and_converts_channels():
    data = load_dataset("digits")
    grey28 = domains.match_input(data, (1, 28, 28))
    rgb32 = domains.match_input(data, (3, 32, 32))
    assert grey28.x_train.shape[1:] == (1, 28, 28) and grey28.input_shape == (1, 28, 28)
    assert rgb32.x_test.shape[1:] == (3, 32, 32) and len(rgb32.info.mean) == 3
    assert domains.match_input(data, (1, 8, 8)) is data
