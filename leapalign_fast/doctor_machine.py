"""`leapalign-fast doctor`'s checks of the machine: its devices and dtypes, the installed versions, each Triton kernel
against its reference, the attention backend, the collective across the ranks, the trackers; and the record every
check returns (`Check`) with what the checks share (`Context`). The command is leapalign_fast/doctor.py."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from leapalign_fast.errors import UserError

GIB = 1 << 30
STATUSES = ("ok", "warn", "fail", "skipped")


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skipped
    detail: str
    fix: str = ""  # for a failure: what to do, one line


class Context:
    """What the checks share: the config, this rank's device, the model's components once built."""

    def __init__(self, cfg, collective_timeout_s: float):
        import torch

        self.cfg, self.timeout_s = cfg, collective_timeout_s
        self.rank, self.world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", self.local_rank) if self.cuda else torch.device("cpu")
        if self.cuda and self.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(self.device)  # Triton launches on the current device
        self.backbone = self.components = None
        self.need_text = True
        self.model_dir: Path | None = None
        self.build_error: str | None = None


def check_devices(ctx: Context) -> Check:
    import torch

    if not ctx.cuda:
        return Check("devices", "ok", f"CPU only ({os.cpu_count()} cores, {platform.machine()}); no CUDA device")
    n = torch.cuda.device_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if ctx.local_rank >= n or local_world > n:
        return Check(
            "devices",
            "fail",
            f"{n} CUDA device(s) on this node, {local_world} process(es) launched here (LOCAL_RANK={ctx.local_rank})",
            f"launch at most {n} processes per node (--nproc_per_node / num_processes), or check CUDA_VISIBLE_DEVICES",
        )
    p = torch.cuda.get_device_properties(ctx.device)
    return Check(
        "devices",
        "ok",
        f"{n} x {p.name}; this rank: cuda:{ctx.local_rank}, sm_{p.major}{p.minor}, {p.total_memory / GIB:.1f} GiB",
    )


def dtype_support(device) -> dict[str, bool]:
    """Whether a matmul runs in each dtype on `device`, and whether TF32 exists there (Ampere or newer)."""
    import torch

    out = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)):
        try:
            a = torch.ones(8, 8, device=device, dtype=dtype)
            out[name] = bool(torch.isfinite(a @ a).all()) and (
                device.type != "cuda" or name != "bfloat16" or torch.cuda.is_bf16_supported()
            )
        except RuntimeError:
            out[name] = False
    out["tf32"] = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    return out


def check_dtype(ctx: Context) -> Check:
    cfg = ctx.cfg
    support = dtype_support(ctx.device)
    want = {cfg.model.dtype, {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}[cfg.mixed_precision]}
    have = ", ".join(k for k, v in support.items() if v) or "none"
    lacking = sorted(d for d in want if not support.get(d))
    if lacking:
        return Check(
            "dtype",
            "fail",
            f"{', '.join(lacking)} does not run on {ctx.device.type} (runs: {have})",
            "set model.dtype / mixed_precision to a dtype this device runs (bf16 needs an Ampere or newer GPU)",
        )
    from leapalign_fast.preflight import mixed_precision_note

    if (note := mixed_precision_note(cfg)) is not None:  # accelerate launch's config says another precision
        return Check("dtype", "warn", note)
    if cfg.model.tf32 and not support["tf32"]:
        return Check("dtype", "warn", f"model.tf32=true has no effect on {ctx.device.type}; runs: {have}")
    return Check("dtype", "ok", f"model.dtype={cfg.model.dtype}, mixed_precision={cfg.mixed_precision}; runs: {have}")


VERSIONED = ("torch", "triton", "diffusers", "transformers", "accelerate", "peft", "flash-attn")


def requirement_problems(requirements: list[str]) -> list[str]:
    """The requirements (PEP 508 strings) this environment does not satisfy, as `name: wants X, has Y`."""
    from packaging.requirements import Requirement

    problems = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{req.name}: wants {req.specifier or 'any'}, not installed")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req.name}: wants {req.specifier}, has {have}")
    return problems


def project_requirements() -> list[str]:
    try:
        return [r for r in importlib.metadata.requires("leapalign-fast") or [] if "extra ==" not in r]
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return []


def check_versions(ctx: Context, requirements: list[str] | None = None) -> Check:
    import torch

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    parts = [f"python {platform.python_version()}"] + [f"{n} {version(n)}" for n in VERSIONED]
    parts.insert(2, f"CUDA {torch.version.cuda or 'none (CPU build)'}")
    problems = requirement_problems(project_requirements() if requirements is None else requirements)
    if problems:
        return Check(
            "versions",
            "fail",
            "; ".join(problems),
            "install the versions pyproject.toml asks for: pip install -e . (CI's set: pip install -c "
            ".ci/locked-cpu.txt -e .)",
        )
    return Check("versions", "ok", ", ".join(parts))


def _kernel_cases() -> dict:
    """Kernel name -> run(impl, x_pred, x_real, d_j, d_0, grad): every output and the gradient to x_pred, through the
    public op with impl="triton" (the kernel) or its PyTorch reference (impl="reference")."""
    import torch

    from leapalign_fast.kernels.connector import connect, connect_discount
    from leapalign_fast.kernels.similarity import similarity_weight

    def connector(impl, x_pred, x_real, d_j, d_0, grad):
        conn, dist = connect(x_pred, x_real, impl=impl)
        (g,) = torch.autograd.grad(conn, x_pred, grad)
        return [conn.detach(), dist, g]

    def connector_discount(impl, x_pred, x_real, d_j, d_0, grad):
        conn, disc, dist = connect_discount(x_pred, x_real, 0.3, impl=impl)
        (g,) = torch.autograd.grad((conn, disc), x_pred, (grad, grad.flip(-1)))
        return [conn.detach(), disc.detach(), dist, g]

    def similarity(impl, x_pred, x_real, d_j, d_0, grad):
        return [similarity_weight(d_j, d_0, 0.05, impl=impl)]

    return {"connect": connector, "connect_discount": connector_discount, "similarity_weight": similarity}


def check_kernels(ctx: Context) -> list[Check]:
    """Each Triton kernel against its reference on this rank's device, in the config's dtype."""
    import torch

    from leapalign_fast.kernels._triton import interpret_mode
    from leapalign_fast.models.backbone import DTYPES

    if not ctx.cuda and not interpret_mode():
        return [Check("kernels", "skipped", "no GPU, and TRITON_INTERPRET=1 was not set before triton was imported")]
    try:
        import triton
    except ImportError:
        return [Check("kernels", "fail", "triton is not installed", "pip install triton (it comes with CUDA torch)")]
    dtype = DTYPES[ctx.cfg.model.dtype]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    how = f"compiled for {torch.cuda.get_device_name(ctx.device)}" if ctx.cuda else "interpreted (TRITON_INTERPRET=1)"
    checks = []
    for name, run in _kernel_cases().items():
        g = torch.Generator().manual_seed(0)
        x_real = torch.randn(2, 257, 64, generator=g).to(ctx.device, dtype)
        x_pred = torch.randn(2, 257, 64, generator=g).to(ctx.device, dtype).requires_grad_(True)
        grad = torch.randn(2, 257, 64, generator=g).to(ctx.device, dtype)
        d_j, d_0 = (torch.rand(37, generator=g).to(ctx.device) * 0.2 for _ in range(2))
        t0 = time.perf_counter()
        try:
            got = run("triton", x_pred, x_real, d_j, d_0, grad)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot compile or launch here is this check's verdict
            line = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            checks.append(
                Check(
                    f"kernel:{name}",
                    "fail",
                    f"does not run on {ctx.device} ({type(e).__name__}: {line})",
                    f"check the triton {triton.__version__} / CUDA install for this GPU",
                )
            )
            continue
        seconds = time.perf_counter() - t0
        want = run("reference", x_pred, x_real, d_j, d_0, grad)
        err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, want))
        scale = max(float(b.float().abs().max()) for b in want)
        if not err <= tol * max(scale, 1.0):
            checks.append(
                Check(
                    f"kernel:{name}",
                    "fail",
                    f"{how}: differs from its PyTorch reference by {err:.3g} (tolerance {tol * max(scale, 1.0):.3g})",
                    "the kernel computes wrong values on this device: do not train here; report this line with the "
                    "GPU and the triton version",
                )
            )
        else:
            checks.append(Check(f"kernel:{name}", "ok", f"{how}, {dtype}: max |diff| {err:.2g} ({seconds:.2f} s)"))
    return checks


def check_attention(ctx: Context) -> Check:
    from leapalign_fast.models.backbone import DTYPES
    from leapalign_fast.models.fast import resolve_attention

    cfg = ctx.cfg
    try:
        backend = resolve_attention(cfg.model.attention, ctx.device, DTYPES[cfg.model.dtype], True, cfg.model.compile)
    except UserError as e:
        return Check("attention", "fail", str(e), "set model.attention to a backend this machine has (native: SDPA)")
    how = {"native": "PyTorch SDPA", "flash": "FlashAttention 2 (flash-attn)"}.get(backend, "diffusers backend")
    return Check("attention", "ok", f"model.attention={cfg.model.attention} -> {backend} ({how}) on {ctx.device}")


def check_collective(ctx: Context) -> Check:
    """An all_reduce across every rank when launched distributed (torchrun / accelerate launch env vars)."""
    if ctx.world <= 1:
        return Check("collective", "skipped", "not launched distributed (WORLD_SIZE unset or 1)")
    import datetime

    import torch
    import torch.distributed as dist

    fix = (
        "every rank must start with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT reachable from all nodes "
        "(check --nnodes/--nproc_per_node, the rendezvous address and the firewall, NCCL_SOCKET_IFNAME)"
    )
    if not 0 <= ctx.rank < ctx.world:
        return Check("collective", "fail", f"RANK={ctx.rank} is outside WORLD_SIZE={ctx.world}", fix)
    backend = "nccl" if ctx.cuda else "gloo"
    started = time.perf_counter()
    try:
        if not dist.is_initialized():
            if ctx.cuda:
                torch.cuda.set_device(ctx.device)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=ctx.timeout_s))
        value = torch.full((1,), float(ctx.rank + 1), device=ctx.device)
        dist.all_reduce(value)
        got, want = float(value.item()), ctx.world * (ctx.world + 1) / 2  # host sync
    except Exception as e:  # noqa: BLE001 - a rendezvous or collective failure is this check's verdict
        line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return Check(
            "collective",
            "fail",
            f"{backend} all_reduce over WORLD_SIZE={ctx.world} failed after "
            f"{time.perf_counter() - started:.0f} s ({type(e).__name__}: {line})",
            fix,
        )
    if got != want:
        return Check("collective", "fail", f"{backend} all_reduce gave {got}, not {want}", fix)
    return Check(
        "collective",
        "ok",
        f"{backend} all_reduce over {ctx.world} ranks in {time.perf_counter() - started:.2f} s (rank {ctx.rank})",
    )


def check_trackers(ctx: Context) -> Check:
    import importlib.util

    names = ctx.cfg.report_to
    if not names:
        return Check("trackers", "ok", 'report_to="none": metrics.jsonl only')
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        return Check(
            "trackers",
            "fail",
            f"report_to names {', '.join(missing)}, not installed",
            f"pip install 'leapalign-fast[{missing[0]}]' (or {missing[0]}), or drop it from report_to",
        )
    if "wandb" in names:
        mode = os.environ.get("WANDB_MODE", "")
        if mode not in ("offline", "disabled", "dryrun") and not _wandb_logged_in():
            return Check(
                "trackers",
                "fail",
                "report_to has wandb, which is neither logged in (WANDB_API_KEY, ~/.netrc) nor offline",
                "`wandb login`, set WANDB_API_KEY, or WANDB_MODE=offline (then `wandb sync` later)",
            )
        return Check("trackers", "ok", f"{', '.join(names)} (WANDB_MODE={mode or 'online'})")
    return Check("trackers", "ok", ", ".join(names))


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
