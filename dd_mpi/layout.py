"""Which ranks train which nets: the layout of one level of the method, a pure function.

M nets on P ranks form G groups, G dividing both M and P: group g is P/G contiguous ranks
(so a group sits on as few nodes as possible) that train nets g*k .. g*k+k-1 (k = M/G),
fused into one grouped-convolution net, data-parallel inside the group. G = M is the
classic layout (one net per group, P/M ranks each); G = P puts k whole nets on every rank
and needs no gradient traffic at all. The default G = gcd(M, P) is the largest possible: the
fewest ranks that must talk, and every net's batch on one rank whenever P <= M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class Layout:
    world_size: int  # P
    nets: int  # M
    groups: int  # G: divides P and M

    @property
    def ranks_per_group(self) -> int:
        return self.world_size // self.groups

    @property
    def nets_per_group(self) -> int:
        return self.nets // self.groups

    def ranks(self, group: int) -> list[int]:
        size = self.ranks_per_group
        return list(range(group * size, (group + 1) * size))

    @property
    def rank_lists(self) -> list[list[int]]:
        return [self.ranks(g) for g in range(self.groups)]

    @property
    def leaders(self) -> list[int]:
        return [self.ranks(g)[0] for g in range(self.groups)]

    def group_of_rank(self, rank: int) -> int:
        return rank // self.ranks_per_group

    def nets_of(self, group: int) -> list[int]:
        k = self.nets_per_group
        return list(range(group * k, (group + 1) * k))

    def group_of_net(self, net: int) -> int:
        return net // self.nets_per_group

    def describe(self) -> str:
        k = self.nets_per_group
        return (f"{self.groups} group{'s' * (self.groups > 1)} of {self.ranks_per_group} "
                f"rank{'s' * (self.ranks_per_group > 1)}, {k} net{'s' * (k > 1)} each"
                + (" (fused)" if k > 1 else ""))


def choose_groups(world_size: int, nets: int, forced: int | None = None) -> int:
    """G for ``nets`` nets on ``world_size`` ranks: ``forced`` (--groups) if it divides both,
    else the largest that does (see the module docstring)."""
    if forced is None:
        return math.gcd(world_size, nets)
    if nets % forced or world_size % forced:
        common = [g for g in range(1, math.gcd(world_size, nets) + 1) if math.gcd(world_size, nets) % g == 0]
        raise UsageError(f"--groups {forced} does not divide both the {nets} sub-networks and the "
                         f"{world_size} ranks: choose one of {', '.join(map(str, common))} (or leave it out)")
    return forced


def layout_for(world_size: int, nets: int, forced_groups: int | None = None) -> Layout:
    return Layout(world_size, nets, choose_groups(world_size, nets, forced_groups))
