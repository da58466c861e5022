"""Data-parallel training under ``torchrun``: what `eat train` needs from ``torch.distributed``.

``torchrun --nproc-per-node N -m eat.cli train ...`` starts N copies of the same command with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set. :func:`setup` joins them into one process group (gloo on CPU, NCCL on
CUDA, each process on GPU ``LOCAL_RANK``). Without those variables every function here is a no-op and training
runs exactly as before.

The batch rule: ``batch_size`` stays the **global** batch. Every process builds the same global batch (same data,
same seed, same order) and keeps rows ``rank::world_size`` of it (:func:`local_rows`); the loss of process ``r``
is scaled by ``n_r / n`` (its rows over the batch's rows) and the gradients are summed over processes
(:func:`all_reduce_gradients`), which gives every process the gradient of the global batch's mean loss. So a
2-process run takes the same optimizer steps as a 1-process run with the same ``batch_size`` (up to the order of
floating-point sums); ``batch_size`` 32 on 4 GPUs means 8 rows per GPU per step.

Why not ``DistributedDataParallel``'s wrapper: it all-reduces the same gradients, but needs every process to run a
forward and backward in every step and every parameter to receive a gradient (``find_unused_parameters``
otherwise). Here a process whose share of a short last batch is empty, or a model whose pooler or an exit head
gets no gradient, still joins the one all-reduce per step.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    """Where this process stands: ``rank`` of ``world_size`` (0 of 1 outside torchrun) and its ``device``."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    started_here: bool = False  # this module created the process group (and so destroys it in cleanup)

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that logs, writes checkpoints and the finished model, and evaluates (rank 0)."""
        return self.rank == 0


def setup(device: str = "cpu") -> Distributed:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), or return a single-process context.

    On CUDA each process uses GPU ``LOCAL_RANK`` (``device`` "cuda" becomes "cuda:<local rank>") and NCCL; on CPU
    gloo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        started = True
    return Distributed(rank=rank, world_size=world_size, device=device, started_here=started)


def cleanup(context: Distributed) -> None:
    """Leave the process group if :func:`setup` created it."""
    if context.started_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Distributed) -> None:
    """Wait for every process (no-op alone)."""
    if context.enabled:
        dist.barrier()


def broadcast_parameters(model: torch.nn.Module, context: Distributed) -> None:
    """Give every process rank 0's weights and buffers (a randomly initialised head must start the same)."""
    if not context.enabled:
        return
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


def check_same(text: str, what: str, context: Distributed) -> None:
    """Raise RuntimeError unless every process computed the same ``text`` (e.g. the rows of the calibration
    slice): processes that disagree on the data would train on different rows without any error."""
    if not context.enabled:
        return
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    digests: list[str | None] = [None] * context.world_size
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"torchrun processes disagree on {what} ({digests}); check that every process reads the "
                           "same data files with the same settings")


def data_fingerprint(*datasets) -> str:
    """A hash of the rows of datasets (a ``TextDataset``'s frame, a ``TaggedData``'s sentences) for
    :func:`check_same`."""
    import pandas as pd

    digest = hashlib.sha256()
    for data in datasets:
        frame = getattr(data, "frame", None)
        if frame is not None:
            digest.update(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
        else:
            digest.update(repr(getattr(data, "sentences", data)).encode("utf-8"))
    return digest.hexdigest()


def local_rows(batch: dict[str, torch.Tensor], context: Distributed) -> dict[str, torch.Tensor]:
    """This process's share of a global batch: rows ``rank::world_size`` of every tensor (B, ...)."""
    if not context.enabled:
        return batch
    return {key: value[context.rank::context.world_size] for key, value in batch.items()}


def all_reduce_gradients(model: torch.nn.Module, context: Distributed) -> None:
    """Sum every parameter's gradient over the processes (a missing gradient counts as zeros), in one flat
    buffer per dtype and device (one collective, not one per tensor)."""
    if not context.enabled:
        return
    parameters = [p for p in model.parameters() if p.requires_grad]
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for p in parameters:
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])  # (sum of sizes,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in group:
            size = p.grad.numel()
            p.grad.copy_(flat[offset:offset + size].view_as(p.grad))
            offset += size


def sum_over_processes(value: float, context: Distributed) -> float:
    """``value`` summed over processes (e.g. a step's loss, for the log)."""
    if not context.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=context.device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor[0])


__all__ = ["Distributed", "setup", "cleanup", "barrier", "broadcast_parameters", "check_same", "data_fingerprint", "local_rows",
           "all_reduce_gradients", "sum_over_processes"]
