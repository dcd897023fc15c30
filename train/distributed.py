"""Data-parallel training under `torchrun`: the process group, each rank's share of an epoch, and
the one gradient all-reduce per step.

`torchrun --nproc_per_node N -m wat.train.cli ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without
them (or with WORLD_SIZE=1) a run is the plain single-process trainer, unchanged.

How a global step is shared: every rank draws the same epoch order from the shared seeded
generator and takes every N-th clip of it (`order[rank::N]`), in batches of batch_size/N. Local
batch k of every rank together is exactly global batch k (`order[k*B:(k+1)*B]`), so with the same
seed and global batch the run sees the same clips per step as one process. Each rank backpropagates
the SUM of its clips' losses; one all-reduce adds the gradients and the clip counts of all ranks and
the gradient is divided by the global count: the mean over the global batch, exact even for a short
last batch or a rank with no clip left (it contributes zeros). A hand-written all-reduce instead of
the DistributedDataParallel wrapper for exactly that: DDP averages over ranks, which is only the
batch mean when every rank has the same number of clips.

Augmentation draws (mixup, masks, unlabeled batches) are made for the whole global batch from the
generator every rank shares (the same state everywhere: `last.pt` holds one, and resumes on any
number of processes), and each rank applies the draws of its own clips (`augment.Share`); a mixup
partner held by another rank is read from the store (`epoch._shares`). So with a cache held in
memory (the `FeatureStore` is resident: the usual case) N processes and one make the same steps, up
to the order of float additions in the gradient sums. With a cache streamed from disk (larger than
the memory budget) each rank shuffles its share of an epoch within windows on its own: the clips of
a step then differ from one process's, and mixup partners come from the rank's own clips. Rank 0
alone evaluates and
writes (RUN_DIR lock, checkpoints, metrics, figures); all ranks read the same caches and `last.pt`
(multi-node: RUN_DIR and the caches on a shared file system).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .options import TrainError


@dataclass(frozen=True)
class World:
    rank: int = 0           # this process among all (RANK)
    size: int = 1           # number of processes (WORLD_SIZE)
    local_rank: int = 0     # this process on its node: its GPU (LOCAL_RANK)

    @property
    def main(self) -> bool:
        """The rank that evaluates and writes outputs."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun; a single process without them."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise TrainError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them)") from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise TrainError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={size} LOCAL_RANK={local}")
    return World(rank, size, local)


def join(world: World, device: str) -> torch.device:
    """Join the process group (nccl on CUDA, gloo on CPU) and return this rank's device
    (`cuda` becomes `cuda:LOCAL_RANK`). A single process only resolves the device."""
    dev = torch.device(device)
    if not world.parallel:
        return dev
    if dev.type == "cuda":
        dev = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=world.rank, world_size=world.size)
    return dev


def leave(world: World) -> None:
    if world.parallel and dist.is_initialized():
        dist.destroy_process_group()


def local_share(order: np.ndarray, world: World) -> np.ndarray:
    """This rank's clips of an epoch order: every N-th, starting at its rank (see module doc)."""
    return order[world.rank::world.size]


def all_reduce_grads(params: list[torch.nn.Parameter], n_local: int) -> torch.Tensor:
    """Sum every rank's gradients (of its summed loss) and clip counts, then divide by the global
    count: each parameter's gradient becomes that of the global-batch mean loss on every rank.
    A parameter no rank produced a gradient for keeps none (as in one process: Adam skips it).
    Returns the global count (a tensor: no host sync)."""
    dev = params[0].device
    parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=dev) for p in params]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
    flat = torch.cat(parts + [has, torch.tensor([float(n_local)], device=dev)])
    dist.all_reduce(flat)
    total = flat[-1]
    pos = 0
    for p, h in zip(params, flat[-1 - len(params):-1].tolist()):
        g = flat[pos:pos + p.numel()].view_as(p)
        pos += p.numel()
        p.grad = (g / total).to(p.dtype) if h > 0 else None
    return total


def gather(obj, world: World) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not world.parallel:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def from_main(obj, world: World):
    """Rank 0's `obj` on every rank."""
    if not world.parallel:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
