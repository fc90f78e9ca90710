"""Model zoo: one :func:`build` for every network the notebooks train, unroll or evaluate.

- ``mlp``: flatten -> 128 -> 128 -> classes (ReLU).
- ``lenet``: the LeNet of Wang et al. 2018 (DD): conv5x5(6) -> ReLU -> maxpool -> conv5x5(16)
  -> ReLU -> maxpool -> fc120 -> fc84 -> classes. As in the DD code, the first conv pads by 2
  for inputs smaller than 32 (28x28 MNIST); the second conv also pads by 2 when the map is
  smaller than 10 (8x8 digits, 16x16 USPS), so that every input size keeps valid shapes.
- ``alexnet``: the "AlexCifarNet" of the DD code: two conv5x5(64) + ReLU + maxpool3/2 + local
  response norm, then fc384 -> fc192 -> classes.
- ``convnet`` (and ``convnet_d4``/``convnet_d5``): the ConvNet of Cazenavette et al. 2022 (MTT),
  inherited from Dataset Condensation: ``depth`` blocks of conv3x3(``width``, pad 1) -> norm ->
  ReLU -> 2x2 pool, then one linear layer. "Instance norm" is ``GroupNorm(width, width)`` with
  affine parameters, exactly as in the MTT code (it has per-channel affine and no running
  statistics, so it is safe inside unrolled, functional training). Pooling stops once the map
  is 1x1 (e.g. 8x8 digits at depth 4). Note: the MTT code pads the first conv by 3 for
  1-channel inputs (28 -> 32); we keep pad 1 everywhere, so MNIST features are 3x3 at depth 3.
- ``vgg11``: VGG-11 as in the MTT code's cross-architecture evaluation: instance norm by
  default (``norm="batchnorm"`` gives their VGG11BN), one linear classifier.
- ``resnet18``: ResNet-18 with the CIFAR stem (conv3x3 stride 1, no max-pool), batch norm by
  default (``norm="instancenorm"`` gives MTT's variant), global average pool -> 512 features.
  It is the Barlow Twins teacher of Joshi et al. 2025 (MKDT).

Every model has ``feature_dim`` and ``embed(x)`` (the penultimate features); with
``num_classes=0`` the classifier is the identity and ``forward`` returns those features.
Feature sizes are found by a dummy forward pass, never by hand formulas. No layer works in
place, so models can be run through ``torch.func.functional_call`` and differentiated twice.
"""

from __future__ import annotations

import difflib
import inspect
import math

import torch
from torch import Tensor, nn

MODELS = ("mlp", "lenet", "convnet", "convnet_d4", "convnet_d5", "alexnet", "vgg11", "resnet18")
NORMS = ("instancenorm", "batchnorm", "groupnorm", "none")
ACTIVATIONS = ("relu", "leakyrelu", "sigmoid", "tanh")
POOLINGS = ("avgpool", "maxpool", "none")
INITS = ("default", "xavier", "kaiming")


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    v = str(value).lower()
    if v not in choices:
        raise ValueError(f"{what}={value!r} is not one of {choices}")
    return v


def make_norm(kind: str, channels: int) -> nn.Module | None:
    """The normalisation layers of the MTT code; ``None`` for ``"none"``."""
    kind = _choice(kind, NORMS, "norm")
    if kind == "instancenorm":  # one group per channel = instance norm with affine params
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    return None


def make_activation(kind: str) -> nn.Module:
    kind = _choice(kind, ACTIVATIONS, "activation")
    return {"relu": lambda: nn.ReLU(inplace=False), "leakyrelu": lambda: nn.LeakyReLU(0.01, inplace=False),
            "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[kind]()


def _head(feature_dim: int, num_classes: int) -> nn.Module:
    return nn.Linear(feature_dim, num_classes) if num_classes > 0 else nn.Identity()


@torch.no_grad()
def _output_dim(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Flattened output size of ``module`` on one input of ``input_shape`` (eval mode, batch of
    2 so that batch norm and 1x1 maps are fine; running statistics are left untouched)."""
    was_training = module.training
    module.eval()
    out = module(torch.zeros(2, *input_shape))
    module.train(was_training)
    return out[0].numel()


class _Net(nn.Module):
    """Shared shape: ``features`` (input -> flat penultimate features) then ``classifier``."""

    features: nn.Module
    classifier: nn.Module
    feature_dim: int

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate features, shape (B, feature_dim)."""
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


class MLP(_Net):
    def __init__(self, input_shape, num_classes, hidden=(128, 128), activation="relu"):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, int(h)), make_activation(activation)]
            width = int(h)
        self.features = nn.Sequential(*layers)
        self.feature_dim = width
        self.classifier = _head(width, num_classes)


class LeNet(_Net):
    """LeNet as in Wang et al. 2018 (ReLU, max pool); paddings adapted to the input size."""

    def __init__(self, input_shape, num_classes, activation="relu"):
        super().__init__()
        channels, height, width = input_shape
        size = min(height, width)
        pad1 = 0 if size >= 32 else 2
        size = size + 2 * pad1 - 4
        pool1 = size >= 2
        size = size // 2 if pool1 else size
        pad2 = 0 if size >= 10 else 2
        size = size + 2 * pad2 - 4
        pool2 = size >= 2
        conv = [nn.Conv2d(channels, 6, 5, padding=pad1), make_activation(activation)]
        conv += [nn.MaxPool2d(2)] if pool1 else []
        conv += [nn.Conv2d(6, 16, 5, padding=pad2), make_activation(activation)]
        conv += [nn.MaxPool2d(2)] if pool2 else []
        conv += [nn.Flatten()]
        conv_net = nn.Sequential(*conv)
        flat = _output_dim(conv_net, input_shape)
        self.features = nn.Sequential(*conv_net, nn.Linear(flat, 120), make_activation(activation),
                                      nn.Linear(120, 84), make_activation(activation))
        self.feature_dim = 84
        self.classifier = _head(84, num_classes)


class AlexNet(_Net):
    """The small CIFAR AlexNet ("AlexCifarNet") used by Wang et al. 2018 for CIFAR-10."""

    def __init__(self, input_shape, num_classes, activation="relu"):
        super().__init__()
        channels = input_shape[0]

        def lrn():
            return nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0)

        conv_net = nn.Sequential(
            nn.Conv2d(channels, 64, 5, padding=2), make_activation(activation),
            nn.MaxPool2d(3, stride=2, padding=1), lrn(),
            nn.Conv2d(64, 64, 5, padding=2), make_activation(activation),
            lrn(), nn.MaxPool2d(3, stride=2, padding=1),
            nn.Flatten(),
        )
        flat = _output_dim(conv_net, input_shape)
        self.features = nn.Sequential(*conv_net, nn.Linear(flat, 384), make_activation(activation),
                                      nn.Linear(384, 192), make_activation(activation))
        self.feature_dim = 192
        self.classifier = _head(192, num_classes)


def _pool(kind: str) -> nn.Module:
    return nn.AvgPool2d(2, stride=2) if kind == "avgpool" else nn.MaxPool2d(2, stride=2)


class ConvNet(_Net):
    """The MTT / Dataset Condensation ConvNet (Cazenavette et al. 2022, sec. 4)."""

    def __init__(self, input_shape, num_classes, width=128, depth=3, norm="instancenorm",
                 pooling="avgpool", activation="relu"):
        super().__init__()
        pooling = _choice(pooling, POOLINGS, "pooling")
        channels, height, wide = input_shape
        layers: list[nn.Module] = []
        for _ in range(int(depth)):
            layers.append(nn.Conv2d(channels, width, 3, padding=1))
            n = make_norm(norm, width)
            layers += [n] if n is not None else []
            layers.append(make_activation(activation))
            channels = width
            if pooling != "none" and min(height, wide) >= 2:  # stop pooling at 1x1 maps
                layers.append(_pool(pooling))
                height, wide = height // 2, wide // 2
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.feature_dim = _output_dim(self.features, input_shape)
        self.classifier = _head(self.feature_dim, num_classes)


_VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(_Net):
    """VGG-11 as in the MTT code (instance norm by default), with a single linear classifier."""

    def __init__(self, input_shape, num_classes, norm="instancenorm", activation="relu"):
        super().__init__()
        channels, height, width = input_shape
        layers: list[nn.Module] = []
        # inputs smaller than CIFAR's 32x32 (8x8 digits, 28x28 MNIST) cannot take all five 2x2 pools: the
        # first ones are skipped, so the last stages keep CIFAR's map sizes (instance norm of the tiny maps an
        # early pooling would leave, 2x2 or 1x1, erases almost everything the layer computed)
        pools = [i for i, v in enumerate(_VGG11_CFG) if v == "M"]
        fit = max(int(math.log2(min(height, width))), 0)
        skipped = set(pools[:max(len(pools) - fit, 0)])
        for i, v in enumerate(_VGG11_CFG):
            if v == "M":
                if i not in skipped:
                    layers.append(nn.MaxPool2d(2, stride=2))
                    height, width = height // 2, width // 2
                continue
            layers.append(nn.Conv2d(channels, v, 3, padding=1))
            n = make_norm(norm, v)
            layers += [n] if n is not None else []
            layers.append(make_activation(activation))
            channels = v
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.feature_dim = _output_dim(self.features, input_shape)
        self.classifier = _head(self.feature_dim, num_classes)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (He et al. 2016)."""

    def __init__(self, in_channels, out_channels, stride, norm, activation):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_channels) or nn.Identity()
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels) or nn.Identity()
        self.act2 = make_activation(activation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          make_norm(norm, out_channels) or nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet18(_Net):
    """ResNet-18, CIFAR stem (3x3 conv, stride 1, no max-pool), 512-d pooled features."""

    def __init__(self, input_shape, num_classes, norm="batchnorm", activation="relu"):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_shape[0], 64, 3, padding=1, bias=False),
                                   make_norm(norm, 64) or nn.Identity(), make_activation(activation)]
        channels = 64
        for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for block_stride in (stride, 1):
                layers.append(BasicBlock(channels, out_channels, block_stride, norm, activation))
                channels = out_channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.feature_dim = _output_dim(self.features, input_shape)
        self.classifier = _head(self.feature_dim, num_classes)


# name -> (class, fixed keyword arguments)
_REGISTRY: dict[str, tuple[type[nn.Module], dict]] = {
    "mlp": (MLP, {}),
    "lenet": (LeNet, {}),
    "convnet": (ConvNet, {}),
    "convnet_d4": (ConvNet, {"depth": 4}),
    "convnet_d5": (ConvNet, {"depth": 5}),
    "alexnet": (AlexNet, {}),
    "vgg11": (VGG11, {}),
    "resnet18": (ResNet18, {}),
}
_ALIASES = {"alexcifarnet": "alexnet", "convnetd3": "convnet"}


def canonical_model_name(name: str) -> str:
    """Registered name for ``name`` (case, ``-`` and ``_`` insensitive); ValueError if unknown."""
    squash = str(name).strip().lower().replace("-", "").replace("_", "")
    table = {m.replace("_", ""): m for m in MODELS} | _ALIASES
    if squash in table:
        return table[squash]
    close = difflib.get_close_matches(str(name).lower(), MODELS, n=1, cutoff=0.4)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}.{hint}")


def initialise(model: nn.Module, init: str = "default") -> nn.Module:
    """Re-initialise conv and linear weights: ``"xavier"`` (normal, gain 1, zero bias, the DD
    code's default), ``"kaiming"`` (normal, fan-in, zero bias) or ``"default"`` (PyTorch's)."""
    init = _choice(init, INITS, "init")
    if init == "default":
        return model
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if init == "xavier":
                nn.init.xavier_normal_(m.weight)
            else:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def build(name: str, input_shape: tuple[int, int, int], num_classes: int, init: str = "default",
          **kwargs) -> nn.Module:
    """Build model ``name`` (see :data:`MODELS`) for inputs ``(C, H, W)`` and ``num_classes``
    outputs (0: the model returns its ``feature_dim`` features). ``kwargs`` go to the model's
    constructor, e.g. ``build("convnet", (3, 32, 32), 10, width=64, norm="batchnorm")``."""
    key = canonical_model_name(name)
    cls, fixed = _REGISTRY[key]
    if len(tuple(input_shape)) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "input_shape", "num_classes")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"build({name!r}): unknown keyword argument(s) {unknown}; accepted: {accepted + ['init']}")
    for k, v in fixed.items():
        if k in kwargs and kwargs[k] != v:
            raise ValueError(f"build({name!r}) fixes {k}={v}; got {k}={kwargs[k]} (use 'convnet' with {k}=...)")
    model = cls(tuple(int(s) for s in input_shape), int(num_classes), **{**fixed, **kwargs})
    model.input_shape = tuple(int(s) for s in input_shape)
    model.num_classes = int(num_classes)
    return initialise(model, init)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
