"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for full fine-tunes and LoRA: one FSDP unit per repeated
transformer block (blocks.repeated_blocks: FLUX's double and single blocks, SD3's transformer_blocks), then the root.

Order, so that no rank ever holds the whole model in float32 (12B FLUX: 44 GiB), nor (from a model directory)
the whole model at all, nor an unsharded EMA:
1. the transformer is built on the meta device from its config.json (no memory; `models.common.empty_transformer`)
   in its storage dtype (bf16), trainable flags set, LoRA added: peft initialises the LoRA weights on the host
   as on a loaded model (`host_placeholders`), so a seed gives the same LoRA either way;
2. block by block: that block's trainable parameters are upcast to float32, then the block is sharded;
3. the root is sharded; then `load_shards` materialises the shards on the device (`to_empty`) and reads into
   each one only its own rows (FSDP2 shards dim 0, `torch.chunk`-style) from the safetensors file(s), casting
   file dtype -> storage dtype -> parameter dtype as loading the whole model then upcasting would: a rank reads
   about 1/world of the weights, and holds at most one tensor's row range on the host at a time;
4. the optimizer and the EMA are built from the sharded parameters (DTensors), so the optimizer state and the
   EMA are sharded like the parameters.
The tiny random model (model.source = "tiny") is built whole on every rank, then sharded (steps 2-4 the same).
Compute runs in `param_dtype` (bf16 under mixed_precision=bf16) and gradients are reduced in float32
(MixedPrecisionPolicy). The float32 master shards are what AdamW updates (lr 1e-5 steps vanish in bf16).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from leapalign_fast.blocks import repeated_blocks
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
    """The modules sharded one by one: the transformer's repeated blocks (blocks.repeated_blocks)."""
    units = repeated_blocks(transformer)
    if not units:
        raise UserError(f"fsdp=true: {type(transformer).__name__} has no repeated blocks to shard; use fsdp=false")
    return units


def _upcast_trainable(module: torch.nn.Module, recurse: bool) -> None:
    for p in module.parameters(recurse=recurse):
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def shard_transformer(
    transformer: torch.nn.Module,
    device: torch.device,
    param_dtype: torch.dtype | None,
    weights: Path | None = None,
    storage: torch.dtype | None = None,
) -> str:
    """Shard in place (per block, then the root) onto `device`; returns a one-line description for the run log.
    A transformer on the meta device is then filled from the safetensors files in `weights` (`load_shards`),
    its non-meta tensors (peft's LoRA init, buffers) from their host values; `storage`: the frozen weights' dtype."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(device)
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    units = wrap_units(transformer)
    empty = any(p.is_meta for p in transformer.parameters())
    if empty:  # the small host tensors (LoRA, buffers), kept to be written into the materialised model
        host = {
            n: t.detach().clone()
            for n, t in [*transformer.named_parameters(), *transformer.named_buffers()]
            if not t.is_meta
        }
        transformer.to("meta")  # every parameter on one device for fully_shard; materialised together below
    for unit in units:
        _upcast_trainable(unit, recurse=True)
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    _upcast_trainable(transformer, recurse=True)  # the root's own parameters (embedders, norm_out, proj_out)
    fully_shard(transformer, mesh=mesh, mp_policy=policy)
    compute = "storage dtype" if param_dtype is None else str(param_dtype).removeprefix("torch.")
    line = f"FSDP2 over {world} rank(s): {len(units)} blocks + root, compute {compute}, reduce float32"
    if empty:
        read, total = load_shards(transformer, weights, storage, device, host)
        return line + f", built on meta and loaded by shard: this rank read {read} of {total} weight elements"
    return line + ", loaded whole on every rank, then sharded"


@contextmanager
def host_placeholders(module: torch.nn.Module):
    """Inside: every meta parameter is a zero-stride host tensor of its shape and dtype (a few bytes), so that
    what is added inside (peft's LoRA) is initialised on the host exactly as on a loaded model (peft moves new
    adapters to the device of their base layer: meta would drop their values); the meta parameters come back
    on exit, carrying the requires_grad set inside."""
    swapped = []
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                stand_in = torch.nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape), p.requires_grad)
                mod._parameters[name] = stand_in
                swapped.append((mod, name, p, stand_in))
    try:
        yield
    finally:
        for mod, name, p, stand_in in swapped:  # peft keeps a wrapped layer as the `base_layer` module itself
            p.requires_grad_(stand_in.requires_grad)
            mod._parameters[name] = p


# safetensors dtype names (the format's header) -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsRows:
    """Row ranges of the tensors of a diffusers model directory's safetensors file(s) (one file, or several named
    by `diffusion_pytorch_model.safetensors.index.json`), read with plain file reads of exactly those bytes: no
    memory map, so a rank's resident memory holds only the rows it asked for. The format: an 8-byte little-endian
    header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data."""

    def __init__(self, weights: Path):
        index = weights / "diffusion_pytorch_model.safetensors.index.json"
        names = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.is_file()
            else ["diffusion_pytorch_model.safetensors"]
        )
        self.where: dict[str, tuple[Path, int, dict]] = {}  # name -> (file, data start, header entry)
        for name in names:
            path = weights / name
            try:
                with open(path, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(size))
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read the safetensors header of {path}: {e}; check the model directory") from e
            header.pop("__metadata__", None)
            self.where.update({k: (path, 8 + size, v) for k, v in header.items()})
        self.elements_read = 0

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name][2]["shape"])

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (all of a 0-dim one), in the file's dtype."""
        path, data, entry = self.where[name]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise UserError(
                f"{path}: tensor {name} has dtype {entry['dtype']}, which this loader does not read; "
                "use fsdp=false or a directory saved in a float dtype"
            )
        shape = entry["shape"]
        stop = (shape[0] if stop is None else stop) if shape else 1
        out = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=SAFETENSORS_DTYPES[entry["dtype"]])
        row_bytes = math.prod(shape[1:]) * out.element_size()  # little-endian on disk and on every host we run on
        buffer = out.reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes, written by readinto
        with open(path, "rb") as f:
            f.seek(data + entry["data_offsets"][0] + start * row_bytes)
            if f.readinto(buffer) != buffer.nbytes:
                raise UserError(f"{path} ends inside tensor {name}: the file is truncated; copy it again")
        self.elements_read += out.numel()
        return out


def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of dim 0 that FSDP2's Shard(0) gives `rank`: torch.chunk's split (ceil-sized chunks, the last
    ones shorter or empty)."""
    size = -(-rows // world)
    start = min(rank * size, rows)
    return start, min(start + size, rows)


@torch.no_grad()
def load_shards(
    transformer: torch.nn.Module,
    weights: Path,
    storage: torch.dtype,
    device: torch.device,
    host: dict[str, torch.Tensor],
) -> tuple[int, int]:
    """Materialise a sharded meta `transformer` on `device` and fill each parameter's local shard with its rows
    of the file (or of `host`: LoRA), buffers whole (from the file if saved there, else `host`). Returns
    (elements read by this rank, elements of the sharded parameters)."""
    from torch.distributed.tensor import Shard

    files = SafetensorsRows(Path(weights))
    rank, world = dist.get_rank(), dist.get_world_size()
    transformer.to_empty(device=device)
    base = {n: n.replace(".base_layer.", ".") for n, _ in transformer.named_parameters()}  # peft-wrapped: saved name
    total = 0
    for name, p in transformer.named_parameters():
        if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),):
            raise RuntimeError(f"{name}: expected an FSDP2 Shard(0) DTensor, got {type(p).__name__}")
        shard = p.to_local()
        start, stop = shard_rows(p.shape[0], world, rank)
        if shard.shape[0] != stop - start:
            raise RuntimeError(f"{name}: the local shard has {shard.shape[0]} rows, torch.chunk gives {stop - start}")
        if name in host:  # LoRA: initialised on the host by peft
            rows = host[name][start:stop]
        elif base[name] not in files:
            raise UserError(
                f"the transformer weights in {weights} lack {base[name]}; check that model.source "
                "holds this model's config.json and weights"
            )
        elif files.shape(base[name]) != tuple(p.shape):
            raise UserError(
                f"transformer weight {base[name]} has shape {files.shape(base[name])} in {weights}, its "
                f"config.json gives {tuple(p.shape)}; check that they belong together"
            )
        else:
            rows = files.rows(base[name], start, stop)  # (stop - start, ...) in the file's dtype: only these bytes
        shard.copy_(rows.to(storage).to(p.dtype))  # the casts of load-whole-in-storage-dtype-then-upcast: same bits
        total += p.numel()
    for name, b in transformer.named_buffers():  # small, not sharded: whole on every rank
        value = files.rows(name) if name in files else host[name]
        b.copy_(value.to(storage) if value.is_floating_point() else value)
    return files.elements_read, total


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
