"""Guidance parallelism: the 2 or 3 guidance passes of a step run on different ranks at once.

Pass i of the plan runs on rank i % world of the guidance group. Every rank then gathers all pass
outputs (fp32, unchanged bytes) and combines them itself, in plan order, with the same
`guidance.combine` a single process uses, so every rank holds the same guided velocity and steps
its own copy of the latents identically: no broadcast of latents is ever needed.

Combined with sequence parallelism the ranks form a grid (`parallel_layout`): a sequence group
shares one forward, a guidance group holds one rank of every sequence group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .guidance import PassSpec
from .sequence_parallel import RankGroup, SequenceParallel

RunPass = Callable[[PassSpec], torch.Tensor]


@dataclass(frozen=True)
class GuidanceParallel(RankGroup):
    """The ranks sharing one step's passes (group None: the default group)."""

    def owner(self, index: int) -> int:
        return index % self.world

    def mine(self, plan: Sequence[PassSpec]) -> list[int]:
        return [i for i in range(len(plan)) if self.owner(i) == self.rank]

    def __call__(self, plan: Sequence[PassSpec], run_pass: RunPass,
                 like: torch.Tensor) -> list[torch.Tensor]:
        """Run this rank's passes and return every pass's output (fp32, plan order) on every
        rank. `like` has the outputs' shape and device (the latents): a rank with no pass of its
        own still contributes a buffer of the right size to the gather."""
        slots = math.ceil(len(plan) / self.world)
        buf = torch.zeros((slots, *like.shape), dtype=torch.float32, device=like.device)
        for slot, i in enumerate(self.mine(plan)):
            out = run_pass(plan[i])
            if out.shape != like.shape:
                raise ValueError(f"pass {plan[i].name} returned {tuple(out.shape)}, "
                                 f"expected {tuple(like.shape)}")
            buf[slot] = out.float()
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf, group=self.group)
        return [parts[self.owner(i)][i // self.world] for i in range(len(plan))]


def parallel_layout(sequence_degree: int) -> tuple[SequenceParallel, GuidanceParallel]:
    """Split the default group's ranks into a grid: rank = g * sequence_degree + s shares its
    forward with ranks g * sequence_degree .. + sequence_degree - 1 and its passes with ranks
    s, s + sequence_degree, ... Every rank must call this (new_group is collective)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if sequence_degree < 1 or world % sequence_degree:
        raise ValueError(f"sequence degree {sequence_degree} must divide the world size {world}")
    guidance_degree = world // sequence_degree
    seq_groups = [dist.new_group(list(range(g * sequence_degree, (g + 1) * sequence_degree)))
                  for g in range(guidance_degree)]
    guid_groups = [dist.new_group(list(range(s, world, sequence_degree)))
                   for s in range(sequence_degree)]
    g, s = divmod(rank, sequence_degree)
    return (SequenceParallel(seq_groups[g], s, sequence_degree),
            GuidanceParallel(guid_groups[s], g, guidance_degree))
