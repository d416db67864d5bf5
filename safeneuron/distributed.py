"""Multi-process identification on accelerate / torch.distributed.

Launch any safeneuron command with ``accelerate launch`` or ``torchrun``: every
process records the statistics of its shard of the prompts, then the per-neuron
count / mean / M2 of all processes are gathered and merged with Chan's parallel
formula in float64, in rank order, so every process holds the same result as a
single process over all prompts (up to float64 rounding).
"""

from __future__ import annotations

import logging
import os

import torch

from safeneuron.activations import ActivationStats, NeuronStats
from safeneuron.data.prompts import PromptSet

logger = logging.getLogger(__name__)

__all__ = ["world", "is_main_process", "shard", "all_merge_stats", "barrier"]


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> tuple[int, int]:
    """(rank, world_size); initialises the process group through accelerate when launched."""
    if not _launched():
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState()  # reads the launcher's environment; gloo on CPU, nccl on GPU
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if _launched():
        import torch.distributed as dist

        dist.barrier()


def shard(ps: PromptSet) -> PromptSet:
    """This process's share of a prompt set (every world_size-th prompt)."""
    rank, size = world()
    if size == 1:
        return ps
    return ps.subset(range(rank, len(ps), size), f"{ps.source}[rank {rank}/{size}]")


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_merge_stats(stats: ActivationStats, groups: list[str], mlps: list[str]) -> ActivationStats:
    """Gather every process's statistics and merge them in rank order (same result on every rank).

    ``groups`` and ``mlps`` must be the same list on every process (a group absent on
    a rank, e.g. a category with no prompt in its shard, counts as empty there).
    """
    rank, size = world()
    if size == 1:
        return stats
    import torch.distributed as dist

    device = _comm_device()
    d_ff = {m: next(per[m].mean.numel() for per in stats.groups.values() if m in per) for m in mlps}
    out = ActivationStats(stats.position)
    for group in groups:
        per = stats.groups.get(group, {})
        for mlp in mlps:
            s = (per.get(mlp) or NeuronStats.empty(d_ff[mlp])).to(device)
            # [count, mean..., m2...] as one float64 vector: counts are exact in float64 up to 2**53.
            count = torch.tensor([float(s.count)], dtype=torch.float64, device=device)
            packed = torch.cat([count, s.mean, s.m2])
            gathered = [torch.empty_like(packed) for _ in range(size)]
            dist.all_gather(gathered, packed)
            merged = NeuronStats.empty(d_ff[mlp])
            for g in gathered:
                g = g.cpu()
                merged = merged.merge(NeuronStats(int(g[0]), g[1 : 1 + d_ff[mlp]], g[1 + d_ff[mlp] :]))
            if merged.count:
                out.groups.setdefault(group, {})[mlp] = merged
    return out
