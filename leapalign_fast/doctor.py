"""`leapalign-fast doctor [--config FILE] [key=value ...]`: check the machine a job will run on, in seconds, before
the job: run it where (and under the launcher with which) the job will run.

Each check is one row (check, status, detail); status is ok, warn, fail or skipped. The exit status is 0 when
nothing failed, 2 otherwise, with one line per failure saying the fix. The checks, in order:

    devices      the accelerator this rank gets (LOCAL_RANK under torchrun / accelerate launch), or the CPU
    dtype        the config's model.dtype / mixed_precision / model.tf32 on that device (a matmul in each)
    versions     torch, CUDA, triton, diffusers, transformers, accelerate, peft, flash-attn; the project's bounds
    kernel:*     each Triton kernel (kernels/) compiled for the device, or interpreted on a CPU (TRITON_INTERPRET=1),
                 against its PyTorch reference: values and gradients
    attention    the attention backend the config gets (models/fast.py resolve_attention)
    collective   an all_reduce across every rank, when launched distributed (WORLD_SIZE > 1)
    weights      model.source (local folder or Hub id: present / stale / missing / gated) and the reward's paths
    prompts      each prompt set's embedding cache in output_dir: present, missing (encoded at start) or stale
    memory       free device memory against the weights plus the preflight estimate of one micro-step
    disk         free disk at output_dir against the checkpoints the run keeps (and a Hub download still to come)
    trackers     report_to: each tracker importable; W&B logged in or offline

The machine's checks are in doctor_machine.py, the job's (weights, prompts, memory, disk) in doctor_job.py.
Nothing is downloaded and nothing is written; the model's weights are not read (its transformer is built on the meta
device from its config; a tiny model is built).
"""

from __future__ import annotations

import os
import sys

from leapalign_fast.doctor_job import (
    check_disk,
    check_memory,
    check_prompts,
    check_reward_weights,
    check_weights,
)
from leapalign_fast.doctor_machine import (
    Check,
    Context,
    check_attention,
    check_collective,
    check_devices,
    check_dtype,
    check_kernels,
    check_trackers,
    check_versions,
)


def run_checks(cfg, collective_timeout_s: float = 60.0) -> list[Check]:
    """Every check, in the order of the module docstring (under a launcher the collective comes first, so that every
    rank meets the others before spending time alone)."""
    ctx = Context(cfg, collective_timeout_s)
    checks = [check_devices(ctx)]
    if ctx.world > 1:
        checks.append(check_collective(ctx))
    checks += [check_dtype(ctx), check_versions(ctx), *check_kernels(ctx), check_attention(ctx)]
    if ctx.world <= 1:
        checks.append(check_collective(ctx))
    checks.append(check_weights(ctx))
    checks += check_reward_weights(cfg)
    checks.append(check_prompts(ctx))
    if ctx.need_text and cfg.model.source != "tiny" and ctx.model_dir is not None:
        checks.append(check_weights(ctx, need_text=True))
    checks += [check_memory(ctx), check_disk(ctx), check_trackers(ctx)]
    return checks


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  status   detail"]
    lines += [f"{c.name:<{width}}  {c.status:<7}  {c.detail}" for c in checks]
    return "\n".join(lines)


def main(cfg, collective_timeout_s: float = 60.0) -> int:
    """Print the table (rank 0; other ranks print only their failures), one line per failure; 0 or 2."""
    checks = run_checks(cfg, collective_timeout_s)
    rank = int(os.environ.get("RANK", "0"))
    failures = [c for c in checks if c.status == "fail"]
    if rank == 0:
        print(format_table(checks), flush=True)
        skipped = [c.name for c in checks if c.status == "skipped"]
        if skipped:
            print(f"skipped: {', '.join(skipped)}", flush=True)
        import torch

        if not torch.cuda.is_available():
            print(
                "CPU machine: the kernels ran under Triton's interpreter (not compiled for a GPU); no GPU memory, "
                "GPU dtype or NCCL was checked (on a GPU machine doctor checks them)",
                flush=True,
            )
    prefix = f"rank {rank}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    for c in failures:
        print(f"leapalign-fast doctor: {prefix}{c.name} failed: {c.fix}", file=sys.stderr, flush=True)
    if rank == 0:
        verdict = f"{len(failures)} check(s) failed" if failures else "nothing failed"
        print(f"doctor: {verdict} ({len(checks)} checks)", flush=True)
    _close_process_group()
    return 2 if failures else 0


def _close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
