"""Every model builds and runs for every input shape, works through functional_call, and
supports the double backward that unrolled distillation needs."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import functional_call

from ddlib import models
from ddlib.models import MODELS, build, count_parameters

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64)]
NUM_CLASSES = 7


@functools.lru_cache(maxsize=None)
def _model(name: str, shape: tuple[int, int, int]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build(name, shape, NUM_CLASSES)


def _input(shape, batch=2):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODELS)
def test_forward_shape_and_functional_call(name, shape):
    model = _model(name, shape)
    x = _input(shape)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    assert model.embed(x).shape == (2, model.feature_dim)

    # functional_call with non-leaf parameters (as in an unrolled inner loop) matches the module
    params = {k: v * 1.0 for k, v in model.named_parameters()}
    out_f = functional_call(model, params, (x,))
    torch.testing.assert_close(out_f, out, rtol=1e-5, atol=1e-5)
    if shape == (1, 8, 8):  # every parameter is reached by the gradient (one shape is enough)
        grads = torch.autograd.grad(out_f.square().mean(), list(params.values()), allow_unused=True)
        assert all(g is not None for g in grads)


@pytest.mark.parametrize("name", ["lenet", "convnet", "mlp", "alexnet"])
def test_double_backward(name):
    """d/dx of ||d loss / d params||^2 exists: the second-order path of DD and MTT."""
    shape = (1, 28, 28)
    model = _model(name, shape)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    x = _input(shape, batch=4).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3])
    loss = torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    grad_norm = sum(g.square().sum() for g in grads)
    (gx,) = torch.autograd.grad(grad_norm, x)
    assert gx.shape == x.shape and torch.isfinite(gx).all() and gx.abs().sum() > 0


def test_unknown_model_name_lists_choices_and_suggests():
    with pytest.raises(ValueError) as err:
        build("convnett", (1, 8, 8), 10)
    msg = str(err.value)
    assert all(m in msg for m in MODELS)
    assert "Did you mean 'convnet'" in msg


def test_unknown_kwarg_and_bad_values():
    with pytest.raises(TypeError, match="widht"):
        build("convnet", (1, 8, 8), 10, widht=64)
    with pytest.raises(ValueError, match="norm"):
        build("convnet", (1, 8, 8), 10, norm="layernrm")
    with pytest.raises(ValueError, match="depth"):
        build("convnet_d4", (1, 8, 8), 10, depth=3)


def test_aliases_and_convnet_options():
    assert models.canonical_model_name("ConvNet-D4") == "convnet_d4"
    assert models.canonical_model_name("ResNet18") == "resnet18"
    net = build("convnet_d4", (3, 32, 32), 10, width=16, norm="batchnorm", pooling="maxpool")
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 4
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 4
    # default ConvNet uses instance norm as GroupNorm(width, width), like the MTT code
    gn = [m for m in build("convnet", (3, 32, 32), 10).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(gn) == 3 and all(m.num_groups == m.num_channels == 128 for m in gn)
    # the MTT ConvNet-3 on CIFAR-10 has 320,010 parameters
    assert count_parameters(build("convnet", (3, 32, 32), 10)) == 320_010
    # depth 4 on 8x8 stops pooling at 1x1 instead of crashing
    assert build("convnet_d4", (1, 8, 8), 10, width=8).feature_dim == 8


def test_feature_models_and_init():
    resnet = build("resnet18", (3, 32, 32), 0, norm="instancenorm")
    x = _input((3, 32, 32))
    assert resnet.feature_dim == 512 and resnet(x).shape == (2, 512)
    conv = build("convnet", (3, 32, 32), 512, width=16)  # an MKDT student with a 512-d head
    assert conv(x).shape == (2, 512)
    torch.manual_seed(0)
    net = build("lenet", (1, 28, 28), 10, init="xavier")
    assert all(torch.count_nonzero(m.bias) == 0 for m in net.modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(ValueError, match="init"):
        build("lenet", (1, 28, 28), 10, init="zeros")


@pytest.mark.parametrize("shape,pools", [((1, 8, 8), 3), ((1, 28, 28), 4), ((3, 32, 32), 5), ((3, 64, 64), 5)])
def test_vgg11_never_normalises_a_map_smaller_than_2x2(shape, pools):
    """Instance norm of a 1x1 map is identically zero: small inputs skip VGG11's first pools instead, and CIFAR's
    32x32 keeps all five (512-d features, as in MTT)."""
    net = build("vgg11", shape, 10)
    sizes = []
    for m in net.features:
        if isinstance(m, torch.nn.GroupNorm):
            m.register_forward_hook(lambda mod, inp, out: sizes.append(out.shape[-2:].numel()))
    net(torch.randn(2, *shape))
    assert min(sizes) >= 4
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.features) == pools
    if shape[-1] == 32:
        assert net.feature_dim == 512
