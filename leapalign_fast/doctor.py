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

Nothing is downloaded and nothing is written; the model's weights are not read (its transformer is built on the meta
device from its config; a tiny model is built).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
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


# ---- measurements (the checks' only view of the machine's free space) --------------------------------------------


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def free_device_bytes(device) -> int | None:
    from leapalign_fast.preflight import available_bytes

    return available_bytes(device)


# ---- the checks --------------------------------------------------------------------------------------------------


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


def hub_fix(state: str, key: str, value: str) -> str:
    """The fix for a Hub status that stops a run (`key`: the config key that names `value`)."""
    return {
        "missing": f"download it first (`hf download {value}` with the same HF_HOME, or one run with network access), "
        f"or set {key} to a local copy",
        "gated": f"accept {value}'s license on its Hub page, then `hf auth login` (or set HF_TOKEN)",
        "not-found": f"check {key} (and model.revision)",
    }.get(state, f"check {key}")


def check_weights(ctx: Context, need_text: bool = False) -> Check:
    """model.source present / stale / missing / gated / not found, without downloading: the parts every run reads,
    or (`need_text`: some prompts are not cached) the text encoders too. Sets ctx.backbone and ctx.model_dir."""
    from leapalign_fast import hub
    from leapalign_fast.models.backbone import backbone_for

    cfg, source = ctx.cfg, ctx.cfg.model.source
    name = "text-encoders" if need_text else "weights"
    if source == "tiny":
        ctx.backbone = backbone_for(cfg.model)
        return Check(name, "ok", "model.source=tiny: a random model of the real classes, built here")
    state = hub.status(source, cfg.model.revision or None, hub.model_patterns(need_text))
    if state.state not in ("local", "present", "stale"):
        fix = hub_fix(state.state, "model.source", source)
        if need_text:
            fix = f"some prompts are not cached, so the run needs the text encoders: {fix}, or run encode-prompts first"
        return Check(name, "fail", f"model.source {state.state}: {state.detail}", fix)
    ctx.model_dir = state.path
    if need_text and state.state == "local":  # a local folder: are the text encoders' files there at all
        found = [f for pattern in hub.TEXT_PATTERNS for f in Path(state.path).glob(pattern)]
        if not found:
            return Check(
                name,
                "fail",
                f"model.source {state.path} has no text_encoder*/ or tokenizer*/ files",
                "some prompts are not cached, so the run needs the text encoders: add them to the folder, or run "
                "encode-prompts where they are and copy output_dir/prompt_cache here",
            )
    if ctx.backbone is None:
        try:
            ctx.backbone = backbone_for(cfg.model)
        except UserError as e:
            return Check(name, "fail", str(e), "set model.family, or fix the folder's model_index.json")
    return Check(name, "warn" if state.state == "stale" else "ok", f"model.source {state.state}: {state.detail}")


def _reward_sources() -> dict[str, list[tuple[str, str, list[str] | None]]]:
    """Reward name -> (option, its default source, the files a run reads of a repository; None: one file) for the
    rewards whose builders read published weights (rewards/clip_rewards.py, rewards/imagereward.py)."""
    from leapalign_fast.rewards import clip_rewards as cr
    from leapalign_fast.rewards import imagereward as ir

    tokenizer = ["config.json", *cr.TOKENIZER_FILES]
    weights = [*tokenizer, "model.safetensors*"]
    return {
        "clip": [("path", cr.CLIP_L, weights)],
        "pickscore": [("path", cr.PICKSCORE, weights), ("tokenizer", cr.CLIP_H, tokenizer)],
        "hpsv2.1": [("clip", cr.CLIP_H, tokenizer), ("checkpoint", cr.HPS_V21, None)],
        "aesthetic": [("clip", cr.CLIP_L, weights), ("mlp", cr.AESTHETIC_MLP, None)],
        "imagereward": [("checkpoint", ir.IMAGEREWARD, None), ("tokenizer", ir.BERT, ir.BERT_FILES)],
    }


def check_reward_weights(cfg) -> list[Check]:
    """Each weight source the reward (or each part of a weighted sum) reads: its option, else its published default;
    a local path exists, a Hub id / hf:// file is present / stale / missing / gated (nothing downloaded)."""
    from leapalign_fast import hub
    from leapalign_fast.rewards import parse_mixture

    name, options = cfg.reward.name, cfg.reward.options
    mixture = "," in name or ":" in name
    parts = {p: options.get(p, {}) for p in parse_mixture(name)} if mixture else {name: options}
    sources = _reward_sources()
    checks = []
    for part, opts in parts.items():
        wanted = [(o, opts.get(o) or default, files) for o, default, files in sources.get(part, [])]
        if part not in sources and isinstance(opts, dict) and opts.get("path"):  # toy rewards: their weight files
            paths = opts["path"] if isinstance(opts["path"], list) else [opts["path"]]
            wanted = [("path", p, None) for p in paths]
        for option, value, files in wanted:
            what = f"reward {part}: options.{option}"
            ref = hub.parse(value)
            if ref is not None and ref.filename:
                files = [ref.filename]
            state = hub.status(value, None, files, ref.repo_type if ref else "model", what)
            bad = state.state not in ("present", "stale", "local")
            detail = state.detail if state.detail.startswith(what) else f"{what} {state.state}: {state.detail}"
            checks.append(
                Check(
                    "reward-weights",
                    "fail" if bad else ("warn" if state.state == "stale" else "ok"),
                    detail,
                    hub_fix(state.state, f"reward.options.{option}", ref.repo_id if ref else str(value)) if bad else "",
                )
            )
    return checks


def _published_prompt_set(cfg) -> Check | None:
    """`prompts = "<published set>"` read from its Hub dataset: a failure when its files are not there to read (not
    cached offline, gated, not found), without downloading them; None when they are (or the prompts are local)."""
    from leapalign_fast import hub
    from leapalign_fast.prompts import PROMPT_SETS

    name, _, where = cfg.prompts.partition(":")
    spec = PROMPT_SETS.get(name)
    if spec is None or where or spec.repo is None:
        return None
    state = hub.status(spec.repo, None, list(spec.files.values()), "dataset", f"prompts {name}")
    if state.state in ("present", "stale"):
        return None
    fix = hub_fix(state.state, "prompts", f"{spec.repo} --repo-type dataset")
    return Check("prompts", "fail", f"prompt set {name} {state.state}: {state.detail}", fix)


def check_prompts(ctx: Context) -> Check:
    """Each prompt set's embedding cache in output_dir (keyed by model and prompts): present, missing or stale."""
    from leapalign_fast.build import prompt_cache_path, train_prompts
    from leapalign_fast.models.text import check_prompt_cache
    from leapalign_fast.prompts import validation_prompts

    cfg = ctx.cfg
    if ctx.backbone is None:
        return Check("prompts", "skipped", "no backbone (see weights)")
    published = _published_prompt_set(cfg)
    if published is not None:
        return published
    try:
        sets = {"training": train_prompts(cfg), "eval_prompts": list(cfg.eval_prompts)}
        sets.update({"validation": v for v in validation_prompts(cfg)})
    except UserError as e:
        return Check("prompts", "fail", str(e), "fix prompts / prompt_file / eval_prompt_file")
    present, missing, stale = [], [], []
    for label, prompts in sets.items():
        path = prompt_cache_path(cfg, ctx.backbone, prompts)
        problem = check_prompt_cache(path, prompts)
        if problem is None:
            present.append(label)
        elif not path.parent.exists():
            missing.append(label)
        else:
            stale.append(f"{label} ({path.parent}: {problem})")
    ctx.need_text = bool(missing or stale)
    counts = f"{len(sets['training'])} training prompts"
    if stale:
        return Check(
            "prompts",
            "fail",
            f"prompt cache stale: {'; '.join(stale)}",
            f"rerun `leapalign-fast encode-prompts` with this config (it encodes them again), or delete {stale[0]}",
        )
    if missing:
        return Check(
            "prompts",
            "warn",
            f"{counts}; not cached yet: {', '.join(missing)} (rank 0 loads the text encoders and encodes them at "
            "start; `leapalign-fast encode-prompts` does it ahead)",
        )
    return Check("prompts", "ok", f"{counts}; cached and verified: {', '.join(present)}")


def _build_components(ctx: Context) -> str | None:
    """The model's components for the estimates (transformer on the meta device); None, or why they could not be."""
    from leapalign_fast.models.backbone import DTYPES

    cfg = ctx.cfg
    if ctx.build_error is not None:
        return ctx.build_error
    if ctx.backbone is None:
        return "no backbone (see weights)"
    if cfg.model.source == "tiny":
        ctx.components = ctx.backbone.build_tiny(cfg.model.tiny, cfg.seed)
        return None
    if ctx.model_dir is None:
        return "the model's weights are not here (see weights)"
    try:
        ctx.components = ctx.backbone.load(
            ctx.model_dir,
            DTYPES[cfg.model.dtype],
            need_text=False,
            max_sequence_length=cfg.model.max_sequence_length,
            empty_transformer=True,
        )
    except UserError as e:
        ctx.build_error = str(e)
        return ctx.build_error
    return None


def _unbuilt(name: str, ctx: Context, why: str) -> Check:
    """Skipped when the weights are not here (the weights check failed); a failure when a folder that is here does
    not load (an incomplete or damaged model directory)."""
    if ctx.model_dir is None or ctx.backbone is None:
        return Check(name, "skipped", why)
    return Check(name, "fail", why, "complete or re-download model.source (the parts named above)")


def _trainable_numel(ctx: Context) -> int:
    """Parameters the run trains: every transformer parameter, or LoRA's A and B of each targeted Linear."""
    import torch

    from leapalign_fast.build import lora_targets

    transformer = ctx.components.transformer
    if not ctx.cfg.lora.enabled:
        return sum(p.numel() for p in transformer.parameters())
    targets, rank = lora_targets(ctx.cfg, ctx.backbone), ctx.cfg.lora.rank
    return sum(
        rank * (m.in_features + m.out_features)
        for n, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
    )


def check_memory(ctx: Context) -> Check:
    """Free device memory against the weights, the trained state and preflight's lower bound of one micro-step."""
    from leapalign_fast.models.backbone import DTYPES
    from leapalign_fast.preflight import step_bytes

    cfg = ctx.cfg
    why = _build_components(ctx) if ctx.components is None else None
    if why is not None:
        return _unbuilt("memory", ctx, why)
    comps = ctx.components
    elem = DTYPES[cfg.model.dtype].itemsize
    shards = ctx.world if cfg.fsdp else 1
    frozen = sum(p.numel() for p in comps.transformer.parameters()) * elem // shards
    frozen += sum(p.numel() for p in comps.vae.parameters()) * elem
    # float32 weights (LoRA / the upcast copy), gradients, two Adam moments, the EMA
    trained = _trainable_numel(ctx) * 4 * (4 + (cfg.ema_decay > 0)) // shards
    geometry = ctx.backbone.geometry(comps, cfg.image_size)
    step = step_bytes(cfg, ctx.backbone, comps, geometry)
    need, free = frozen + trained + step, free_device_bytes(ctx.device)
    parts = f"weights {frozen / GIB:.2f} + trained state {trained / GIB:.2f} + one micro-step {step / GIB:.2f} GiB"
    if free is None:
        return Check("memory", "skipped", f"needs at least {need / GIB:.2f} GiB ({parts}); free memory unknown")
    where = f"free on {ctx.device}: {free / GIB:.2f} GiB"
    if need > free:
        return Check(
            "memory",
            "fail",
            f"needs at least {need / GIB:.2f} GiB ({parts}); {where}",
            "lower batch_size (use grad_accum), the resolution or the method's step counts, enable "
            "model.gradient_checkpointing, LoRA or fsdp=true, or free the device",
        )
    return Check("memory", "ok", f"needs at least {need / GIB:.2f} GiB ({parts}); {where}")


def check_disk(ctx: Context) -> Check:
    """Free disk at output_dir against the checkpoints kept (one more while a save is written) and the export."""
    cfg = ctx.cfg
    why = _build_components(ctx) if ctx.components is None else None
    if why is not None:
        return _unbuilt("disk", ctx, why)
    trainable = _trainable_numel(ctx) * 4  # float32
    ema = cfg.ema_decay > 0
    checkpoint = trainable * (1 + ema + 2)  # weights, EMA, Adam's two moments
    export = trainable * (1 + ema)
    need = (cfg.keep_checkpoints + 1) * checkpoint + export
    free = free_disk_bytes(Path(cfg.output_dir))
    detail = (
        f"{cfg.keep_checkpoints + 1} checkpoints of {checkpoint / GIB:.3f} GiB + export {export / GIB:.3f} GiB = "
        f"{need / GIB:.3f} GiB; free at {cfg.output_dir}: {free / GIB:.1f} GiB"
    )
    if need > free:
        return Check(
            "disk",
            "fail",
            detail,
            "free disk space, point output_dir at a larger disk, or lower keep_checkpoints",
        )
    return Check("disk", "ok", detail)


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


# ---- the command -------------------------------------------------------------------------------------------------


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
