"""Registry of base-classifier architectures, by name.

Every model built here is ``Sequential(NormalizeLayer(mean, std), network)``: it takes
float32 pixels in [0, 1] and normalises inside, so noise is added in pixel space and
radii are in pixel units. The state-dict keys are those of Cohen et al.'s
checkpoints (``1.conv1.weight``, ...) because their models have the same
``Sequential(NormalizeLayer, model)`` shape and a NormalizeLayer without parameters.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator: register ``fn(num_classes, in_channels, **architecture_args) -> nn.Module``."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def available() -> list[str]:
    """Names of the registered architectures."""
    return sorted(_REGISTRY)


class NormalizeLayer(nn.Module):
    """(x - mean) / std per channel. No parameters, so it adds no state-dict keys."""

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if torch.any(std <= 0):
            raise ValueError(f"std must be > 0, got {std.flatten().tolist()}")
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x):
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


MAX_PARAMETERS = 10**9
"""Largest network (parameter count) :func:`build_model` builds: 4 GB of float32 weights."""


def _positive_ints(value) -> bool:
    """True if every integer in ``value`` (nested in lists, tuples and dicts) is >= 1."""
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return value >= 1
    if isinstance(value, (list, tuple)):
        return all(_positive_ints(v) for v in value)
    if isinstance(value, dict):
        return all(_positive_ints(v) for v in value.values())
    return True


def build_model(name: str, *, num_classes: int, input_shape, mean, std, **architecture_args) -> nn.Module:
    """Build ``Sequential(NormalizeLayer(mean, std), architecture)`` with fresh weights.

    Raises ValueError, before allocating any weight, for an unknown architecture, arguments it
    does not take, integer arguments (widths, depths, ...) below 1, or more than
    :data:`MAX_PARAMETERS` parameters (counted on torch's ``meta`` device)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(available())}")
    in_channels = int(input_shape[0])
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(
            f"mean and std need one value per input channel ({in_channels}), got {len(mean)} and {len(std)}"
        )
    if not _positive_ints(architecture_args):
        raise ValueError(f"architecture {name!r}: integer arguments must be >= 1, got {architecture_args}")

    def make() -> nn.Module:
        return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, input_shape=tuple(input_shape),
                               **architecture_args)

    try:
        with torch.device("meta"):
            size = sum(p.numel() for p in make().parameters())
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ValueError(f"architecture {name!r} cannot be built with arguments {architecture_args}: {detail}") from None
    if size > MAX_PARAMETERS:
        raise ValueError(f"architecture {name!r} with arguments {architecture_args} has {size:,} parameters; "
                         f"the limit is {MAX_PARAMETERS:,}")
    return nn.Sequential(NormalizeLayer(mean, std), make())


# --- Cohen-compatible CIFAR ResNets (layer structure of bearpaw/pytorch-classification) ---


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet: 3 stages of 16/32/64 (x width) planes, depth = 6n + 2.

    Module names match Cohen et al.'s ``archs/cifar_resnet.py`` so their checkpoints load.
    ``width`` > 1 widens every stage (not Cohen-compatible unless 1).
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, block: str = "basic", width: int = 1):
        super().__init__()
        if block == "basic":
            if (depth - 2) % 6:
                raise ValueError(f"basic-block depth must be 6n + 2, got {depth}")
            blocks, unit = (depth - 2) // 6, BasicBlock
        elif block == "bottleneck":
            if (depth - 2) % 9:
                raise ValueError(f"bottleneck depth must be 9n + 2, got {depth}")
            blocks, unit = (depth - 2) // 9, Bottleneck
        else:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        base = 16 * int(width)
        self.inplanes = base
        self.conv1 = nn.Conv2d(in_channels, base, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(unit, base, blocks)
        self.layer2 = self._make_layer(unit, base * 2, blocks, stride=2)
        self.layer3 = self._make_layer(unit, base * 4, blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(base * 4 * unit.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, unit, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * unit.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * unit.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * unit.expansion),
            )
        layers = [unit(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * unit.expansion
        layers += [unit(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register("cifar_resnet20")
def cifar_resnet20(num_classes: int, in_channels: int, input_shape=None, width: int = 1) -> nn.Module:
    """ResNet-20 (0.27 M parameters, ~41 M multiply-adds at 32x32); Cohen's ``cifar_resnet20``."""
    return CifarResNet(20, num_classes, in_channels, "basic", width)


@register("cifar_resnet110")
def cifar_resnet110(num_classes: int, in_channels: int, input_shape=None, width: int = 1) -> nn.Module:
    """ResNet-110 (basic blocks, 1.7 M parameters); Cohen's ``cifar_resnet110``."""
    return CifarResNet(110, num_classes, in_channels, "basic", width)


# --- small networks ---


@register("small_cnn")
def small_cnn(num_classes: int, in_channels: int, input_shape, channels=(16, 32), hidden: int = 64) -> nn.Module:
    """A small conv net: [conv3x3-BN-ReLU] x len(channels) with 2x2 pooling after each, then an MLP.

    Sized for 8x8 digits with the defaults; ``channels=(32, 64, 128)`` suits 32x32 CIFAR.
    """
    layers: list[nn.Module] = []
    cin = in_channels
    h, w = int(input_shape[1]), int(input_shape[2])
    for cout in channels:
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        if h >= 2 and w >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        cin = cout
    layers += [nn.Flatten(), nn.Linear(cin * h * w, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


@register("pooled_mlp")
def pooled_mlp(num_classes: int, in_channels: int, input_shape, pool: int = 8, hidden=(256, 256)) -> nn.Module:
    """Average pooling over ``pool`` x ``pool`` blocks, then an MLP (``hidden`` widths, ReLU).

    Made for routers: a block mean of pool^2 pixels moves by at most ||delta||_2 / pool under a
    perturbation delta and carries noise sigma / pool, so the network sees a nearly clean low-resolution
    image even at a large sigma_e, and its smoothed decision stays put over a large radius.
    """
    h, w = int(input_shape[1]), int(input_shape[2])
    if h % pool or w % pool:
        raise ValueError(f"pooled_mlp: pool {pool} must divide the image size {h}x{w}")
    layers: list[nn.Module] = [nn.AvgPool2d(pool), nn.Flatten()]
    width = in_channels * (h // pool) * (w // pool)
    for units in hidden:
        layers += [nn.Linear(width, int(units)), nn.ReLU(inplace=True)]
        width = int(units)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


# --- routers built on a classifier ---


class ConfidenceHead(nn.Module):
    """``base`` (a classifier, e.g. an expert's network) -> softmax -> probabilities sorted in
    descending order -> MLP -> ``num_classes`` logits.

    The sorted probabilities describe how confident ``base`` is, whatever the class, which
    is what tells the experts of a Dual RS router apart: a large-sigma expert is the right
    choice exactly where it stays confident under its noise. Start ``base`` from that
    expert's weights (``train-router --init``); the state-dict keys are ``base.*`` and ``head.*``.
    """

    def __init__(self, base: nn.Module, base_classes: int, num_classes: int, hidden: int):
        super().__init__()
        self.base = base
        self.head = nn.Sequential(nn.Linear(base_classes, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x):
        probabilities = torch.softmax(self.base(x), dim=1)
        return self.head(torch.sort(probabilities, dim=1, descending=True).values)


@register("confidence_head")
def confidence_head(num_classes: int, in_channels: int, input_shape, base: str = "cifar_resnet20",
                    base_args: dict | None = None, base_classes: int = 10, hidden: int = 32) -> nn.Module:
    """A router on a classifier's sorted class probabilities (:class:`ConfidenceHead`)."""
    if base not in _REGISTRY or base == "confidence_head":
        raise KeyError(f"unknown base architecture {base!r}; known: {', '.join(available())}")
    network = _REGISTRY[base](num_classes=int(base_classes), in_channels=in_channels, input_shape=input_shape,
                              **(base_args or {}))
    return ConfidenceHead(network, int(base_classes), num_classes, int(hidden))


def parse_groups(groups: str, base_classes: int) -> list[list[int]]:
    """``"0+1,2"`` -> [[0, 1], [2]]: disjoint groups of a base network's outputs (0-based), each non-empty."""
    try:
        parsed = [[int(v) for v in part.split("+")] for part in str(groups).split(",")]
    except ValueError:
        raise ValueError(f"groups must read like '0+1,2' (outputs joined by '+', groups by ','), got {groups!r}") \
            from None
    flat = [v for g in parsed for v in g]
    if len(set(flat)) != len(flat) or any(not 0 <= v < base_classes for v in flat) or len(parsed) < 1:
        raise ValueError(f"groups {groups!r}: each of the base's {base_classes} outputs may appear at most once")
    return parsed


class GroupedOutputs(nn.Module):
    """``base``'s logits, grouped: output j is the largest of ``base``'s logits in group j.

    Its argmax is the group that holds ``base``'s argmax (up to exact ties between groups), so a K-expert
    router becomes a router over fewer experts: the votes for one expert count for another (groups
    "0+1,2": expert 0's votes go to expert 1), or an expert is dropped (groups "1,2": argmax over the
    rest). Either is a deterministic base classifier, so its smoothed router is certified like any other;
    with two experts a router set holds both, which needs no router bound (``router/sets.py``).
    State-dict keys are ``base.*``: the source router's weights load unchanged."""

    def __init__(self, base: nn.Module, groups: list[list[int]]):
        super().__init__()
        self.base = base
        self.groups = [list(g) for g in groups]

    def forward(self, x):
        logits = self.base(x)
        return torch.stack([logits[:, g].amax(dim=1) for g in self.groups], dim=1)


@register("grouped_outputs")
def grouped_outputs(num_classes: int, in_channels: int, input_shape, base: str = "linear",
                    base_args: dict | None = None, base_classes: int | None = None,
                    groups: str | None = None) -> nn.Module:
    """A router over groups of another router's outputs (:class:`GroupedOutputs`). Defaults: ``base_classes`` =
    ``num_classes`` and one group per output (the identity)."""
    if base not in _REGISTRY or base == "grouped_outputs":
        raise KeyError(f"unknown base architecture {base!r}; known: {', '.join(available())}")
    base_classes = int(num_classes if base_classes is None else base_classes)
    parsed = parse_groups(",".join(str(i) for i in range(base_classes)) if groups is None else groups, base_classes)
    if len(parsed) != num_classes:
        raise ValueError(f"grouped_outputs: {len(parsed)} groups for {num_classes} router classes")
    network = _REGISTRY[base](num_classes=base_classes, in_channels=in_channels, input_shape=input_shape,
                              **(base_args or {}))
    return GroupedOutputs(network, parsed)


GATE_FEATURES = ("p1", "margin")
GATE_MODES = ("gate", "blend")


class GatedRouter(nn.Module):
    """A router combined with a classifier's confidence on the same input: ``router`` gives K logits, ``gate`` (a
    classifier, e.g. the sigma 1.0 expert's network) gives its confidence s (``p1``, its top softmax
    probability, or ``margin``, p1 - p2). Mode ``gate``: where s >= ``threshold`` the output votes for
    ``gate_class`` (logit 1e4 there, 0 elsewhere), otherwise it is the router's logits unchanged. Mode ``blend``:
    the router's logit for ``gate_class`` is raised by ``weight`` * s + ``bias`` (float32, in that order), the
    others kept. Either is a deterministic function of the input, so the smoothed router is certified like any
    other. State-dict keys ``router.*`` and ``gate.*``."""

    def __init__(self, router: nn.Module, gate: nn.Module, feature: str, threshold: float, gate_class: int,
                 num_classes: int, mode: str = "gate", weight: float = 0.0, bias: float = 0.0):
        super().__init__()
        if feature not in GATE_FEATURES:
            raise ValueError(f"gate feature {feature!r}; known: {', '.join(GATE_FEATURES)}")
        if mode not in GATE_MODES:
            raise ValueError(f"gate mode {mode!r}; known: {', '.join(GATE_MODES)}")
        if not 0 <= gate_class < num_classes:
            raise ValueError(f"gate_class {gate_class} is not one of the {num_classes} router classes")
        self.router, self.gate = router, gate
        self.feature, self.threshold, self.gate_class = feature, float(threshold), int(gate_class)
        self.num_classes, self.mode, self.weight, self.bias = int(num_classes), mode, float(weight), float(bias)

    def forward(self, x):
        logits = self.router(x)
        top = torch.topk(torch.softmax(self.gate(x), dim=1), 2, dim=1).values
        s = top[:, 0] if self.feature == "p1" else top[:, 0] - top[:, 1]
        onehot = torch.zeros_like(logits)
        onehot[:, self.gate_class] = 1.0
        if self.mode == "blend":
            shift = s * torch.tensor(self.weight, dtype=s.dtype) + torch.tensor(self.bias, dtype=s.dtype)
            return logits + onehot * shift.unsqueeze(1)
        gated = (s >= torch.tensor(self.threshold, dtype=s.dtype)).unsqueeze(1)
        return torch.where(gated, onehot * 1e4, logits)


@register("gated_router")
def gated_router(num_classes: int, in_channels: int, input_shape, router: str = "linear",
                 router_args: dict | None = None, gate: str = "linear", gate_args: dict | None = None,
                 gate_classes: int = 10, feature: str = "p1", threshold: float = 2.0,
                 gate_class: int | None = None, mode: str = "gate", weight: float = 0.0,
                 bias: float = 0.0) -> nn.Module:
    """:class:`GatedRouter`; ``gate_class`` defaults to the last router class, ``threshold`` 2.0 never gates."""
    for name in (router, gate):
        if name not in _REGISTRY or name == "gated_router":
            raise KeyError(f"unknown architecture {name!r}; known: {', '.join(available())}")
    r = _REGISTRY[router](num_classes=num_classes, in_channels=in_channels, input_shape=input_shape,
                          **(router_args or {}))
    g = _REGISTRY[gate](num_classes=int(gate_classes), in_channels=in_channels, input_shape=input_shape,
                        **(gate_args or {}))
    return GatedRouter(r, g, feature, threshold, num_classes - 1 if gate_class is None else int(gate_class),
                       num_classes, mode, weight, bias)


@register("linear")
def linear(num_classes: int, in_channels: int, input_shape) -> nn.Module:
    """Logits = W x + b on the flattened input. Its smoothed probabilities are closed-form,
    which is what the exact-oracle tests use."""
    size = 1
    for d in input_shape:
        size *= int(d)
    return nn.Sequential(nn.Flatten(), nn.Linear(size, num_classes))


def count_flops(model: nn.Module, input_shape) -> int:
    """Floating-point operations of one forward pass on one input (2 per multiply-add).

    Counts convolutions and linear layers from their shapes, measured with forward
    hooks on a real pass; elementwise layers (BN, ReLU, pooling) are left out, as is usual.
    """
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        kernel = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
        total += 2 * kernel * output.numel() // output.shape[0]

    def linear_hook(module, inputs, output):
        nonlocal total
        total += 2 * module.in_features * module.out_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros((1, *input_shape)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)
