"""Models: He et al.'s parameter counts, torchvision parity, width scaling, split errors."""

import pytest
import torch
import torchvision

from dd_mpi.decompose import subnet_spec
from dd_mpi.errors import UsageError
from dd_mpi.models import ModelSpec, build_model, count_flops, count_parameters


def params(spec: ModelSpec) -> int:
    with torch.device("meta"):
        return count_parameters(build_model(spec))


@pytest.mark.parametrize("arch, width, expected", [
    ("resnet20", 1, 269_722), ("resnet32", 1, 464_154), ("resnet44", 1, 658_586),
    ("resnet56", 1, 853_018), ("resnet110", 1, 1_727_962), ("resnet32", 4, 7_386_186),
])
def test_cifar_parameter_counts_match_he_et_al(arch, width, expected):
    assert params(ModelSpec(arch, width)) == expected


@pytest.mark.parametrize("depth", [50, 101, 152])  # (152 is 6n+2 too: it was a CIFAR net, against its name)
def test_bottleneck_matches_torchvision_at_standard_width(depth):
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    assert params(ModelSpec(f"resnet{depth}", 1, num_classes=1000)) == count_parameters(reference)


def test_resnet50_parameter_count():
    assert params(ModelSpec("resnet50", 1, num_classes=1000)) == 25_557_032


def test_bottleneck_forward_matches_torchvision_with_same_weights():
    reference = torchvision.models.resnet50(weights=None).eval()
    ours = build_model(ModelSpec("resnet50", 1, num_classes=1000)).eval()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))


def test_option_b_adds_projection_parameters():
    assert params(ModelSpec("resnet20", 1, shortcut="B")) > params(ModelSpec("resnet20", 1))


@pytest.mark.parametrize("arch, width, n", [("resnet32", 4, 4), ("resnet56", 4, 2), ("resnet50", 1, 4),
                                            ("resnet20", 2, 8)])
def test_subnet_has_about_one_over_n_squared_of_conv_parameters(arch, width, n):
    spec = ModelSpec(arch, width, num_classes=10)
    with torch.device("meta"):
        big, small = build_model(spec), build_model(subnet_spec(spec, n))
    conv = lambda m: sum(p.numel() for name, p in m.named_parameters() if p.ndim == 4 and not name.startswith("conv1"))  # noqa: E731
    assert conv(big) / conv(small) == pytest.approx(n * n, rel=1e-9)
    flops_ratio = count_flops(big, 32) / count_flops(small, 32)
    assert n * n * 0.8 < flops_ratio <= n * n


def test_width_scales_every_stage():
    spec = ModelSpec("resnet20", 2)
    assert spec.layer_widths() == {"layer1": 32, "layer2": 64, "layer3": 128}
    assert subnet_spec(spec, 4).layer_widths() == {"layer1": 8, "layer2": 16, "layer3": 32}


@pytest.mark.parametrize("arch, width, n, names", [
    ("resnet32", 4, 3, ["layer1", "64", "--subnets 3"]),
    ("resnet50", 1, 128, ["stem", "64"]),
    ("resnet20", 1, 32, ["layer1", "16"]),
])
def test_impossible_split_names_layer_and_width(arch, width, n, names):
    with pytest.raises(UsageError) as info:
        subnet_spec(ModelSpec(arch, width), n)
    for name in names:
        assert name in str(info.value)


def test_option_a_padding_that_cannot_be_split_is_refused():
    # width 1, N = 16: each sub-net has 1 channel in layer1, option A would pad half a channel
    with pytest.raises(UsageError, match="shortcut"):
        subnet_spec(ModelSpec("resnet20", 1), 16)


@pytest.mark.parametrize("arch", ["resnet21", "vgg16", "resnet"])
def test_unknown_arch(arch):
    with pytest.raises(UsageError, match="--arch"):
        ModelSpec(arch).depth


def test_fractional_channels_refused():
    with pytest.raises(UsageError, match="--width"):
        ModelSpec("resnet20", 1.03).layer_widths()


# A narrow net's strided 1x1 convolutions (shortcut B, bottleneck downsamples), channels-last
# on CPU: oneDNN's own kernel for them writes out of bounds in the weight gradient when a group
# has fewer input channels than its vector block (a crash, a hang or wrong gradients; oneDNN
# issue 6035). The child process trains such nets and compares their gradients with NCHW's.
STRIDED_POINTWISE_CHILD = r"""
import sys, torch
from dd_mpi.decompose import subnet_spec
from dd_mpi.models import ModelSpec, build_model
torch.set_num_threads(int(sys.argv[1]))
for spec in (subnet_spec(ModelSpec("resnet32", 1.0, 10, "B"), 4),   # the paper's split: 4 -> 8 channels
             subnet_spec(ModelSpec("resnet50", 0.25, 10), 2)):       # bottleneck downsamples
    torch.manual_seed(0)  # eval mode: fp32 rounding is not blown up by batch statistics
    reference = build_model(spec).eval()
    fast = build_model(spec).to(memory_format=torch.channels_last).eval()
    fast.load_state_dict(reference.state_dict())
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(10, (16,))
    for model, x in ((reference, images), (fast, images.contiguous(memory_format=torch.channels_last))):
        for _ in range(3):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), labels).backward()
    for (name, a), b in zip(reference.named_parameters(), fast.parameters()):
        assert (a.grad - b.grad).norm() <= 1e-4 * a.grad.norm(), name
print("same gradients")
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_strided_pointwise_convolutions_train_in_channels_last_on_cpu(threads):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", STRIDED_POINTWISE_CHILD, str(threads)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "same gradients" in result.stdout, (result.returncode, result.stderr[-2000:])


def test_a_strided_pointwise_convolution_is_the_same_function():
    from dd_mpi.models import PointwiseStridedConv, conv
    spec = ModelSpec("resnet20", 1.0, 10, "B")
    layer = conv(spec.fused(2), 4, 8, 1, stride=2)
    assert isinstance(layer, PointwiseStridedConv) and layer.stride == (2, 2) and layer.groups == 2
    x = torch.randn(3, 8, 9, 9)
    expected = torch.nn.functional.conv2d(x, layer.weight, None, 2, 0, 1, 2)
    assert torch.allclose(layer(x), expected, atol=1e-6) and layer(x).shape == (3, 16, 5, 5)
    if torch.cuda.is_available():  # there cuDNN's own strided kernel runs (TF32: ~1e-3 relative)
        on_gpu = layer.cuda()(x.cuda()).cpu()
        assert (on_gpu - expected).norm() <= 1e-2 * expected.norm() and on_gpu.shape == expected.shape
    assert type(conv(spec, 4, 8, 3, stride=2, padding=1)) is torch.nn.Conv2d
