"""Multi-process identification and alignment on accelerate / torch.distributed.

Launch any safeneuron command with ``accelerate launch`` or ``torchrun``.

**Identification**: every process records the statistics of its shard of the
prompts, then the per-neuron count / mean / M2 of all processes are gathered and
merged with Chan's parallel formula in float64, in rank order, so every process
holds the same result as a single process over all prompts (up to float64 rounding).

**Alignment** (masked DPO through TRL, which lets accelerate wrap the model):

* DDP: the wrapped module keeps the very parameter objects the
  :class:`~safeneuron.freezing.NeuronFreezer` hooked, so the gradient masks act
  before DDP's all-reduce and every rank restores its frozen entries after every
  step. :func:`bind_freezer` (run at ``on_train_begin`` by :class:`DistributedFreezeCallback`)
  broadcasts rank 0's snapshots, since DDP starts every rank from rank 0's weights.
* FSDP2 (``fully_shard``; accelerate ``fsdp_version: 2``): parameters are replaced by
  DTensors sharded along dim 0. :func:`bind_freezer` re-points every frozen entry at
  its new parameter and keeps only the rows of this rank's shard
  (:class:`ShardedFrozenEntries`): restore writes into the local shard, and the
  gradient mask runs as a post-accumulate-grad hook on the sharded gradient (FSDP2
  calls it after the reduce-scatter, before clipping and the optimizer).
* FSDP1 (``FullyShardedDataParallel``, flat parameters) and DeepSpeed ZeRO-3
  (partitioned parameters) are refused with a clear error; DeepSpeed ZeRO-1/2 keep
  whole parameters on every rank and use the DDP path (not tested here).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from safeneuron.activations import ActivationStats, NeuronStats
from safeneuron.data.prompts import PromptSet
from safeneuron.freezing import FreezeError, FrozenEntries, NeuronFreezer

logger = logging.getLogger(__name__)

__all__ = ["world", "is_main_process", "shard", "all_merge_stats", "barrier", "process_device", "all_true",
           "parallelism", "bind_freezer", "ShardedFrozenEntries", "DistributedFreezeCallback", "full_state_dict"]


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


# --------------------------------------------------------------------------- alignment
def process_device(device: str = "auto") -> str:
    """This process's device: under a multi-GPU launch, ``auto``/``cuda`` mean ``cuda:LOCAL_RANK``."""
    if _launched() and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def all_true(flag: bool) -> bool:
    """True when ``flag`` is true on every process (a collective under a launch)."""
    if not _launched():
        return bool(flag)
    import torch.distributed as dist

    world()
    t = torch.tensor([0.0 if flag else 1.0], device=_comm_device())
    dist.all_reduce(t)
    return t.item() == 0


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def parallelism(model: nn.Module) -> str:
    """How a (prepared) model is distributed: ``fsdp1``, ``fsdp2``, ``ddp`` or ``none``."""
    from torch.nn.parallel import DistributedDataParallel

    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        FullyShardedDataParallel = ()  # type: ignore[assignment]
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return "fsdp1"
    if any(_is_dtensor(p) for p in model.parameters()):
        return "fsdp2"
    if isinstance(model, DistributedDataParallel):
        return "ddp"
    return "none"


# Wrappers that insert themselves into parameter names (activation checkpointing, torch.compile, DDP, FSDP1).
_WRAPPER_NAMES = re.compile(r"(^|\.)(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module|module)\.")


def _canonical(name: str) -> str:
    return _WRAPPER_NAMES.sub(r"\1", name)


@dataclass
class ShardedFrozenEntries(FrozenEntries):
    """Frozen entries of a DTensor parameter (FSDP2), restricted to this rank's shard.

    ``index`` and ``snapshot`` are local: the frozen rows/columns that fall in the
    shard, in shard coordinates, and their values there. A rank whose shard holds
    none of them has an empty index.
    """

    @classmethod
    def of(cls, entry: FrozenEntries, param: torch.Tensor) -> "ShardedFrozenEntries":
        """``entry`` (full-tensor index and snapshot) on ``param``, a DTensor of the same global shape."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if tuple(param.shape) != tuple(entry.param.shape):
            raise FreezeError(f"{entry.name}: sharded parameter has shape {tuple(param.shape)}, "
                              f"the frozen one {tuple(entry.param.shape)}")
        if not all(type(p) in (Shard, Replicate) for p in param.placements):
            raise FreezeError(f"{entry.name}: placements {param.placements} are not supported by neuron freezing "
                              "(plain Shard/Replicate only: FSDP2 without tensor parallelism)")
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        dim, index, snapshot = entry.dim, entry.index.cpu(), entry.snapshot
        inside = (index >= offset[dim]) & (index < offset[dim] + shape[dim])
        snapshot = snapshot.index_select(dim, torch.nonzero(inside).flatten().to(snapshot.device))
        for d in range(snapshot.ndim):  # the other dimensions: this shard's slice
            if d != dim:
                snapshot = snapshot.narrow(d, offset[d], shape[d])
        local = param.to_local()
        return cls(entry.name, param, dim, (index[inside] - offset[dim]).to(local.device),
                   snapshot.to(device=local.device, dtype=local.dtype).clone())

    def _local(self) -> torch.Tensor:
        return self.param.detach().to_local()

    def restore(self) -> None:
        if self.index.numel():
            self._local().index_copy_(self.dim, self.index, self.snapshot)

    def unchanged(self) -> bool:
        return torch.equal(self._local().index_select(self.dim, self.index), self.snapshot)

    def mask_grad(self, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: zero the frozen entries of the local gradient shard."""
        if param.grad is not None and self.index.numel():
            with torch.no_grad():
                param.grad.to_local().index_fill_(self.dim, self.index, 0.0)


def bind_freezer(freezer: NeuronFreezer, model: nn.Module) -> NeuronFreezer:
    """Point ``freezer`` at the parameters of ``model`` as accelerate prepared it (call on every rank).

    * unwrapped / DDP: the parameters are the hooked ones; the snapshots are
      broadcast from rank 0 (DDP started every rank from rank 0's weights).
    * FSDP2: each frozen entry moves to its DTensor parameter, restricted to this
      rank's shard, with a post-accumulate-grad hook as the gradient mask.
    * FSDP1 (flat parameters): :class:`~safeneuron.freezing.FreezeError`.

    Then checks on every rank that the frozen entries hold their snapshot values
    (ranks that built different weights fail here, before any step).
    """
    kind = parallelism(model)
    if kind == "fsdp1":
        raise FreezeError("neuron freezing does not support FSDP1 (flat parameters); use FSDP2: "
                          "fsdp_version: 2 in the accelerate config (fsdp_config={'version': 2} in the trainer args)")
    _, size = world()
    if size > 1:
        import torch.distributed as dist

        device = _comm_device()
        for e in freezer.entries:
            if isinstance(e, ShardedFrozenEntries):
                continue  # already bound (a second train() call)
            snap = e.snapshot.to(device)
            dist.broadcast(snap, src=0)
            e.snapshot = snap.to(e.snapshot.device)
    params = {_canonical(n): p for n, p in model.named_parameters()}
    moved = 0
    for i, e in enumerate(freezer.entries):
        param = params.get(_canonical(e.name))
        if param is None:
            raise FreezeError(f"{e.name}: not a parameter of the prepared model; install the freezer on the model "
                              "the trainer trains")
        if param is e.param:
            continue
        if not _is_dtensor(param):  # a wrapper replaced the parameter by a plain tensor (none known)
            raise FreezeError(f"{e.name}: the prepared model replaced the parameter by a {type(param).__name__}; "
                              "neuron freezing supports unwrapped, DDP and FSDP2 models")
        entry = ShardedFrozenEntries.of(e, param)
        freezer.entries[i] = entry
        if param.requires_grad:
            freezer._handles.append(param.register_post_accumulate_grad_hook(entry.mask_grad))
        moved += 1
    changed = freezer.changed()
    if not all_true(not changed):
        raise FreezeError("frozen entries differ from their snapshot at the start of training"
                          + (f" ({', '.join(changed[:3])} on this rank)" if changed else " on another rank")
                          + "; build the model identically on every process (same weights or seed)")
    if moved:
        logger.info("neuron freezing bound to %d sharded parameters (%s)", moved, kind)
    return freezer


try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object  # type: ignore[assignment,misc]


class DistributedFreezeCallback(TrainerCallback):
    """Bind a :class:`~safeneuron.freezing.NeuronFreezer` to the model accelerate prepared (DDP, FSDP2).

    Runs at ``on_train_begin``, after the Trainer wrapped (or sharded) the model and
    loaded any checkpoint. Refuses DeepSpeed ZeRO-3 (partitioned parameters).
    """

    def __init__(self, freezer: NeuronFreezer) -> None:
        self.freezer = freezer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        plugin = getattr(args, "deepspeed_plugin", None)
        if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
            raise FreezeError("neuron freezing does not support DeepSpeed ZeRO-3 (partitioned parameters); "
                              "use ZeRO-1/2 or FSDP2 (fsdp_version: 2)")
        if model is not None:
            bind_freezer(self.freezer, model)
        return control


def full_state_dict(model: nn.Module, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The whole model's state dict as plain tensors on ``device``, FSDP2 shards gathered (call on every rank)."""
    out = {}
    for name, value in model.state_dict().items():
        if _is_dtensor(value):
            value = value.full_tensor()
        out[_canonical(name)] = value.detach().to(device)
    return out
