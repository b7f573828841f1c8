"""Composition is exact: the composed net's logits are the mean of the sub-nets' logits."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dd_mpi.decompose import Rule, composition_rules, compose, composed_spec, extract, subnet_spec
from dd_mpi.inspection import random_subnet, verify_composition
from dd_mpi.models import ModelSpec, build_model

CASES = [(arch, width, n, shortcut, classes)
         for arch, width, ns in [("resnet20", 2, (1, 2, 4, 8)), ("resnet32", 4, (1, 2, 4, 8)),
                                 ("resnet44", 2, (2,)), ("resnet56", 4, (4,)), ("resnet110", 4, (4,))]
         for n in ns for shortcut in ("A", "B") for classes in (10, 100)]


@pytest.mark.parametrize("arch, width, n, shortcut, classes", CASES)
def test_cifar_composition_is_exact(arch, width, n, shortcut, classes):
    errors = verify_composition(ModelSpec(arch, width, classes, shortcut), n, image_size=16, batch=3)
    assert errors["max_rel_err_eval"] < 1e-5 and errors["max_rel_err_train"] < 1e-5, errors


@pytest.mark.parametrize("arch, n, classes", [("resnet50", 1, 10), ("resnet50", 2, 100), ("resnet50", 4, 10),
                                             ("resnet50", 8, 100), ("resnet101", 4, 10), ("resnet101", 8, 100)])
def test_bottleneck_composition_is_exact(arch, n, classes):
    errors = verify_composition(ModelSpec(arch, 1, classes), n, image_size=32, batch=2)
    assert errors["max_rel_err_eval"] < 1e-5 and errors["max_rel_err_train"] < 1e-5, errors


def test_verification_detects_a_broken_composition(monkeypatch):
    """The check can fail: shuffle one block of the composed weights and it must notice."""
    import dd_mpi.inspection as inspect_module
    real_compose = inspect_module.compose

    def broken(states, spec, **kw):
        out = real_compose(states, spec, **kw)
        key = next(k for k, r in composition_rules(spec).items() if r is Rule.BLOCK_DIAGONAL)
        out[key] = out[key].roll(1, dims=1)
        return out

    monkeypatch.setattr(inspect_module, "compose", broken)
    errors = verify_composition(ModelSpec("resnet20", 2), 2, image_size=16)
    assert errors["max_rel_err_eval"] > 1e-3


def test_global_net_without_grouped_padding_is_not_exact():
    """Option A must pad per channel group: the conventional padding breaks exactness."""
    sub = subnet_spec(ModelSpec("resnet20", 2), 2)
    subs = [random_subnet(sub, k, 16) for k in range(2)]
    plain = build_model(composed_spec(sub, 2).with_width(2, 1)).eval()
    plain.load_state_dict(compose([m.state_dict() for m in subs], sub))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        mean = torch.stack([m.eval()(x) for m in subs]).mean(0)
        assert (plain(x) - mean).abs().max() > 1e-3


@pytest.mark.parametrize("arch, width, n", [("resnet20", 2, 4), ("resnet50", 1, 2), ("resnet32", 4, 8)])
def test_extract_inverts_compose(arch, width, n):
    sub_spec = subnet_spec(ModelSpec(arch, width), n)
    states = [random_subnet(sub_spec, k, 16).state_dict() for k in range(n)]
    composed = compose(states, sub_spec)
    mean_bias = torch.stack([s["fc.bias"] for s in states]).mean(0)
    for k in range(n):
        got = extract(composed, k, n, sub_spec)
        assert set(got) == set(states[k])
        for key, value in states[k].items():
            if key == "fc.bias":  # composition keeps only the mean of the biases
                assert torch.allclose(got[key], mean_bias)
            elif key.endswith("num_batches_tracked"):
                assert got[key] == max(s[key] for s in states)
            else:
                assert torch.allclose(got[key], value, atol=1e-7), key


def test_offdiagonal_blocks_are_zero_by_default_and_noise_on_request():
    sub_spec = subnet_spec(ModelSpec("resnet20", 2), 2)
    states = [build_model(sub_spec).state_dict() for _ in range(2)]
    key = "layer1.0.conv1.weight"
    zero = compose(states, sub_spec)[key]
    noisy = compose(states, sub_spec, offdiagonal_std=0.01, generator=torch.Generator().manual_seed(0))[key]
    half = zero.shape[0] // 2
    assert torch.count_nonzero(zero[:half, half:]) == 0 and torch.count_nonzero(zero[half:, :half]) == 0
    assert 0.005 < noisy[:half, half:].std() < 0.02
    assert torch.equal(noisy[:half, :half], zero[:half, :half])


@settings(max_examples=12, deadline=None)
@given(n=st.sampled_from([1, 2, 4]), classes=st.integers(1, 30), seed=st.integers(0, 10_000),
       shortcut=st.sampled_from(["A", "B"]))
def test_property_composed_logits_equal_mean(n, classes, seed, shortcut):
    errors = verify_composition(ModelSpec("resnet20", 2, classes, shortcut), n, image_size=8, batch=2, seed=seed)
    assert errors["max_abs_err_eval"] < 1e-4 and errors["max_abs_err_train"] < 1e-4


def test_compose_rejects_mismatched_subnets():
    sub_spec = subnet_spec(ModelSpec("resnet20", 2), 2)
    good = build_model(sub_spec).state_dict()
    bad = dict(good)
    bad.pop("fc.bias")
    with pytest.raises(ValueError, match="sub-network 1"):
        compose([good, bad], sub_spec)
