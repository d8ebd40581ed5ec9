"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for full fine-tunes and LoRA: one FSDP unit per repeated
transformer block (the model's `_repeated_blocks`: FLUX's double and single blocks), then the root.

Order, so that no rank ever holds the whole model in float32 (12B FLUX: 44 GiB) or an unsharded EMA:
1. the model is loaded in its storage dtype (bf16) on the CPU, trainable flags set (LoRA added);
2. block by block: that block's trainable parameters are upcast to float32, then the block is sharded (its
   shards move to the accelerator): one block's float32 copy exists at a time;
3. the root is sharded; the optimizer and the EMA are built from the sharded parameters (DTensors), so the
   optimizer state and the EMA are sharded like the parameters.
Compute runs in `param_dtype` (bf16 under mixed_precision=bf16) and gradients are reduced in float32
(MixedPrecisionPolicy). The float32 master shards are what AdamW updates (lr 1e-5 steps vanish in bf16).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from leapalign_fast.errors import UserError


def ensure_process_group(device: torch.device) -> None:
    """FSDP2 and DCP need a process group; a single process (no launcher) gets a one-rank group of its own."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def compute_dtype(mixed_precision: str, storage: torch.dtype) -> torch.dtype | None:
    """The dtype FSDP all-gathers parameters in for compute; None: the storage dtype (no cast)."""
    if mixed_precision == "bf16":  # fp16 is refused by the config (no sharded grad scaler here)
        return torch.bfloat16
    return storage if storage != torch.float32 else None


def wrap_units(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules sharded one by one: instances of the model's repeated block classes (diffusers'
    `_repeated_blocks`), in module order."""
    classes = set(getattr(transformer, "_repeated_blocks", ()) or ())
    units = [m for m in transformer.modules() if type(m).__name__ in classes]
    if not units:
        raise UserError(f"fsdp=true: {type(transformer).__name__} names no repeated blocks to shard; use fsdp=false")
    return units


def _upcast_trainable(module: torch.nn.Module, recurse: bool) -> None:
    for p in module.parameters(recurse=recurse):
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def shard_transformer(transformer: torch.nn.Module, device: torch.device, param_dtype: torch.dtype | None) -> str:
    """Shard in place (per block, then the root) onto `device`; returns a one-line description for the run log."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(device)
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    units = wrap_units(transformer)
    for unit in units:
        _upcast_trainable(unit, recurse=True)
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    _upcast_trainable(transformer, recurse=True)  # the root's own parameters (embedders, norm_out, proj_out)
    fully_shard(transformer, mesh=mesh, mp_policy=policy)
    compute = "storage dtype" if param_dtype is None else str(param_dtype).removeprefix("torch.")
    return f"FSDP2 over {world} rank(s): {len(units)} blocks + root, compute {compute}, reduce float32"


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def all_finite(tensors) -> bool:
    """Every element of every tensor finite, on every rank (DTensors: each rank checks its shards, then a
    min-reduce). One host sync."""
    tensors = list(tensors)
    device = local(tensors[0]).device if tensors else torch.device("cpu")
    ok = torch.tensor(float(all(bool(torch.isfinite(local(t)).all()) for t in tensors)), device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # on the tensors' device: NCCL-only groups take no CPU tensor
    return bool(ok)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip sharded gradients to `max_norm` (inf: measure only); the total norm as a plain (replicated) tensor."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if math.isfinite(max_norm) else float("inf"))
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def full_tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather sharded tensors (a collective on every rank); plain tensors pass through."""
    return {n: t.full_tensor() if isinstance(t, DTensor) else t for n, t in named.items()}
