"""Data parallelism through torch.distributed (NCCL on GPUs, gloo on the CPU): exact token-weighted gradients.

Every rank walks the same batch order; of the world × grad_accum micro-batches of a step, rank r takes every
world-th one. Gradients and token counts are summed across ranks, so the update equals a single process with
grad_accum × world micro-batches.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from trmlx.distributed import world_size


def ensure_process_group() -> None:
    """Join the launch's process group once (no-op for a single process)."""
    if world_size() > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_scalar(value: float) -> float:
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return float(tensor.item())


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce (sum) every gradient; the loss was already divided by the global token count."""
    if not active():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # One all-reduce of a flat buffer instead of one per adapter tensor (hundreds per step): latency matters.
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(reduced)


def barrier() -> None:
    if active():
        dist.barrier()
