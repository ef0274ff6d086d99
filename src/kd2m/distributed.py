"""torch.distributed helpers: global-batch distribution matching and rank bookkeeping.

A distribution metric on each rank's local batch is a different, noisier quantity than on the
global batch (and a class-conditional one may see a class once or not at all). With
:func:`gather_with_grad` every rank computes the metric on the concatenated global batch; its
backward sums the gradient contributions of all ranks' copies (the semantics of
``torch.distributed.nn.functional.all_gather``), and DDP's gradient *averaging* over W ranks
then divides by W. Each rank's copy of the loss is the same global-batch loss L, so the student
receives (1/W)·Σ_ranks ∂L/∂θ = ∂L/∂θ: exactly the single-process gradient of the global-batch
loss — which the tests check numerically.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "rank", "world_size", "is_main", "launched_by_torchrun", "gather_with_grad", "gather_batch",
           "all_reduce_sum", "all_reduce_tensor", "average_gradients", "barrier", "setup", "teardown"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums each slot's gradient over ranks and returns this rank's
    slot (the semantics of torch.distributed.nn.functional.all_gather, which is deprecated;
    all_reduce + slice also works on gloo, which has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (n_r, ...) from every rank along dim 0, differentiably.

    Ranks may hold different n_r (the last batch): tensors are padded to the largest, gathered,
    and trimmed. A no-op when not distributed.
    """
    if not is_distributed():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    gathered = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(gathered, n)
    sizes = [int(s) for s in gathered]
    biggest = max(sizes)
    if biggest != x.shape[0]:
        pad = x.new_zeros((biggest - x.shape[0],) + tuple(x.shape[1:]))
        x = torch.cat([x, pad])
    full = _AllGather.apply(x) if x.requires_grad else _AllGather.forward(_Ctx(), x)
    return torch.cat([full[r * biggest:r * biggest + s] for r, s in enumerate(sizes)])


class _Ctx:  # forward without autograd (labels, teacher features)
    pass


def gather_batch(*tensors):
    """:func:`gather_with_grad` on each tensor that is not None (teacher parts need no grad)."""
    if not is_distributed():
        return tensors
    return tuple(None if t is None else gather_with_grad(t) for t in tensors)


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum python numbers over ranks (for exact accuracy counts and loss totals)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_tensor(t: Tensor, op: str = "sum") -> Tensor:
    """``t`` reduced over ranks ("sum" or "min"), as a new tensor on its device; ``t`` when not distributed."""
    if not is_distributed():
        return t
    out = t.clone()
    dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op])
    return out


def average_gradients(module: torch.nn.Module) -> None:
    """All-reduce-mean the gradients of a module that is not wrapped in DDP."""
    if not is_distributed():
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def setup(device: torch.device) -> torch.device:
    """Initialise the process group when launched by torchrun; return the device this process uses.

    ``device``: the run's device as :func:`kd2m.runtime.resolve_device` gave it (the one home of
    the "auto" rule). nccl on CUDA, where each rank uses GPU ``LOCAL_RANK``; gloo on CPU.
    """
    if not launched_by_torchrun() or is_distributed():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
