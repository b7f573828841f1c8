"""ResNets with a width factor, built so that N narrow copies compose exactly into one wide net
and k copies train fused as one grouped-convolution net.

Two families (``FAMILIES``, chosen by the depth in ``--arch``):

* CIFAR ResNets of depth 6n+2 (He et al. 2016, §4.2): stages of 16w, 32w, 64w channels.
  Parameter counts at w=1, 10 classes (checked by the tests):

  ======== ==================== ====================
  depth    shortcut A           shortcut B (1x1 + BN)
  ======== ==================== ====================
  20       269,722              272,474
  32       464,154              466,906 (the paper's "0.47 M")
  44       658,586
  56       853,018
  110      1,727,962
  ======== ==================== ====================

* Bottleneck ResNets 50/101/152 in torchvision's ImageNet layout with every width scaled by w
  (w=1 has torchvision's resnet50's 25,557,032 parameters and its state-dict names).

Two spec fields shape the channel structure beyond the width:

* ``channel_groups``: option A's parameter-free zero-padding shortcut pads each of its
  channel groups separately, so that in a net composed of N sub-nets sub-net k's channels
  stay in block k (see ``decompose.compose``).
* ``members``: k nets of this spec trained as one (HFTA, Wang et al., MLSys 2021). Every
  convolution has ``groups=k``, BatchNorm is per channel anyway, the classifier is one
  linear map per member: the fused net's input stacks the members' batches along channels
  ([B, 3k, H, W]) and its output is [B, k, classes]. Member j's logits and gradients are
  those of net j trained alone (its logits bit for bit, its gradients to rounding), and the
  fused state dict is the members' state dicts concatenated along dim 0
  (``decompose.fuse_states``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .catalog import BOTTLENECK_LAYERS, parse_depth
from .errors import UsageError

CIFAR_STAGE_WIDTHS = (16, 32, 64)
BOTTLENECK_STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck "planes"; the block outputs 4x
BOTTLENECK_EXPANSION = 4
STEM_MODULE = "conv1"  # both families name their image-facing convolution this way
CLASSIFIER_MODULE = "fc"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network: stored in checkpoints and reports."""

    arch: str  # "resnet20", "resnet32", ... (any 6n+2), "resnet50", "resnet101", "resnet152"
    width: float = 1.0  # width factor w: every layer has w times the standard channels
    num_classes: int = 10
    shortcut: str = "A"  # CIFAR family: "A" zero padding, "B" 1x1 conv + BN
    channel_groups: int = 1  # option A pads per group: N for a net composed of N sub-nets
    in_channels: int = 3
    members: int = 1  # k nets of this spec fused into one grouped-convolution net

    @property
    def depth(self) -> int:
        return parse_depth(self.arch)

    @property
    def family(self) -> Family:
        return family_of(self.depth)

    @property
    def default_image_size(self) -> int:
        return self.family.image_size

    def channels(self, standard_width: int) -> int:
        """Channels of one member's layer whose standard width is ``standard_width``."""
        exact = standard_width * self.width
        if abs(exact - round(exact)) > 1e-6 or round(exact) < 1:
            raise UsageError(
                f"--width {self.width:g} gives {exact:g} channels for a layer of standard width "
                f"{standard_width} in {self.arch}: choose a width factor giving whole channel counts")
        return int(round(exact))

    def layer_widths(self) -> dict[str, int]:
        """Named channel counts of every kind of layer (for messages and the split check)."""
        return {name: self.channels(w) for name, w in self.family.layer_widths().items()}

    def with_width(self, width: float, channel_groups: int) -> ModelSpec:
        return replace(self, width=width, channel_groups=channel_groups)

    def fused(self, members: int) -> ModelSpec:
        return replace(self, members=members)

    @property
    def member(self) -> ModelSpec:
        """One member of a fused spec (the spec itself when not fused)."""
        return replace(self, members=1)


# ---------------------------------------------------------------------------------------
# Layers that know about members (k fused nets) and channel groups
def conv(spec: ModelSpec, in_channels: int, out_channels: int, kernel: int, stride: int = 1,
         padding: int = 0) -> nn.Conv2d:
    """A convolution of one member's channel counts, for all of ``spec.members``."""
    k = spec.members
    layer = PointwiseStridedConv if kernel == 1 and stride > 1 and padding == 0 else nn.Conv2d
    return layer(in_channels * k, out_channels * k, kernel, stride, padding, bias=False, groups=k)


class PointwiseStridedConv(nn.Conv2d):
    """A 1x1 convolution of stride s computed as the stride-1 one on every s-th pixel: the same
    function and parameters. oneDNN's own strided 1x1 kernel, channels-last on CPU, writes past
    its workspace in the weight gradient when a group has fewer input channels than its vector
    block (8 on AVX2, 16 on AVX-512), as narrow sub-nets' shortcut-B and bottleneck downsamples
    do: a crash, a hang or wrong gradients (oneDNN issue 6035; seen with torch 2.14.1). Only
    on CPU: elsewhere (cuDNN) the strided kernel is sound and spares the subsampled copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        rows, cols = self.stride
        return F.conv2d(x[:, :, ::rows, ::cols], self.weight, self.bias, 1, 0, self.dilation, self.groups)


def batch_norm(spec: ModelSpec, channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels * spec.members)


class GroupedZeroPadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and zero-pad channels, per channel group.

    With one group this is He et al.'s option A (pad (out-in)/2 channels on each side).
    With G groups each group of in/G channels is padded into out/G channels on its own, so
    a net composed of G sub-nets keeps every sub-net's channels inside its own block (and
    the k members of a fused net theirs).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        if in_channels % groups or out_channels % groups or (out_channels - in_channels) % (2 * groups):
            if groups == 1:  # (a sub-net's width is --width / N: either may change it)
                raise UsageError(f"option A shortcut from {in_channels} to {out_channels} channels cannot be padded "
                                 "evenly (an odd number more): use --shortcut B, another --width or another "
                                 "--subnets")
            raise UsageError(
                f"option A shortcut from {in_channels} to {out_channels} channels cannot be padded "
                f"per group for {groups} sub-networks: use --shortcut B, another --subnets or another --width")
        self.stride, self.groups = stride, groups
        self.pad = (out_channels - in_channels) // (2 * groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        if self.groups == 1:
            return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))
        n, c, h, w = x.shape
        grouped = x.reshape(n, self.groups, c // self.groups, h, w)
        return F.pad(grouped, (0, 0, 0, 0, self.pad, self.pad)).reshape(n, -1, h, w)


class MemberLinear(nn.Module):
    """k classifiers side by side: features [B, k*F] -> logits [B, k, C]. Its ``weight``
    [k*C, F] and ``bias`` [k*C] are the members' ``fc`` tensors stacked along dim 0.

    One ``F.linear`` per member (the classifier is a tiny part of the net): the very kernel
    of a plain net's ``nn.Linear``, so a member's logits are bit for bit those of its net
    alone. (Training then agrees to rounding only: a grouped convolution's backward pass
    sums in another order than a plain one's; ``tests/test_fused_run.py`` measures it.)"""

    def __init__(self, in_features: int, out_features: int, members: int):
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(members * out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members * out_features))
        nn.init.kaiming_normal_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, c = self.in_features, self.out_features
        return torch.stack([F.linear(x[:, j * f:(j + 1) * f], self.weight[j * c:(j + 1) * c],
                                     self.bias[j * c:(j + 1) * c]) for j in range(self.members)], dim=1)


class MemberAvgPool(nn.AdaptiveAvgPool2d):
    """Global average pooling, member by member on contiguous copies of each member's
    channels: pooling k members' channels at once sums in another order (the kernel's
    vectorisation follows the channel count), and a member must pool as its net alone does."""

    def __init__(self, members: int):
        super().__init__(1)
        self.members = members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.members == 1:
            return super().forward(x)
        c = x.shape[1] // self.members
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return torch.cat([super(MemberAvgPool, self).forward(x[:, j * c:(j + 1) * c].contiguous(memory_format=fmt))
                          for j in range(self.members)], dim=1)


def classifier(spec: ModelSpec, in_features: int) -> nn.Module:
    if spec.members == 1:
        return nn.Linear(in_features, spec.num_classes)
    return MemberLinear(in_features, spec.num_classes, spec.members)


def _shortcut(spec: ModelSpec, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if spec.shortcut == "A":
        return GroupedZeroPadShortcut(in_channels * spec.members, out_channels * spec.members, stride,
                                      spec.channel_groups * spec.members)
    if spec.shortcut == "B":
        return nn.Sequential(conv(spec, in_channels, out_channels, 1, stride), batch_norm(spec, out_channels))
    raise UsageError(f"--shortcut {spec.shortcut!r} is unknown: choose A or B")


# ---------------------------------------------------------------------------------------
# Blocks (torchvision's state-dict names: conv1, bn1, conv2, ..., downsample)
class BasicBlock(nn.Module):
    def __init__(self, spec: ModelSpec, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = conv(spec, in_channels, out_channels, 3, stride, 1)
        self.bn1 = batch_norm(spec, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(spec, out_channels, out_channels, 3, 1, 1)
        self.bn2 = batch_norm(spec, out_channels)
        self.downsample = (_shortcut(spec, in_channels, out_channels, stride)
                           if stride != 1 or in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    def __init__(self, spec: ModelSpec, in_channels: int, planes: int, stride: int):
        super().__init__()
        out_channels = planes * BOTTLENECK_EXPANSION
        self.conv1 = conv(spec, in_channels, planes, 1)
        self.bn1 = batch_norm(spec, planes)
        self.conv2 = conv(spec, planes, planes, 3, stride, 1)
        self.bn2 = batch_norm(spec, planes)
        self.conv3 = conv(spec, planes, out_channels, 1)
        self.bn3 = batch_norm(spec, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(conv(spec, in_channels, out_channels, 1, stride),
                                            batch_norm(spec, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


# ---------------------------------------------------------------------------------------
class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (depth 6n+2)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        blocks_per_stage = (spec.depth - 2) // 6
        widths = [spec.channels(w) for w in CIFAR_STAGE_WIDTHS]
        self.conv1 = conv(spec, spec.in_channels, widths[0], 3, 1, 1)
        self.bn1 = batch_norm(spec, widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_channels, stages = widths[0], []
        for index, out_channels in enumerate(widths):
            stride, blocks = (1 if index == 0 else 2), []
            for _ in range(blocks_per_stage):
                blocks.append(BasicBlock(spec, in_channels, out_channels, stride))
                in_channels, stride = out_channels, 1
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = MemberAvgPool(spec.members)
        self.fc = classifier(spec, in_channels)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear, MemberLinear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class BottleneckResNet(nn.Module):
    """ResNet-50/101/152 in torchvision's layout and initialisation, every width times w."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        planes = [spec.channels(w) for w in BOTTLENECK_STAGE_WIDTHS]
        stem = spec.channels(64)
        self.conv1 = conv(spec, spec.in_channels, stem, 7, 2, 3)
        self.bn1 = batch_norm(spec, stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = stem
        for index, (blocks, width) in enumerate(zip(BOTTLENECK_LAYERS[spec.depth], planes)):
            stride = 1 if index == 0 else 2
            layer = []
            for _ in range(blocks):
                layer.append(Bottleneck(spec, in_channels, width, stride))
                in_channels, stride = width * BOTTLENECK_EXPANSION, 1
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
        self.avgpool = MemberAvgPool(spec.members)
        self.fc = classifier(spec, in_channels)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A model family: how to build it, its natural image size, its named layer widths."""

    name: str
    build: Callable[[ModelSpec], nn.Module]
    image_size: int
    layer_widths: Callable[[], dict[str, int]]  # layer name -> standard width (w = 1)


def _bottleneck_widths() -> dict[str, int]:
    names = {"stem (conv1)": 64}
    for i, planes in enumerate(BOTTLENECK_STAGE_WIDTHS, start=1):
        names[f"layer{i} bottleneck"] = planes
        names[f"layer{i} output"] = planes * BOTTLENECK_EXPANSION
    return names


FAMILIES = {
    "cifar": Family("cifar", CifarResNet, 32,
                    lambda: {f"layer{i}": w for i, w in enumerate(CIFAR_STAGE_WIDTHS, start=1)}),
    "bottleneck": Family("bottleneck", BottleneckResNet, 224, _bottleneck_widths),
}


def family_of(depth: int) -> Family:
    return FAMILIES["bottleneck" if depth in BOTTLENECK_LAYERS else "cifar"]


def build_model(spec: ModelSpec) -> nn.Module:
    return spec.family.build(spec)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def smallest_normalised_map(spec: ModelSpec, image_size: int) -> int:
    """Pixels per channel of the smallest feature map a BatchNorm of ``spec`` normalises at
    ``image_size``: with one image per step, the only values it has (1: it cannot train).
    Built and run on the "meta" device: no memory, no compute."""
    with torch.device("meta"):
        model = build_model(spec).eval()  # (train mode would refuse the 1x1 map it is asked about)
    sizes = []
    hooks = [m.register_forward_pre_hook(lambda _m, inputs: sizes.append(math.prod(inputs[0].shape[2:])))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(torch.zeros(1, spec.in_channels, image_size, image_size, device="meta"))
    for hook in hooks:
        hook.remove()
    return min(sizes, default=image_size * image_size)


def count_flops(model: nn.Module, image_size: int, in_channels: int = 3) -> int:
    """Multiply-accumulates of convolutions and linear layers for one image (per member of a
    fused net: all members together).

    The convention of He et al. (ResNet-50 = 4.1 G at 224 px); BN, ReLU and adds are left out.
    On a model built under ``torch.device("meta")`` it costs no memory and no compute.
    """
    total = 0

    def count(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            total += output[0].numel() * per_output
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        elif isinstance(module, MemberLinear):
            total += module.members * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear, MemberLinear))]
    device = next(model.parameters()).device  # build the model on "meta" to make this free
    members = model.fc.members if isinstance(model.fc, MemberLinear) else 1
    was_training = model.training
    model.eval()  # one image: BN in train mode would refuse a 1x1 feature map
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels * members, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return total
