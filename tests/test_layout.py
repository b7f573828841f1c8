"""The plan of a run, as pure functions: layouts of nets on ranks, levels, fused nets, and
composition in stages (no processes)."""

from __future__ import annotations

import pytest
import torch

from dd_mpi.config import parse_config
from dd_mpi.decompose import compose, composed_spec, fuse_states, subnet_spec, unfuse_state
from dd_mpi.errors import UsageError
from dd_mpi.inspection import random_subnet
from dd_mpi.layout import Layout, choose_groups, layout_for
from dd_mpi.models import ModelSpec, build_model
from dd_mpi.plan import build_plan, comm_partitions, level_layouts, pools
from dd_mpi.train import member_losses


# --- layouts: any N on any P -------------------------------------------------------------
@pytest.mark.parametrize("ranks, nets, groups, per_rank", [
    (4, 4, 4, 1), (8, 4, 4, 1), (2, 4, 2, 2), (1, 4, 1, 4), (4, 16, 4, 4), (6, 4, 2, 2), (4, 3, 1, 3), (4, 1, 1, 1)])
def test_the_default_layout_is_the_largest_common_group_count(ranks, nets, groups, per_rank):
    layout = layout_for(ranks, nets)
    assert (layout.groups, layout.nets_per_group) == (groups, per_rank)
    assert sorted(r for g in range(layout.groups) for r in layout.ranks(g)) == list(range(ranks))
    assert sorted(j for g in range(layout.groups) for j in layout.nets_of(g)) == list(range(nets))
    for g in range(layout.groups):  # contiguous blocks, each net in the group of its ranks
        assert layout.ranks(g) == list(range(g * ranks // groups, (g + 1) * ranks // groups))
        assert all(layout.group_of_net(j) == g for j in layout.nets_of(g))
        assert all(layout.group_of_rank(r) == g for r in layout.ranks(g))


def test_a_forced_group_count_must_divide_both():
    assert choose_groups(8, 4, forced=2) == 2 and choose_groups(8, 4, forced=1) == 1
    with pytest.raises(UsageError) as error:
        choose_groups(4, 4, forced=3)
    assert str(error.value) == ("--groups 3 does not divide both the 4 sub-networks and the 4 ranks: "
                                "choose one of 1, 2, 4 (or leave it out)")


# --- the plan of levels --------------------------------------------------------------------
def test_levels_compose_in_stages_with_per_group_padding_and_names():
    cfg = parse_config(["--arch", "resnet20", "--width", "4", "--subnets", "16", "--levels", "16,4,1"])
    plan = build_plan(cfg, level_layouts(cfg, 4), 4, 10)
    widths = [(lv.nets, lv.spec.width, lv.spec.channel_groups, lv.layout.nets_per_group) for lv in plan.levels]
    assert widths == [(16, 0.25, 1, 4), (4, 1.0, 4, 1), (1, 4.0, 16, 1)]
    assert [lv.phase for lv in plan.levels] == ["subnet", "level1", "finetune"]
    assert [lv.lr_flag for lv in plan.levels] == ["--subnet-lr", "--level-lr", "--finetune-lr"]
    first, middle, last = plan.levels
    assert first.group_name([4, 5, 6, 7]) == "subnet4-7" and first.net_name(5) == "subnet5"
    assert middle.group_name([2]) == "level1-net2" and last.net_name(0) == "finetune"
    for level, sets in ((first, ([5], [4, 5, 6, 7], [0, 3], [1, 2, 9])), (middle, ([2], [0, 1]))):
        assert all(level.nets_named(level.group_name(nets)) == nets for nets in sets)  # the names' inverse
    assert first.nets_named("level1-net0-1") is None and middle.nets_named("subnet0-3") is None
    assert first.nets_named("subnet-x") is None and last.nets_named("finetune") is None
    assert len({lv.stream(j) for lv in plan.levels for j in range(lv.nets)}) == 21  # every net its own data
    # the last level's net is exactly the net composed from the sub-nets in one step
    assert last.spec == composed_spec(subnet_spec(plan.global_spec, 16), 16)
    two = parse_config(["--subnets", "2"])
    assert build_plan(two, level_layouts(two, 4), 4, 10).levels[1].phase == "finetune"  # default: N,1


def test_every_net_of_every_level_and_the_baseline_draws_its_own_data_stream():
    """Sub-net j once drew stream 100 + j: from 100 sub-nets on, sub-net 100 drew the
    fine-tune's data and sub-net 200 the baseline's."""
    cfg = parse_config(["--arch", "resnet20", "--width", "16", "--shortcut", "B", "--subnets", "256",
                        "--levels", "256,2,1", "--strategy", "both"])
    plan = build_plan(cfg, level_layouts(cfg, 4), 4, 10)
    streams = [lv.stream(j) for lv in (*plan.levels, plan.baseline) for j in range(lv.nets)]
    assert len(set(streams)) == len(streams) == 256 + 2 + 1 + 1
    assert [plan.levels[0].stream(j) for j in (0, 99)] == [100, 199]  # unchanged where they fit
    assert (plan.levels[-1].stream(0), plan.baseline.stream(0)) == (200, 300)


@pytest.mark.parametrize("levels, message", [
    ("16,4", "the last 1"), ("16,5,1", "each count must divide the one before"), ("8,4,1", "starts at 8 nets"),
    ("16,16,1", "each count must divide"), ("x", "give nets per level"),
    ("16,0,1", "each level has 1 net or more")])  # (said "the last 1", which it is)
def test_bad_levels_are_one_line(levels, message):
    with pytest.raises(UsageError) as error:
        parse_config(["--width", "4", "--subnets", "16", "--levels", levels])
    assert message in str(error.value) and f"--levels {levels}" in str(error.value)


def test_levels_spelt_out_as_the_default_are_the_default():
    """--levels N,1 is what --subnets N means without --levels, --subnets 1 included."""
    for subnets in (1, 4):
        spelt = parse_config(["--subnets", str(subnets), "--levels", f"{subnets},1"])
        assert spelt.level_counts == parse_config(["--subnets", str(subnets)]).level_counts == [subnets, 1]
    with pytest.raises(UsageError, match="each count must divide"):
        parse_config(["--subnets", "1", "--levels", "1,1,1"])


def test_the_horovod_sets_follow_the_plan():
    """Each level's groups, and before each composition its leaders; nothing for one group."""
    cfg = parse_config(["--width", "4", "--subnets", "16", "--levels", "16,4,1"])
    assert comm_partitions(cfg, level_layouts(cfg, 8)) == [[[r] for r in range(8)], [list(range(8))],  # 2 sub-nets per rank
                                       [[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 2, 4, 6]], [list(range(8))]]
    alone = parse_config(["--subnets", "2", "--only-group", "1"])
    assert comm_partitions(alone, level_layouts(alone, 4)) == []
    # an array task (one rank, one sub-net) takes the final run's --groups, which it does not use
    task = parse_config(["--subnets", "4", "--groups", "4", "--only-group", "1"])
    assert level_layouts(task, 1)[0] == Layout(1, 1, 1)


def test_global_batch_is_divided_over_each_nets_ranks_or_refused():
    cfg = parse_config(["--subnets", "2", "--global-batch-size", "128", "--strategy", "both"])
    plan = build_plan(cfg, level_layouts(cfg, 4), 4, 10)
    assert [lv.batch_size for lv in plan.levels] == [64, 32] and plan.baseline.batch_size == 32
    with pytest.raises(UsageError, match="--global-batch-size 128 is not divisible by the 3 ranks"):
        build_plan(cfg, level_layouts(cfg, 3), 3, 10)
    # phase 1's own batch per rank wins over a preset's global batch, in phase 1 only
    own = parse_config(["--preset", "cifar10-resnet32", "--subnet-batch-size", "512"])
    plan = build_plan(own, level_layouts(own, 4), 4, 10)
    assert [lv.batch_size for lv in plan.levels] == [512, 32]


def test_shards_of_a_composed_net_are_its_sub_nets_shards():
    cfg = parse_config(["--width", "4", "--subnets", "16", "--levels", "16,4,1", "--subnet-data", "shard"])
    plan = build_plan(cfg, level_layouts(cfg, 4), 4, 10)
    subs, middle, top = (pools(lv, plan, 1000, cfg) for lv in plan.levels)
    assert sorted(torch.cat(subs).tolist()) == list(range(1000))  # a partition
    for j, union in enumerate(middle):
        assert torch.equal(union, torch.cat(subs[4 * j:4 * j + 4]).sort().values)
    assert torch.equal(top[0], torch.arange(1000))


# --- fused nets: k nets as one, exactly --------------------------------------------------
@pytest.mark.parametrize("arch, shortcut", [("resnet20", "A"), ("resnet32", "B"), ("resnet50", "B")])
def test_a_fused_net_computes_each_members_logits_and_gradients(arch, shortcut):
    """In float64 the fused net's logits, gradients and a momentum SGD step are exactly
    (to rounding) those of k separate nets: fusion changes the kernels, not the math."""
    torch.set_default_dtype(torch.float64)
    try:
        spec, k = ModelSpec(arch, 0.25 if arch != "resnet50" else 0.125, 10, shortcut), 3
        size = 32 if arch != "resnet50" else 64
        nets = [random_subnet(spec, seed, size) for seed in range(k)]
        fused = build_model(spec.fused(k))
        fused.load_state_dict(fuse_states([n.state_dict() for n in nets]))
        for net in (*nets, fused):
            net.train()
        images = [torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(j)) for j in range(k)]
        labels = [torch.randint(10, (4,), generator=torch.Generator().manual_seed(9 + j)) for j in range(k)]
        logits = fused(torch.cat(images, dim=1))
        separate = [n(x) for n, x in zip(nets, images)]
        assert logits.shape == (4, k, 10) and torch.allclose(logits, torch.stack(separate, dim=1), rtol=1e-9, atol=1e-9)
        criterion = torch.nn.CrossEntropyLoss(reduction="none")
        member_losses(logits, torch.stack(labels, dim=1), criterion).sum().backward()
        for out, y in zip(separate, labels):
            criterion(out, y).mean().backward()
        grads = unfuse_state({name: p.grad for name, p in fused.named_parameters()}, k)
        for j, n in enumerate(nets):
            for name, p in n.named_parameters():
                assert torch.allclose(grads[j][name], p.grad, rtol=1e-8, atol=1e-10), name
        back = unfuse_state(fused.state_dict(), k)  # BN statistics updated per member too
        for j, n in enumerate(nets):
            assert all(torch.allclose(back[j][key].double(), v.double()) for key, v in n.state_dict().items())
    finally:
        torch.set_default_dtype(torch.float32)


def test_fuse_and_unfuse_are_inverse():
    spec = ModelSpec("resnet20", 0.5, 10)
    states = [random_subnet(spec, seed, 32).state_dict() for seed in range(4)]
    fused = fuse_states(states)
    assert fused.keys() == build_model(spec.fused(4)).state_dict().keys()
    for a, b in zip(states, unfuse_state(fused, 4)):
        assert all(torch.equal(a[key], b[key]) for key in a)


# --- composition in stages is exact at every level -----------------------------------------
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_composing_16_into_4_into_1_is_exact_and_equals_one_step(shortcut):
    """Level by level, every composed net's logits are the mean of its parts', so the global
    net's are the mean of the 16 sub-nets'; and 16 -> 4 -> 1 gives the weights 16 -> 1 gives
    (to rounding: the classifier's bias is a mean of means)."""
    global_spec = ModelSpec("resnet20", 4.0, 10, shortcut)
    sub = subnet_spec(global_spec, 16)
    subs = [random_subnet(sub, seed, 32) for seed in range(16)]
    mid_spec = composed_spec(sub, 4)
    mids = [build_model(mid_spec) for _ in range(4)]
    for j, mid in enumerate(mids):
        mid.load_state_dict(compose([s.state_dict() for s in subs[4 * j:4 * j + 4]], sub))
    top = build_model(composed_spec(mid_spec, 4))
    top.load_state_dict(compose([m.state_dict() for m in mids], mid_spec))
    direct = compose([s.state_dict() for s in subs], sub)
    assert all(torch.allclose(direct[k].double(), v.double(), rtol=1e-6, atol=1e-7) for k, v in top.state_dict().items())
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for mode in (False, True):
        for net in (*subs, *mids, top):
            net.train(mode)
        with torch.no_grad():
            sub_logits = torch.stack([s(images) for s in subs])
            for j, mid in enumerate(mids):
                expected = sub_logits[4 * j:4 * j + 4].mean(0)
                assert torch.allclose(mid(images), expected, atol=1e-4 * expected.abs().max())
            expected = sub_logits.mean(0)
            assert torch.allclose(top(images), expected, atol=1e-4 * expected.abs().max())
