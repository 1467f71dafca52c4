"""torch.distributed plumbing: the process group torchrun describes, FSDP2 sharding, reductions of metrics.

One process without torchrun is world size 1 with no process group at all; every helper here then does the trivial
thing (the model stays a plain module), so the trainer has a single code path. Several nodes need nothing here:
torchrun's own flags (--nnodes, --node_rank, --master_addr) set the environment that init_distributed reads."""

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(rank, world_size, device)


def shard(model: torch.nn.Module, d: Dist, bf16: bool = False, frozen: bool = False) -> torch.nn.Module:
    """Shard `model` across the ranks with FSDP2, in place; with one process, leave it as it is.

    Each transformer block is its own FSDP unit, gathered just before it runs and freed after; the root unit holds the
    rest (embeddings, final norm, head). Under --bf16 the gathered weights are bf16 while the shards, the optimizer
    state and the gradient reduction stay fp32. A trained model's root keeps its gathered weights from forward to
    backward (fully_shard's default); a frozen one has no backward and frees them after each forward. Gradients are
    summed over the ranks, not averaged: the trainer already divides each loss by the step's count over all ranks."""
    if d.world_size == 1:
        return model
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=precision)
    fully_shard(model, mesh=mesh, mp_policy=precision, reshard_after_forward=frozen)
    if not frozen:
        for unit in fsdp_units(model):  # neither setting is recursive
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return model


def fsdp_units(model: torch.nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model: torch.nn.Module):
    """Hold the full weights of a sharded model for the duration of a `with` block (a rollout).

    Generation runs one forward per token: without this, every token would gather and free every block, and ranks
    that stop decoding at different steps (their rows reach EOS) would hang in those collectives. The cost is the
    whole model unsharded for the rollout. Enter it outside torch.inference_mode: weights gathered inside it would
    be inference tensors, which FSDP cannot gather into again at the next training forward."""
    units = fsdp_units(model)
    for unit in units:  # unshard() is not recursive: one call per block and one for the root
        unit.unshard()
    if units:
        model.set_reshard_after_forward(False)  # recursive: the forwards inside must not free them
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        if units:  # back to fully_shard's defaults for a trained model (see shard)
            model.set_reshard_after_forward(True)
            model.set_reshard_after_forward(False, recurse=False)


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole model's state dict without its frozen weights (LoRA's base), gathered to rank 0's
    CPU memory (an empty dict on the other ranks). Every rank must call it: the gather is a collective."""
    if not fsdp_units(model):
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        return {name: t for name, t in model.state_dict().items() if name not in frozen}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (tracking.Metrics: why (sum, count) pairs travel, not means)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shutdown():
    if dist.is_initialized():
        # Sharded models reach the process group through their DTensors, and reference cycles keep
        # them alive until interpreter exit, when tearing down gloo's threads aborts the process
        # (std::terminate, SIGABRT) after all the work is done. Collect them while it is safe.
        gc.collect()
        dist.destroy_process_group()
