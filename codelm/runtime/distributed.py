"""Where a process sits in a torchrun job, the few collectives a run uses (one process, world 1,
runs the same code with each collective a no-op), and how the model is spread over the processes
(``wrap``: DDP replicates it, FSDP2 shards it)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as td
import torch.nn as nn

STRATEGIES = ("ddp", "fsdp")  # --strategy: replicate the model on every process, or shard it


@dataclass
class Dist:
    """Where this process sits in a torchrun job (world 1: a plain process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


class RankZeroFailed(RuntimeError):
    """Raised on the other ranks when rank 0 fails in ``main_first`` (rank 0 reports it)."""


def this_process() -> Dist:
    """Where this process sits, from torchrun's environment (none: a plain process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def join(dist: Dist, device: torch.device) -> bool:
    """Join the torchrun job ``dist`` sits in, its collectives on ``device`` (nccl on CUDA, gloo
    on the CPU); whether this call initialised the group (and so leaves it)."""
    if not dist.enabled or td.is_initialized():
        return False
    if device.type == "cuda":
        # Every rank checks, before joining: a rank without a GPU of its own would crash in
        # set_device while the others waited for it in init_process_group.
        gpus = torch.cuda.device_count()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.local_rank + 1))
        if local_world > gpus:
            raise ValueError(f"torchrun started {local_world} processes on {gpus} CUDA device(s): "
                             f"use --nproc_per_node {gpus}, or --device cpu")
        torch.cuda.set_device(device)
    td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def resolve_device(spec: str, dist: Dist) -> torch.device:
    """The device this rank trains on, from ``spec`` (--device: "auto" is this rank's GPU
    where there is one, else the CPU)."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank)
        if torch.backends.mps.is_available():  # a Mac: say so, a 1B model in fp32 takes days
            print("note: training on the CPU (codelm trains on cpu or cuda, not mps)",
                  file=sys.stderr)
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {spec}: not a device (auto | cpu | cuda | cuda:N)"
                         ) from None
    if device.type not in ("cpu", "cuda"):  # mps, meta, ...: kernels this trainer never ran on
        raise ValueError(f"--device {spec}: training runs on cpu or cuda")
    gpus = torch.cuda.device_count()  # under torchrun each rank takes its own (local_rank)
    if device.type == "cuda" and (0 if dist.enabled else device.index or 0) >= gpus:
        raise ValueError(f"--device {spec}: this machine has {gpus} CUDA device(s)")
    if device.type == "cuda" and dist.enabled:
        return torch.device("cuda", dist.local_rank)
    return device


def leave() -> None:
    """Leave the group, the DDP model freed first (an error's traceback frames may hold it: freed
    at interpreter exit instead, gloo aborts now and then)."""
    error, seen = sys.exc_info()[1], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    gc.collect()
    td.destroy_process_group()


def broadcast(value, dist: Dist):
    """Rank 0's ``value`` on every rank."""
    box = [value]
    if dist.enabled:
        td.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


@dataclass
class PendingSum:
    """A sum over the ranks on its way to this host."""

    summed: torch.Tensor  # on the host; holds the sum once ``arrived`` returns
    arrived: Callable[[], None]

    def values(self) -> list[float]:
        """The sum, waiting for it (and on a GPU for nothing queued after it)."""
        self.arrived()
        return self.summed.tolist()


def all_reduce_sum_later(values: list[float], dist: Dist, device: torch.device) -> PendingSum:
    """Start summing ``values`` over the ranks (on ``device``, where the group's collectives run)
    without waiting for the sum: on a GPU the copies to and from the device are queued on the
    stream around the all-reduce, and the host waits for them alone when it reads the sum."""
    host = torch.tensor(values, dtype=torch.float32)
    if device.type != "cuda":
        work = td.all_reduce(host, op=td.ReduceOp.SUM, async_op=True)
        return PendingSum(host, work.wait)
    host = host.pin_memory()
    on_device = host.to(device, non_blocking=True)
    work = td.all_reduce(on_device, op=td.ReduceOp.SUM, async_op=True)
    work.wait()  # NCCL: the stream waits for the all-reduce, the host does not
    host.copy_(on_device, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return PendingSum(host, copied.synchronize)


def all_gather(value, dist: Dist) -> list:
    """Every rank's ``value``, in rank order."""
    values = [value] * dist.world
    if dist.enabled:
        td.all_gather_object(values, value)
    return values


def barrier(dist: Dist) -> None:
    if dist.enabled:
        td.barrier()


@contextlib.contextmanager
def main_first(dist: Dist) -> Iterator[None]:
    """Rank 0 does what only it does (caches, checkpoints); if it fails, the others stop too."""
    if not dist.main:
        if broadcast(None, dist) is not None:
            raise RankZeroFailed("rank 0 failed (its error says why)")
        yield
        return
    try:
        yield
    except BaseException:
        broadcast("failed", dist)
        raise
    broadcast(None, dist)


# ---- The strategy: how the model is spread over the processes ----

def wrap(model: nn.Module, strategy: str, dist: Dist, device: torch.device,
         precision: str) -> nn.Module:
    """What the step runs: ``model`` itself on one process; under torchrun DDP around it
    (``strategy`` ddp), or ``model`` sharded in place (fsdp, ``shard``). The optimizer is built
    after this call: sharding replaces the parameters."""
    if not dist.enabled:
        return model
    if strategy == "fsdp":
        shard(model, precision)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Buffers (rotary tables, LoRA row maps, NF4's level table) are alike on every rank and
    # never trained: no re-broadcast before each forward.
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def shard(model: nn.Module, precision: str) -> None:
    """FSDP2 on ``model`` (a Transformer): each block one group, gathered for its forward and
    backward and freed after, then the root (embeddings, final norm, head). Each rank keeps
    1/world of every parameter, gradient and optimizer moment (a quantized base's codes and
    scales too). Under bf16 the gathered weights are bf16 and gradients are reduced in fp32; else
    all stays fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    # A quantized Linear (codelm.models.quantize.QuantLinear: integer codes, fp32 scales) is a
    # group of its own, gathered as stored: cast to bf16, its scales would round, and every
    # weight with them.
    for module in model.modules():
        if hasattr(module, "qweight"):
            fully_shard(module, mp_policy=MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    # The root's floating inputs (the loss's grad_scale) keep their fp32: only the blocks cast.
    fully_shard(model, mp_policy=dataclasses.replace(policy, cast_forward_inputs=False))


def is_sharded(model: nn.Module) -> bool:
    """Whether ``shard`` sharded ``model`` (FSDP's modules are imported only where one runs:
    the import takes about a second)."""
    if "torch.distributed.fsdp" not in sys.modules:  # nothing can be sharded
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def accumulating(model: nn.Module) -> contextlib.AbstractContextManager:
    """Within: a micro-batch's backward that is not the step's last. DDP then skips its
    all-reduce (gradients add up locally); FSDP reduce-scatters each micro-batch, so that only
    a shard of the gradients is ever kept."""
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded value (a DTensor, as clipping computes the norm of sharded gradients) whole on
    every rank; any other tensor as it is."""
    if "torch.distributed.tensor" not in sys.modules:  # no tensor can be a DTensor
        return t
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
