"""ResNets with a width factor, built so that N narrow copies compose exactly into one wide net.

Two families:

* CIFAR ResNets of depth 6n+2 (He et al. 2016, §4.2): stages of 16w, 32w, 64w channels.
  Parameter counts at w=1 with shortcut option A, 10 classes (checked by the tests):

  ======== ==========   ========================= ==========
  depth    parameters   depth                     parameters
  ======== ==========   ========================= ==========
  20       269,722      56                        853,018
  32       464,154      110                       1,727,962
  44       658,586      32, w=4 (the paper's net) 7,386,186
  ======== ==========   ========================= ==========

* Bottleneck ResNets 50/101 in torchvision's ImageNet layout with every width scaled by w
  (w=1 is torchvision's resnet50: 25,557,032 parameters). torchvision hard-codes its widths,
  so we reuse its ``Bottleneck`` block and ``_make_layer`` and set the widths ourselves.

A composed global net differs from a conventional one in one place only: option A's
parameter-free zero-padding shortcut pads each of its ``channel_groups`` channel groups
separately, so that sub-network k's channels stay in block k (see ``decompose.compose``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.resnet import ResNet as TorchvisionResNet

from .errors import UsageError

BOTTLENECK_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
CIFAR_STAGE_WIDTHS = (16, 32, 64)
BOTTLENECK_STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck "planes"; the block outputs 4x
STEM_MODULE = "conv1"  # both families name their image-facing convolution this way
CLASSIFIER_MODULE = "fc"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network: stored in checkpoints and reports."""

    arch: str  # "resnet20", "resnet32", ... (any 6n+2), "resnet50", "resnet101"
    width: float = 1.0  # width factor w: every layer has w times the standard channels
    num_classes: int = 10
    shortcut: str = "A"  # CIFAR family: "A" zero padding, "B" 1x1 conv + BN
    channel_groups: int = 1  # option A pads per group: N for a net composed of N sub-nets
    in_channels: int = 3

    @property
    def depth(self) -> int:
        return parse_depth(self.arch)

    @property
    def is_bottleneck(self) -> bool:
        return self.depth in BOTTLENECK_LAYERS

    @property
    def default_image_size(self) -> int:
        return 224 if self.is_bottleneck else 32

    def channels(self, standard_width: int) -> int:
        """Channels of a layer whose standard width is ``standard_width``, or UsageError."""
        exact = standard_width * self.width
        if abs(exact - round(exact)) > 1e-6 or round(exact) < 1:
            raise UsageError(
                f"--width {self.width:g} gives {exact:g} channels for a layer of standard width "
                f"{standard_width} in {self.arch}: choose a width factor giving whole channel counts")
        return int(round(exact))

    def layer_widths(self) -> dict[str, int]:
        """Named channel counts of every kind of layer (for messages and the split check)."""
        if self.is_bottleneck:
            names = {"stem (conv1)": 64}
            for i, planes in enumerate(BOTTLENECK_STAGE_WIDTHS, start=1):
                names[f"layer{i} bottleneck"] = planes
                names[f"layer{i} output"] = planes * Bottleneck.expansion
        else:
            names = {f"layer{i}": w for i, w in enumerate(CIFAR_STAGE_WIDTHS, start=1)}
        return {name: self.channels(w) for name, w in names.items()}

    def with_width(self, width: float, channel_groups: int) -> ModelSpec:
        return replace(self, width=width, channel_groups=channel_groups)


def parse_depth(arch: str) -> int:
    known = "resnet20/32/44/56/110 (any 6n+2), resnet50, resnet101"
    if not arch.startswith("resnet") or not arch[len("resnet"):].isdigit():
        raise UsageError(f"--arch {arch!r} is unknown: choose one of {known}")
    depth = int(arch[len("resnet"):])
    if depth not in BOTTLENECK_LAYERS and (depth < 8 or (depth - 2) % 6):
        raise UsageError(f"--arch {arch!r} is unknown: choose one of {known}")
    return depth


class GroupedZeroPadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and zero-pad channels, per channel group.

    With one group this is He et al.'s option A (pad (out-in)/2 channels on each side).
    With G groups each group of in/G channels is padded into out/G channels on its own, so
    a net composed of G sub-nets keeps every sub-net's channels inside its own block.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        if in_channels % groups or out_channels % groups or (out_channels - in_channels) % (2 * groups):
            raise UsageError(
                f"option A shortcut from {in_channels} to {out_channels} channels cannot be padded "
                f"per group for {groups} sub-networks: use --shortcut B or another --subnets")
        self.stride, self.groups = stride, groups
        self.pad = (out_channels - in_channels) // (2 * groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        if self.groups == 1:
            return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))
        n, c, h, w = x.shape
        grouped = x.reshape(n, self.groups, c // self.groups, h, w)
        return F.pad(grouped, (0, 0, 0, 0, self.pad, self.pad)).reshape(n, -1, h, w)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (depth 6n+2) built from torchvision's ``BasicBlock``."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        blocks_per_stage = (spec.depth - 2) // 6
        widths = [spec.channels(w) for w in CIFAR_STAGE_WIDTHS]
        self.conv1 = nn.Conv2d(spec.in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_channels = widths[0]
        stages = []
        for index, out_channels in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks = []
            for _ in range(blocks_per_stage):
                shortcut = None
                if stride != 1 or in_channels != out_channels:
                    shortcut = self._shortcut(spec, in_channels, out_channels, stride)
                blocks.append(BasicBlock(in_channels, out_channels, stride, shortcut))
                in_channels, stride = out_channels, 1
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, spec.num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def _shortcut(spec: ModelSpec, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        if spec.shortcut == "A":
            return GroupedZeroPadShortcut(in_channels, out_channels, stride, spec.channel_groups)
        if spec.shortcut == "B":
            return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                 nn.BatchNorm2d(out_channels))
        raise UsageError(f"--shortcut {spec.shortcut!r} is unknown: choose A or B")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class WideBottleneckResNet(TorchvisionResNet):
    """torchvision's ResNet-50/101 with every width times w (its forward and blocks reused)."""

    def __init__(self, spec: ModelSpec):
        nn.Module.__init__(self)  # torchvision's __init__ fixes the widths at 64..512
        self._norm_layer = nn.BatchNorm2d
        self.dilation, self.groups, self.base_width = 1, 1, 64
        self.inplanes = spec.channels(64)
        self.conv1 = nn.Conv2d(spec.in_channels, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        layers = BOTTLENECK_LAYERS[spec.depth]
        planes = [spec.channels(w) for w in BOTTLENECK_STAGE_WIDTHS]
        self.layer1 = self._make_layer(Bottleneck, planes[0], layers[0])
        self.layer2 = self._make_layer(Bottleneck, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(Bottleneck, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(Bottleneck, planes[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[3] * Bottleneck.expansion, spec.num_classes)
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def build_model(spec: ModelSpec) -> nn.Module:
    return WideBottleneckResNet(spec) if spec.is_bottleneck else CifarResNet(spec)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, image_size: int, in_channels: int = 3) -> int:
    """Multiply-accumulates of convolutions and linear layers for one image.

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

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    device = next(model.parameters()).device  # build the model on "meta" to make this free
    was_training = model.training
    model.eval()  # one image: BN in train mode would refuse a 1x1 feature map
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return total
