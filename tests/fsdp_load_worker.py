"""One rank of tests/test_fsdp_load.py's multi-process checks (started with RANK/WORLD_SIZE/MASTER_PORT, as torchrun
would): build the sharded transformer from a model directory, loaded whole then sharded or built on meta and loaded
by shard, then write what it built.

    fsdp_load_worker.py ROOT OUT whole|by_shard [key=value ...]

OUT.json (each rank): the run-log line, the peak growth of its RssAnon and RssFile while building (bytes).
OUT.safetensors (rank 0):
`snapshot` (every parameter gathered, buffers, the loss and gradients of one step); skipped with `--no-snapshot`.
Always on CPU (gloo), hidden from CUDA before torch is imported.
"""

import os
import sys

os.environ["CUDA_VISIBLE_DEVICES"] = ""
import json
import threading
from pathlib import Path

import torch

from leapalign_fast.build import add_trainable
from leapalign_fast.config import TinyFluxConfig, load_config
from leapalign_fast.fsdp import compute_dtype, host_placeholders, shard_transformer
from leapalign_fast.models.backbone import DTYPES, get_backbone
from leapalign_fast.models.flux import load_flux

TINY = TinyFluxConfig(layers=2, single_layers=3, heads=3, head_dim=8)  # odd row counts: uneven last shards


def build_sharded(root: Path, overrides: list[str], by_shard: bool):
    """The sharded transformer as build_run makes it from `root`: loaded whole then sharded (by_shard=False, the
    path before meta loading) or built on meta and loaded by shard; with the run-log line."""
    cfg = load_config(None, ["fsdp=true", *overrides])
    dtype = DTYPES[cfg.model.dtype]
    transformer = load_flux(root, dtype, need_text=False, empty_transformer=by_shard).transformer
    assert all(p.is_meta for p in transformer.parameters()) == by_shard
    torch.manual_seed(cfg.seed + 1)  # as build_run: the LoRA init
    with host_placeholders(transformer):
        add_trainable(transformer, cfg, get_backbone("flux"), upcast=False)
    line = shard_transformer(
        transformer,
        torch.device("cpu"),
        compute_dtype(cfg.mixed_precision, dtype),
        root / "transformer" if by_shard else None,
        dtype,
    )
    return transformer, line


def step(transformer, text_dim: int, seed: int = 3):
    """Loss and gathered gradients of one forward/backward of the sharded transformer on fixed random inputs."""
    g = torch.Generator().manual_seed(seed)
    b, img, txt = 2, 16, 8
    out = transformer(
        hidden_states=torch.randn(b, img, 64, generator=g),
        encoder_hidden_states=torch.randn(b, txt, text_dim, generator=g),
        pooled_projections=torch.randn(b, text_dim, generator=g),
        timestep=torch.rand(b, generator=g),
        guidance=torch.full((b,), 3.5),
        img_ids=torch.randn(img, 3, generator=g),
        txt_ids=torch.zeros(txt, 3),
        return_dict=False,
    )[0]
    loss = out.float().square().mean()  # (B, L, 64) -> ()
    loss.backward()
    return loss.detach(), {n: p.grad.full_tensor() for n, p in transformer.named_parameters() if p.requires_grad}


def snapshot(transformer, text_dim: int = TINY.text_dim) -> dict[str, torch.Tensor]:
    """Every parameter gathered (a collective), its trainable flag, every buffer, then the loss and gradients of
    one step (keys `loss`, `grad.*`)."""
    out = {f"param.{n}": p.full_tensor() for n, p in transformer.named_parameters()}
    out.update({f"trainable.{n}": torch.tensor(p.requires_grad) for n, p in transformer.named_parameters()})
    out.update({f"buffer.{n}": b for n, b in transformer.named_buffers()})
    loss, grads = step(transformer, text_dim)
    out["loss"] = loss
    out.update({f"grad.{n}": g for n, g in grads.items()})
    return {k: v.detach().contiguous() for k, v in out.items()}


def rss() -> dict[str, int]:
    """This process's resident memory in bytes (/proc/self/status): RssAnon (its own allocations) and RssFile
    (mapped file pages: the page cache, shared by every process reading the file)."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return {x.split(":")[0]: int(x.split()[1]) * 1024 for x in lines if x.startswith(("RssAnon:", "RssFile:"))}


class PeakRss:
    """Peak RssAnon and RssFile while inside, sampled every millisecond by a thread (allocations of a tensor's
    size live far longer than that)."""

    def __enter__(self):
        self.start, self.peak, self._stop = rss(), rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            for k, v in rss().items():
                self.peak[k] = max(self.peak[k], v)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for k, v in rss().items():
            self.peak[k] = max(self.peak[k], v)


if __name__ == "__main__":
    import torch.distributed as dist
    from safetensors.torch import save_file

    args = sys.argv[1:]
    want_snapshot = "--no-snapshot" not in args
    root, out, how, *overrides = [a for a in args if a != "--no-snapshot"]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with PeakRss() as memory:
        transformer, line = build_sharded(Path(root), overrides, by_shard=how == "by_shard")
    growth = {k: memory.peak[k] - memory.start[k] for k in memory.start}  # bytes
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"line": line, "peak_growth": growth}))
    if want_snapshot:
        snap = snapshot(transformer)
        if rank == 0:
            save_file(snap, f"{out}.safetensors")
    dist.barrier()
    dist.destroy_process_group()
