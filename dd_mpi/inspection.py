"""dd-inspect: sizes and FLOPs of a global net and its sub-nets, and a check of exact composition.

    dd-inspect --preset cifar10-resnet32                        # the paper's ResNet32 split into 4
    dd-inspect --arch resnet32 --width 4 --subnets 4 --verify   # + composed logits == mean
    dd-inspect --arch resnet50 --subnets 8 --verify --json      # one JSON object

(Named ``inspection``, not ``inspect``, so as not to shadow the standard library's module.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from torch import nn

from .argtypes import OneLineParser, add_version
from .decompose import compose, composed_spec, subnet_spec
from .errors import EXIT_FAILURE, EXIT_USAGE, UsageError
from .models import ModelSpec, build_model, count_flops, count_parameters
from .presets import PRESETS

RELATIVE_TOLERANCE = 1e-4
CLASSES = {"synthetic": 10, "cifar10": 10, "cifar100": 100, "food101": 101}


def model_sizes(spec: ModelSpec, image_size: int) -> tuple[int, int]:
    with torch.device("meta"):
        model = build_model(spec)
    return count_parameters(model), count_flops(model, image_size, spec.in_channels)


def random_subnet(spec: ModelSpec, seed: int, image_size: int) -> nn.Module:
    """A sub-net with random weights and random but realistic BN statistics.

    Statistics drawn at random ignore the activations they normalise, and through 100+ layers
    they blow logits up to 1e11 (where float32 rounding alone is 1e4). So we randomise the BN
    affine parameters, then let the statistics come from a few training-mode passes over
    random images with cumulative averaging: random, and matched to the net.
    """
    torch.manual_seed(seed)
    model = build_model(spec)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, 0.0, 0.2)
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration passes
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, spec.in_channels, image_size, image_size))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return model


def verify_composition(global_spec: ModelSpec, subnets: int, image_size: int,
                       batch: int = 4, seed: int = 0) -> dict[str, float]:
    """Max |composed logits - mean of the sub-nets' logits|, in eval and in train mode."""
    sub_spec = subnet_spec(global_spec, subnets)
    subs = [random_subnet(sub_spec, seed + k, image_size) for k in range(subnets)]
    composed = build_model(composed_spec(sub_spec, subnets))
    composed.load_state_dict(compose([m.state_dict() for m in subs], sub_spec))
    images = torch.randn(batch, global_spec.in_channels, image_size, image_size,
                         generator=torch.Generator().manual_seed(seed))
    result = {}
    for mode in ("eval", "train"):
        for model in (*subs, composed):
            model.train(mode == "train")
        with torch.no_grad():
            mean_logits = torch.stack([m(images) for m in subs]).mean(dim=0)
            error = (composed(images) - mean_logits).abs().max().item()
        result[f"max_abs_err_{mode}"] = error
        result[f"max_rel_err_{mode}"] = error / max(mean_logits.abs().max().item(), 1e-12)
    return result


def inspect(global_spec: ModelSpec, subnets: int, image_size: int) -> dict:
    sub_spec = subnet_spec(global_spec, subnets)
    global_params, global_flops = model_sizes(global_spec, image_size)
    sub_params, sub_flops = model_sizes(sub_spec, image_size)
    return {
        "arch": global_spec.arch, "width": global_spec.width, "subnets": subnets,
        "num_classes": global_spec.num_classes, "shortcut": global_spec.shortcut,
        "image_size": image_size,
        "global_widths": global_spec.layer_widths(), "subnet_widths": sub_spec.layer_widths(),
        "global_params": global_params, "subnet_params": [sub_params] * subnets,
        "global_flops": global_flops, "subnet_flops": [sub_flops] * subnets,
        "params_ratio": global_params / sub_params, "flops_ratio": global_flops / sub_flops,
    }


def format_table(info: dict) -> str:
    widths = lambda d: "-".join(str(c) for c in d.values())  # noqa: E731
    rows = [("global", widths(info["global_widths"]), info["global_params"], info["global_flops"])]
    rows += [(f"sub_net_{k}", widths(info["subnet_widths"]), p, f)
             for k, (p, f) in enumerate(zip(info["subnet_params"], info["subnet_flops"]))]
    lines = [f"{info['arch']} width {info['width']:g}, {info['subnets']} sub-networks, "
             f"{info['num_classes']} classes, {info['image_size']}px input",
             f"{'net':<10} {'channels':<22} {'parameters':>14} {'MACs/image':>16}"]
    lines += [f"{name:<10} {chan:<22} {p:>14,} {f:>16,}" for name, chan, p, f in rows]
    lines.append(f"global / sub-net: parameters {info['params_ratio']:.2f}x, "
                 f"FLOPs {info['flops_ratio']:.2f}x (N² = {info['subnets'] ** 2})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="dd-inspect", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version(parser)
    parser.add_argument("--preset", help="a dd-train preset: its net, width, shortcut, N and classes "
                                         "(the flags below override)")
    parser.add_argument("--arch", default=None, help="resnet20/32/44/56/110 (6n+2), resnet50, resnet101, "
                                                      "resnet152 (default resnet32)")
    parser.add_argument("--width", type=float, default=None,
                        help="width factor of the global net (default 1: the paper's standard nets)")
    parser.add_argument("--subnets", type=int, default=None, help="number of sub-networks N (default 4)")
    parser.add_argument("--num-classes", type=int, default=None, help="classes (default 10)")
    parser.add_argument("--shortcut", choices=("A", "B"), default=None, help="CIFAR shortcut option (default A)")
    parser.add_argument("--image-size", type=int, default=None, help="default 32 (CIFAR nets), 224 (bottleneck)")
    parser.add_argument("--verify", action="store_true", help="check composed logits == mean of sub-nets' logits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        defaults = dict(arch="resnet32", width=1.0, subnets=4, num_classes=10, shortcut="A")
        if args.preset is not None:
            if args.preset not in PRESETS:
                raise UsageError(f"--preset {args.preset!r} is unknown: choose one of {', '.join(PRESETS)}")
            preset = PRESETS[args.preset]
            defaults.update({k: preset[k] for k in ("arch", "width", "subnets", "shortcut") if k in preset})
            defaults["num_classes"] = CLASSES[preset["dataset"]]
        given = {k: getattr(args, k) for k in defaults if getattr(args, k) is not None}
        chosen = {**defaults, **given}
        if chosen["num_classes"] < 1:
            raise UsageError(f"--num-classes {chosen['num_classes']} is invalid: use 1 or more")
        if chosen["subnets"] < 1:
            raise UsageError(f"--subnets {chosen['subnets']} is invalid: use 1 or more sub-networks")
        if not (chosen["width"] > 0 and math.isfinite(chosen["width"])):
            raise UsageError(f"--width {chosen['width']} is invalid: use a number above 0 (1: the standard net)")
        if args.image_size is not None and args.image_size < 1:
            raise UsageError(f"--image-size {args.image_size} is invalid: use 1 or more pixels (or leave it out)")
        if not 0 <= args.seed < 2 ** 63:  # (torch.manual_seed takes below 2**64, and the sub-nets seed + k)
            raise UsageError(f"--seed {args.seed} is out of range: use one from 0 to 2**63 - 1")
        spec = ModelSpec(chosen["arch"], chosen["width"], chosen["num_classes"], chosen["shortcut"])
        spec.depth  # an unknown --arch: its UsageError now
        image_size = args.image_size or spec.default_image_size
        info = inspect(spec, chosen["subnets"], image_size)
        if args.verify:
            info.update(verify_composition(spec, chosen["subnets"], image_size, seed=args.seed))
    except UsageError as error:
        print(f"dd-inspect: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(info))
    else:
        print(format_table(info))
        if args.verify:
            print(f"composed vs mean of sub-nets' logits: max abs error "
                  f"eval {info['max_abs_err_eval']:.2e}, train {info['max_abs_err_train']:.2e} "
                  f"(relative {info['max_rel_err_eval']:.1e}, {info['max_rel_err_train']:.1e})")
    if args.verify and max(info["max_rel_err_eval"], info["max_rel_err_train"]) > RELATIVE_TOLERANCE:
        print(f"dd-inspect: composition is NOT exact (relative error above {RELATIVE_TOLERANCE})",
              file=sys.stderr)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
