"""Model surgery: split a wide net's configuration into N narrow ones, compose, extract, and
fuse k nets into one grouped-convolution net (and back).

Pure functions on specs and state dicts: no processes, no communication.

Composition rule, per tensor of the global net G from the N sub-nets S_1..S_N:

=============================  ==============================================================
stem conv (sees the image)     concatenate along output channels
every other conv               block-diagonal over (out, in) channel blocks; off-diagonal 0
BatchNorm weight/bias/stats    concatenate
classifier ``y = W h + b``     ``W = [W_1 ... W_N] / N``, ``b = mean(b_k)``
=============================  ==============================================================

G then computes exactly the mean of the sub-nets' logits, in eval and in train mode, because
every operation between the stem and the classifier acts per channel or per channel block
(option A shortcuts pad per channel group: see ``models.GroupedZeroPadShortcut``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .errors import UsageError
from .models import CLASSIFIER_MODULE, STEM_MODULE, ModelSpec, build_model

StateDict = Mapping[str, torch.Tensor]


class Rule(enum.Enum):
    """How one tensor of the global net is made from the sub-nets' tensors."""

    CONCAT = "concatenate along dim 0"  # stem conv, BN parameters and statistics
    BLOCK_DIAGONAL = "block-diagonal over (out, in)"  # every conv between feature maps
    CLASSIFIER_WEIGHT = "concatenate along dim 1, divide by N"
    CLASSIFIER_BIAS = "mean"
    COUNTER = "max"  # BN's num_batches_tracked: a step counter, not a feature


def subnet_spec(global_spec: ModelSpec, subnets: int) -> ModelSpec:
    """The configuration of each of ``subnets`` sub-nets of ``global_spec`` (same depth, w/N).
    (``subnets`` >= 1 is the config's to check, once.)"""
    for layer, channels in global_spec.layer_widths().items():
        if channels % subnets:
            raise UsageError(
                f"--subnets {subnets} does not divide {layer} of {global_spec.arch} at --width "
                f"{global_spec.width:g} ({channels} channels): choose --subnets dividing {channels}")
    spec = global_spec.with_width(global_spec.width / subnets, max(1, global_spec.channel_groups // subnets))
    try:
        build_model_check(spec)
    except UsageError as error:  # the sub-net's own message, which cannot know the flag
        raise UsageError(f"--subnets {subnets} (each sub-net at width {spec.width:g}, --width "
                         f"{global_spec.width:g} / {subnets}): {error}") from None
    return spec


def composed_spec(sub_spec: ModelSpec, subnets: int) -> ModelSpec:
    """The global net composed of ``subnets`` copies of ``sub_spec`` (option A pads per sub-net)."""
    return sub_spec.with_width(sub_spec.width * subnets, sub_spec.channel_groups * subnets)


def build_model_check(spec: ModelSpec) -> None:
    """Raise the model's own UsageError (e.g. an option A shortcut that can't be padded) now."""
    try:
        with torch.device("meta"):
            build_model(spec)
    except RuntimeError as error:  # --width 1e9: "Storage size calculation overflowed"
        raise UsageError(f"width {spec.width:g} makes {spec.arch} too large to build ({error}): choose a "
                         "smaller --width") from None


def composition_rules(spec: ModelSpec) -> dict[str, Rule]:
    """The rule for every state-dict entry of a net of this architecture."""
    with torch.device("meta"):
        model = build_model(spec)
    rules: dict[str, Rule] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Conv2d):
            rules[prefix + "weight"] = Rule.CONCAT if name == STEM_MODULE else Rule.BLOCK_DIAGONAL
            if module.bias is not None:
                rules[prefix + "bias"] = Rule.CONCAT
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            for key in ("weight", "bias", "running_mean", "running_var"):
                rules[prefix + key] = Rule.CONCAT
            rules[prefix + "num_batches_tracked"] = Rule.COUNTER
        elif isinstance(module, nn.Linear):
            if name != CLASSIFIER_MODULE:
                raise NotImplementedError(f"no composition rule for linear layer {name}")
            rules[prefix + "weight"] = Rule.CLASSIFIER_WEIGHT
            rules[prefix + "bias"] = Rule.CLASSIFIER_BIAS
    return rules


def compose(sub_states: Sequence[StateDict], sub_spec: ModelSpec, *,
            offdiagonal_std: float = 0.0, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Global-net weights from the N sub-nets' weights (the table in the module docstring).

    ``offdiagonal_std`` > 0 starts the off-diagonal conv blocks at N(0, std²) noise instead
    of 0: the composed net then no longer equals the mean of the sub-nets exactly.
    """
    n = len(sub_states)
    if n < 1:
        raise ValueError("compose needs at least one sub-network")
    rules = composition_rules(sub_spec)
    for k, state in enumerate(sub_states):
        if set(state) != set(rules):
            missing, extra = sorted(set(rules) - set(state)), sorted(set(state) - set(rules))
            raise ValueError(f"sub-network {k} does not match {sub_spec.arch}: "
                             f"missing {missing[:3]}, unexpected {extra[:3]}")
    composed = {}
    for key, rule in rules.items():
        parts = [state[key] for state in sub_states]
        if rule is Rule.CONCAT:
            composed[key] = torch.cat(parts, dim=0)
        elif rule is Rule.BLOCK_DIAGONAL:
            composed[key] = _block_diagonal(parts, offdiagonal_std, generator)
        elif rule is Rule.CLASSIFIER_WEIGHT:
            composed[key] = torch.cat(parts, dim=1) / n
        elif rule is Rule.CLASSIFIER_BIAS:
            composed[key] = torch.stack(parts).mean(dim=0)
        else:
            composed[key] = torch.stack(parts).max()
    return composed


def _block_diagonal(blocks: Sequence[torch.Tensor], offdiagonal_std: float,
                    generator: torch.Generator | None) -> torch.Tensor:
    out_sizes = [b.shape[0] for b in blocks]
    in_sizes = [b.shape[1] for b in blocks]
    shape = (sum(out_sizes), sum(in_sizes), *blocks[0].shape[2:])
    first = blocks[0]
    if offdiagonal_std > 0:
        weight = torch.randn(shape, generator=generator, dtype=first.dtype).to(first.device)
        weight.mul_(offdiagonal_std)
    else:
        weight = first.new_zeros(shape)
    row = col = 0
    for block in blocks:
        weight[row:row + block.shape[0], col:col + block.shape[1]] = block
        row, col = row + block.shape[0], col + block.shape[1]
    return weight


def extract(global_state: StateDict, k: int, subnets: int, sub_spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Sub-net k's weights from a global net's diagonal blocks: the inverse of ``compose``.

    Exact for every tensor but the classifier bias, of which composition keeps only the
    mean: sub-net k gets that mean.
    """
    if not 0 <= k < subnets:
        raise ValueError(f"sub-network index {k} is outside 0..{subnets - 1}")
    sub: dict[str, torch.Tensor] = {}
    for key, rule in composition_rules(sub_spec).items():
        tensor = global_state[key]
        if rule is Rule.CONCAT:
            size = tensor.shape[0] // subnets
            sub[key] = tensor[k * size:(k + 1) * size].clone()
        elif rule is Rule.BLOCK_DIAGONAL:
            rows, cols = tensor.shape[0] // subnets, tensor.shape[1] // subnets
            sub[key] = tensor[k * rows:(k + 1) * rows, k * cols:(k + 1) * cols].clone()
        elif rule is Rule.CLASSIFIER_WEIGHT:
            cols = tensor.shape[1] // subnets
            sub[key] = tensor[:, k * cols:(k + 1) * cols] * subnets
        else:
            sub[key] = tensor.clone()
    return sub


def fuse_states(states: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """k nets' weights -> the weights of the fused net of k members (``models``: every tensor
    is the members' tensors concatenated along dim 0; BN's step counter is one for all)."""
    return {key: torch.stack([s[key] for s in states]).max() if states[0][key].ndim == 0
            else torch.cat([s[key] for s in states], dim=0)
            for key in states[0]}


def unfuse_state(state: StateDict, members: int) -> list[dict[str, torch.Tensor]]:
    """The inverse of ``fuse_states``: each member's own weights (copies)."""
    return [{key: t.clone() if t.ndim == 0 else t.chunk(members, dim=0)[j].clone()
             for key, t in state.items()}
            for j in range(members)]
