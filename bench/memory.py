"""Activation memory, peak memory and step time of the trainer's own training step, per method and N.

    python bench/memory.py --model mid                  # CPU: 4+8-block FLUX (18M), 256 px, tiny VAE, colour reward
    python bench/memory.py --quick                      # CPU: tiny FLUX, 64 px (< 1 min; writes to a temp dir)
    python bench/memory.py --model flux-dev             # GPU: FLUX.1-dev transformer + VAE shapes, random weights,
                                                        # the setup of configs/flux_leapalign.toml (LoRA, bf16)
    python bench/memory.py --model sd35-medium          # GPU: SD3.5-Medium shapes, configs/sd35_medium_leapalign.toml
    python bench/memory.py --model flux2-klein-9b       # GPU: FLUX.2-Klein-base 9B shapes,
    configs/flux2_klein_leapalign.toml
    python bench/memory.py --model qwen-image           # GPU: Qwen-Image shapes, configs/qwen_image_leapalign.toml
    python bench/memory.py --model z-image-turbo        # GPU: Z-Image-Turbo shapes, configs/zimage_leapalign.toml
    python bench/memory.py --model wan2.1-1.3b          # GPU: Wan 2.1 T2V-1.3B, 480x832 x 33 frames,
                                                        # configs/wan21_1.3b_leapalign.toml (wan2.2-5b: TI2V-5B)
    python bench/memory.py --model random-tiny-wan --set num_frames=9   # CPU: the Wan path at toy size
    python bench/memory.py --quick --set model.family=sd3   # CPU: any backbone at the tiny size

The step is the trainer's: `train.Trainer` is built from a Config (dtype, LoRA, autocast through accelerate,
activation checkpointing, compile), and each measured step is its `micro_step` seam, the one the training loop
runs (inputs, the method's loss, `accelerator.backward`), instrumented by part. Only the weights and,
at full size, the prompt embeddings are random (memory and speed do not depend on their values); full-size
weights are built directly in the model dtype on the device.

Per row (method, N, resolution, decode checkpointing):
- `activation_mib`: bytes autograd keeps for a backward, counted by saved-tensor hooks over distinct storages,
  *excluding* parameter and buffer storages (they exist without the step), plus the inputs a recomputed
  (checkpointed) decode/reward holds; the storages still alive at the end of the reward's forward or at the start
  of the trainer's backward, whichever is larger. Split into `transformer` (saved inside the transformer's
  forwards), `decode_reward` (VAE decoder + reward) and `other` (Euler chain, connectors, casts). It is the
  activation peak that grows with N.
- `peak_rss_mib` (CPU): the process's peak resident memory during a step above its resident memory before the
  step, median over the counted and the timed steps, with min and max; with `--rss-isolated`, measured in a
  fresh process per method instead (Linux VmHWM, reset per step through /proc/self/clear_refs; glibc is told to
  return freed blocks of
  64 KiB or more to the OS so resident memory follows live memory). On CUDA: `peak_mib` (allocator peak above
  the memory allocated before the step) and `nvml_used_mib` (the device CUDA_VISIBLE_DEVICES maps to).
- `seconds`: median over `--repeats` measured steps, the methods of one (N, resolution) interleaved in each
  repeat, with min and max (spread = (max - min) / median); split into sampling (no-grad forwards), grad
  forwards, decode + reward (forwards), backward (the trainer's), other (the rest of the step: a backward inside
  the method, such as LeapAlign's reward-first decode + reward backward, the connectors, the Euler steps).
A method may carry settings, `name:key=value,key=value` (e.g. `leapalign:reward_first=false`, LeapAlign with its
grad forwards inside the trajectory); ratios are full over every other row.
Writes JSON (command, versions, hardware), a markdown table and a plot under `--out` (default bench/results/,
or a temporary directory with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after site-packages: an installed leapalign_fast (with its kernels) wins

# Resident memory must follow live memory: glibc otherwise keeps freed blocks (its mmap threshold grows up to
# 32 MiB) and RSS never falls. Read by glibc at start-up, so the script re-executes itself once with it set.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

from bench.common import paired_ratio  # noqa: E402
from bench.random_models import RANDOM_MODELS, RANDOM_RESOLUTIONS, random_weights  # noqa: E402

POINT = ("num_steps", "resolution", "checkpoint_decode")  # what makes two rows the same measurement point

MODELS = {  # TinyFluxConfig sizes of the CPU models, with their default resolution
    "tiny": (dict(), 64),
    "mid": (dict(layers=4, single_layers=8, heads=4, head_dim=64, text_dim=64, vae_channels=16), 256),
}


def bench_config(args, tmp: Path):
    """The Config whose run is measured: a CPU model size, or a FLUX config file (full size, random weights)."""
    from leapalign_fast.config import TinyFluxConfig, load_config

    if args.model in MODELS:
        cfg = load_config(args.config, args.set) if args.config else load_config(None, args.set)
        if not args.config:  # the tiny default's setup: full fine-tune, float32, colour reward
            cfg.model.tiny = TinyFluxConfig(**MODELS[args.model][0])
    else:
        family, config_file = RANDOM_MODELS[args.model][:2]
        cfg = load_config(args.config or ROOT / "configs" / config_file, args.set)
        cfg.model.source, cfg.model.family = f"random:{args.model}", family
    cfg.output_dir, cfg.resume, cfg.prompt_file, cfg.prompts, cfg.report_to = str(tmp), False, "", "", []
    cfg.batch_size = args.batch
    cfg.reward.name, cfg.reward.options = args.reward, json.loads(args.reward_options)
    if args.reward == "colour":  # build_run checks every prompt names a colour; the evaluation prompts are unused
        cfg.eval_prompts = ["a red square", "a green circle", "a blue triangle", "a yellow star"]
    if args.checkpoint_decode is not None:
        cfg.model.checkpoint_decode = args.checkpoint_decode == "on"
    return cfg


class SavedBytes:
    """Storages autograd saves for backward, by the part of the step that saved them, counted while alive.

    `snapshot()` sums the saved storages still alive (a weak reference per storage); the count is the largest
    snapshot, taken at the end of each reward forward (the decode + reward graph complete) and at the start of the
    backward (every graph the backward needs). A method that finishes the reward's backward before its transformer
    forwards (LeapAlign's reward-first order) never holds the two at once, and the count says so."""

    def __init__(self, excluded: set[int]):
        self.excluded, self.part, self.storages, self.excluded_bytes = excluded, "other", {}, {}
        self.peak: dict[str, float] = {}

    def pack(self, t):
        from torch.multiprocessing.reductions import StorageWeakRef

        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr in self.excluded:
            self.excluded_bytes[ptr] = s.nbytes()
        elif ptr not in self.storages or self.storages[ptr][2].expired():  # new, or a freed storage's address reused
            self.storages[ptr] = (self.part, s.nbytes(), StorageWeakRef(s))
        return t

    def snapshot(self) -> None:
        alive = [(p, n) for p, n, ref in self.storages.values() if not ref.expired()]
        if sum(n for _, n in alive) / 2**20 >= sum(self.peak.values()):
            self.peak = {
                part: sum(n for p, n in alive if p == part) / 2**20
                for part in ("transformer", "decode_reward", "other")
            }

    def hold(self, part: str, tensors) -> None:
        """Tensors kept alive by a recomputed function's closure (its inputs): saved, though no hook sees them."""
        previous, self.part = self.part, part
        for t in tensors:
            if hasattr(t, "untyped_storage") and t.requires_grad:
                self.pack(t)
        self.part = previous

    @contextlib.contextmanager
    def within(self, module, part: str):
        """Attribute what `module`'s forwards save to `part` (forward hooks: nested modules keep the outer part)."""
        state = {}

        def pre(mod, args):
            state["previous"], self.part = self.part, part

        def post(mod, args, out):
            self.part = state["previous"]

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def mib(self, part: str | None = None) -> float:
        """The largest snapshot (all parts), or that snapshot's `part`."""
        return sum(self.peak.values()) if part is None else self.peak.get(part, 0.0)


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Hand freed heap pages back to the OS (small blocks freed between live ones stay resident otherwise: the
    baseline would grow with every large step), then reset VmHWM to the current RSS."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def nvml_used_mib(device) -> float | None:
    """Device memory in use on the GPU that `device` is (NVML numbering differs under CUDA_VISIBLE_DEVICES)."""
    import torch

    try:
        return torch.cuda.device_memory_used(device) / 2**20
    except Exception:  # no NVML: the allocator numbers stand alone
        return None


class Timer:
    """Wall time per part of the step; synchronizes CUDA around each timed call."""

    def __init__(self, cuda: bool):
        self.cuda, self.seconds = cuda, {"sampling": 0.0, "grad_forwards": 0.0, "decode_reward": 0.0, "backward": 0.0}

    def wrap(self, fn, part=None):
        import torch

        def timed(*args):
            p = part or ("grad_forwards" if torch.is_grad_enabled() else "sampling")
            if self.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args)
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[p] += time.perf_counter() - t0
            return out

        return timed


def trainer_step(run, method, timer: Timer, saved: SavedBytes | None) -> None:
    """One micro-step of the trainer (`Trainer.micro_step`, the training loop's own), timed by part, saved tensors
    counted; the gradients are dropped instead of stepped."""
    import torch

    from leapalign_fast import train

    ckpt = run.cfg.model.checkpoint_decode

    def held(fn, part, snapshot=False):  # a recomputed function's inputs stay alive until its backward
        def call(*args):
            if saved is not None and ckpt:
                saved.hold(part, args)
            out = fn(*args)
            if saved is not None and snapshot:  # the decode + reward graph is complete here
                saved.snapshot()
            return out

        return call

    def instrument(fn, part):
        if part == "velocity":
            return timer.wrap(fn)  # sampling or grad_forwards, by grad mode
        if part in ("decode", "reward"):
            return timer.wrap(held(fn, "decode_reward", snapshot=part == "reward"), "decode_reward")
        return timer.wrap(fn, part)

    @contextlib.contextmanager
    def counted():  # every graph the backward needs is alive when the method returns
        if saved is None:
            yield
            return
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            yield
        saved.snapshot()

    idx = list(range(run.cfg.batch_size))
    run.micro_step(idx, train.step_generator(run.cfg.seed, 0, 0, 0), method, instrument, counted)
    run.optimizer.zero_grad(set_to_none=True)


def method_variant(spec: str, lam: float, n: int):
    """`name` or `name:key=value,...` (values in TOML syntax) -> that method's validated settings."""
    import tomllib

    from leapalign_fast.config import check_numbers, method_from_table

    name, _, rest = spec.partition(":")
    table = {"name": name, "lam": lam}
    for item in filter(None, re.split(r",(?![^\[]*\])", rest)):  # a comma inside [...] belongs to a list value
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"bench/memory.py: method setting '{item}' in '{spec}' must be key=value")
        table[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
    settings = method_from_table(table)
    check_numbers(settings, "method.")
    settings.validate(n)
    return settings


def measure(run, method_name: str, n: int, res: int, saved_parts) -> dict:
    """One counted step: activation bytes by part, peak memory."""
    import torch

    from leapalign_fast import train
    from leapalign_fast.methods import build_method

    cuda = run.accelerator.device.type == "cuda"
    size = tuple(int(s) for s in res.split("x")) if isinstance(res, str) else res  # "HxW": non-square
    run.geometry = run.backbone.layout(run.components, size, run.cfg.num_frames)
    run.sigmas = run.backbone.schedule(run.components, n, run.geometry, device=run.accelerator.device)
    method = build_method(method_variant(method_name, run.cfg.method.lam, n), n)  # its own (published) defaults
    excluded = {
        t.untyped_storage().data_ptr()
        for m in (train.unwrap(run.transformer), run.components.vae, run.reward)
        for t in [*m.parameters(), *m.buffers()]
    }
    saved = SavedBytes(excluded)
    row = {
        "method": method_name,
        "num_steps": n,
        "resolution": res,
        "batch": run.cfg.batch_size,
        "checkpoint_decode": run.cfg.model.checkpoint_decode,
    }
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            row["rss_reset"] = reset_peak_rss()
            before = rss_mib()
        with contextlib.ExitStack() as stack:
            for module, part in saved_parts:
                stack.enter_context(saved.within(module, part))
            trainer_step(run, method, Timer(cuda), saved)
        row["activation_mib"] = saved.mib()
        row["activation_by_part_mib"] = {p: saved.mib(p) for p in ("transformer", "decode_reward", "other")}
        row["parameters_saved_mib"] = sum(saved.excluded_bytes.values()) / 2**20  # not counted above
        if cuda:
            torch.cuda.synchronize()
            row["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
            row["allocated_before_mib"] = before / 2**20
            row["nvml_used_mib"] = nvml_used_mib(run.accelerator.device)
        else:
            row["peak_rss_mib"] = rss_mib("VmHWM") - before if row["rss_reset"] else None
            row["rss_before_mib"] = before
        row["oom"] = False
    except torch.cuda.OutOfMemoryError as e:
        row.update(oom=True, error=str(e).splitlines()[0])
        run.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return row, method


def timed_repeats(run, methods: dict, repeats: int) -> dict[str, list[dict]]:
    """`repeats` rounds, each running every method once in turn (interleaved: load drifts hit all alike). A method
    whose step runs out of device memory is timed no further: its list ends with {"oom": message}."""
    from bench.common import free_device_memory, is_oom

    cuda = run.accelerator.device.type == "cuda"
    out = {m: [] for m in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            if out[name] and "oom" in out[name][-1]:
                continue
            timer = Timer(cuda)
            before = rss_mib() if not cuda and reset_peak_rss() else None  # after the reset: trimmed baseline
            t0 = time.perf_counter()
            try:
                trainer_step(run, method, timer, None)
            except Exception as e:
                if not is_oom(e):
                    raise
                out[name].append({"oom": str(e).splitlines()[0]})
                run.optimizer.zero_grad(set_to_none=True)
                free_device_memory()
                continue
            step = time.perf_counter() - t0
            out[name].append(
                {
                    "step": step,
                    **timer.seconds,
                    "other": step - sum(timer.seconds.values()),
                    "peak_rss": None if before is None else rss_mib("VmHWM") - before,
                }
            )
    return out


def summarize_times(samples: list[dict]) -> dict:
    steps = [s["step"] for s in samples]
    med = statistics.median(steps)
    return {
        "step_seconds": med,
        "step_seconds_min": min(steps),
        "step_seconds_max": max(steps),
        "step_seconds_all": steps,
        "spread": (max(steps) - min(steps)) / med if med else 0.0,
        "repeats": len(steps),
        "seconds": {k: statistics.median(s[k] for s in samples) for k in samples[0] if k not in ("step", "peak_rss")},
    }


def ratios(rows: list[dict]) -> list[dict]:
    """full / each other method (`method`) per (N, resolution, decode checkpointing), for every memory count
    (`full_over_<count>`) and the step time."""
    out = []
    keys = [
        ("activation_mib", None),
        ("transformer", "activation_by_part_mib"),
        ("peak_rss_mib", None),
        ("peak_mib", None),
    ]
    for r in rows:
        if r["method"] == "full" or r["oom"]:
            continue
        full = next(
            (f for f in rows if f["method"] == "full" and not f["oom"] and all(f[k] == r[k] for k in POINT)), None
        )
        if full is None:
            continue
        entry = {k: r[k] for k in ("method", *POINT)}
        for key, parent in keys:
            a = (r.get(parent) or {}).get(key) if parent else r.get(key)
            b = (full.get(parent) or {}).get(key) if parent else full.get(key)
            if a and b:
                entry[f"full_over_{key}"] = b / a
        if "step_seconds" not in r or "step_seconds" not in full:
            out.append(entry)
            continue
        entry["step_seconds_ratio"] = full["step_seconds"] / r["step_seconds"]
        entry["step_seconds_ratio_paired"] = paired_ratio(full["step_seconds_all"], r["step_seconds_all"])  # same round
        out.append(entry)
    return out


def variant_ratios(rows: list[dict]) -> list[dict]:
    """Each `name:key=value` row against its method at the defaults (same N, resolution, decode checkpointing):
    variant / default for the memory counts, and step time round by round (paired: median [min, max])."""
    out = []
    for r in rows:
        base = next(
            (
                b
                for b in rows
                if ":" in r["method"] and b["method"] == r["method"].split(":")[0] and all(b[k] == r[k] for k in POINT)
            ),
            None,
        )
        if base is None or r["oom"] or base["oom"]:
            continue
        entry = {"variant": r["method"], "method": base["method"], **{k: r[k] for k in POINT}}
        for key in ("activation_mib", "peak_rss_mib", "peak_mib"):
            if r.get(key) and base.get(key):
                entry[f"variant_over_method_{key}"] = r[key] / base[key]
        if "step_seconds_all" in r and "step_seconds_all" in base:
            entry["step_seconds_ratio_paired"] = paired_ratio(r["step_seconds_all"], base["step_seconds_all"])
        out.append(entry)
    return out


def flatness(rows: list[dict], method: str = "leapalign") -> list[dict]:
    """Relative change of each memory count from the smallest to the largest N."""
    out = []
    for res, ck in sorted({(r["resolution"], r["checkpoint_decode"]) for r in rows}):
        pts = sorted(
            (
                r
                for r in rows
                if r["method"] == method and r["resolution"] == res and r["checkpoint_decode"] == ck and not r["oom"]
            ),
            key=lambda r: r["num_steps"],
        )
        if len(pts) < 2:
            continue
        entry = {
            "method": method,
            "resolution": res,
            "checkpoint_decode": ck,
            "from_n": pts[0]["num_steps"],
            "to_n": pts[-1]["num_steps"],
        }
        for key in ("activation_mib", "peak_rss_mib", "peak_mib"):
            a, b = pts[0].get(key), pts[-1].get(key)
            if a and b is not None:
                entry[f"{key}_change"] = (b - a) / a
        out.append(entry)
    return out


def write_outputs(rows: list[dict], out: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    md = [
        "| method | N | res | decode ckpt | activation MiB | transformer | decode+reward | other | peak MiB | "
        "step s (median) | spread | sampling s | grad fwd s | decode+reward s | backward s | other s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["oom"]:
            md.append(
                f"| {r['method']} | {r['num_steps']} | {r['resolution']} | {r['checkpoint_decode']} | OOM |" + " |" * 11
            )
            continue
        p = r["activation_by_part_mib"]
        s = {
            "other": float("nan"),
            **(
                r.get("seconds")
                or dict.fromkeys(("sampling", "grad_forwards", "decode_reward", "backward"), float("nan"))
            ),
        }
        peak = r.get("peak_mib", r.get("peak_rss_mib"))
        md.append(
            f"| {r['method']} | {r['num_steps']} | {r['resolution']} | {'on' if r['checkpoint_decode'] else 'off'} | "
            f"{r['activation_mib']:.1f} | {p['transformer']:.1f} | {p['decode_reward']:.1f} | {p['other']:.1f} | "
            f"{'n/a' if peak is None else f'{peak:.1f}'} | {r.get('step_seconds', float('nan')):.3f} | "
            f"{100 * r.get('spread', float('nan')):.0f}% | "
            f"{s['sampling']:.3f} | {s['grad_forwards']:.3f} | {s['decode_reward']:.3f} | {s['backward']:.3f} | "
            f"{s['other']:.3f} |"
        )
    paths = [out / f"{name}.md"]
    paths[0].write_text("\n".join(md) + "\n")
    for res in sorted({r["resolution"] for r in rows}):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for m, ck in dict.fromkeys((r["method"], r["checkpoint_decode"]) for r in rows):
            pts = [
                r
                for r in rows
                if (r["method"], r["checkpoint_decode"]) == (m, ck) and r["resolution"] == res and not r["oom"]
            ]
            label = f"{m}{'' if ck else ' (decode kept)'}"
            axes[0].plot([r["num_steps"] for r in pts], [r["activation_mib"] for r in pts], marker="o", label=label)
            axes[1].plot(
                [r["num_steps"] for r in pts],
                [r.get("step_seconds", float("nan")) for r in pts],
                marker="o",
                label=label,
            )
        axes[0].set(xlabel="sampling steps N", ylabel="activation memory (MiB)", title=f"memory vs N, {res} px")
        axes[1].set(xlabel="sampling steps N", ylabel="step time (s, median)", title=f"time vs N, {res} px")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"{name}_{res}px.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def isolated_rss(rows: list[dict], args, argv: list[str]) -> None:
    """Replace each row's peak RSS by the one measured in a fresh process running only that method (warm-up, then
    one step per N, smallest N first); the shared-process number stays as `peak_rss_mib_shared_process`."""
    import subprocess

    for m in args.methods:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                *argv,
                "--methods",
                m,
                "--repeats",
                "0",
                "--out",
                tmp,
                "--tag",
                "child",
            ]
            cmd = [c for c in cmd if c != "--rss-isolated"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            child = json.loads(next(Path(tmp).glob("*.json")).read_text())["rows"]
        for c in child:
            for r in rows:
                if all(r[k] == c[k] for k in ("method", *POINT)) and not r["oom"]:
                    r["peak_rss_mib_shared_process"] = r.get("peak_rss_mib")
                    r["peak_rss_mib"] = c.get("peak_rss_mib")
                    r["peak_rss_isolated"] = True
                    for k in ("peak_rss_mib_min", "peak_rss_mib_max"):
                        r.pop(k, None)


def _resolution(value: str):
    """512 -> 512 (a square); 480x832 -> "480x832" (height x width, kept as the rows' label)."""
    parts = value.lower().split("x")
    if not all(p.isdigit() for p in parts) or len(parts) > 2:
        raise argparse.ArgumentTypeError(f"resolution {value!r}: give pixels, 512 or HxW such as 480x832")
    return int(value) if len(parts) == 1 else "x".join(parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, 64 px, N 10 and 50, 1 repeat; temp output")
    p.add_argument(
        "--model",
        choices=[*MODELS, *RANDOM_MODELS],
        default=None,
        help="default: mid on CPU, flux-dev on GPU (random-tiny*: the full-size code path at toy size)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the run config whose step is measured (default: the tiny default's setup for tiny/mid, "
        "the backbone's configs/*_leapalign.toml for the full-size models)",
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, as on the CLI")
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument(
        "--resolutions", type=_resolution, nargs="+", default=None, help="pixels: 512 (square) or HxW, e.g. 480x832"
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--checkpoint-decode",
        choices=["on", "off", "both"],
        default=None,
        help="recompute decode + reward in the backward (default: the config's model.checkpoint_decode)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed steps per row, interleaved across methods")
    p.add_argument("--reward", default="colour", help="reward name (its graph counts in the memory)")
    p.add_argument(
        "--reward-options",
        default="{}",
        help='JSON, e.g. \'{"clip": "...", "checkpoint": "...", "dtype": "bfloat16"}\' for hpsv2.1',
    )
    p.add_argument("--out", type=Path, default=None, help="default: bench/results (a temp dir with --quick)")
    p.add_argument("--tag", default="", help="suffix of the output file names (e.g. lora)")
    p.add_argument(
        "--jsonl",
        type=Path,
        default=None,
        help="also append each row to this JSONL file the moment it is measured (a run stopped from outside keeps "
        "the finished rows; the JSON, table and plot are written at the end)",
    )
    p.add_argument(
        "--rss-isolated",
        action="store_true",
        help="CPU: peak RSS from one fresh process per method (a large step of another method leaves the "
        "allocator's heap fragmented, which raises the resident memory of the steps after it)",
    )
    p.add_argument(
        "--estimate",
        action="store_true",
        help="a full-size model without a GPU: count its step's memory on the meta device (bench/meta_memory.py)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.model = args.model or "tiny"
        args.repeats = min(args.repeats, 1)
        if args.steps == [10, 25, 50]:
            args.steps = [10, 50]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.estimate:  # no step runs: shapes only, on the meta device
        from bench import meta_memory

        return meta_memory.main(
            ["--model", args.model or "wan2.1-1.3b", *(["--out", str(args.out)] if args.out else [])]
        )
    if sys.platform == "linux" and any(k not in os.environ for k in _MALLOC_ENV) and not args.dry_run:
        os.environ.update(_MALLOC_ENV)
        os.execv(
            sys.executable,
            [sys.executable, str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:])],
        )
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: a busy machine must not spin-wait
    if args.methods is None:
        from leapalign_fast.methods import METHODS

        args.methods = list(METHODS)  # every registered method, each with its own (published) defaults
    if args.dry_run:  # the plan, without importing torch
        from leapalign_fast.config import load_config

        full_size = args.model in RANDOM_MODELS and not args.config
        load_config(ROOT / "configs" / RANDOM_MODELS[args.model][1] if full_size else args.config, args.set)
        print(
            f"plan: model {args.model or 'mid on CPU, flux-dev on GPU'}, methods {args.methods}, N {args.steps}, "
            f"resolutions {args.resolutions or 'default'}, batch {args.batch}, decode checkpointing "
            f"{args.checkpoint_decode or 'from config'}, {args.repeats} interleaved repeats, out "
            f"{args.out or 'default'}"
        )
        return 0
    import torch

    from bench.common import append_row, slug, write_result
    from leapalign_fast import train
    from leapalign_fast.config import config_dict
    from leapalign_fast.threads import describe_threads

    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    args.model = args.model or ("flux-dev" if cuda else "mid")
    if args.model in RANDOM_RESOLUTIONS and not cuda:
        print(
            f"bench/memory.py --model {args.model} needs a CUDA GPU (full size); use --model mid on CPU, or "
            "--estimate (counted on the meta device)",
            file=sys.stderr,
        )
        return 2
    res_list = args.resolutions or {**{k: [v[1]] for k, v in MODELS.items()}, **RANDOM_RESOLUTIONS}.get(
        args.model, [64]
    )
    variants = {"on": [True], "off": [False], "both": [True, False], None: [None]}[args.checkpoint_decode]
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-memory-")) if args.quick else ROOT / "bench" / "results")
    print(f"bench/memory.py: {describe_threads()}", flush=True)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(args, Path(tmp))
        AcceleratorState._reset_state()
        GradientState._reset_state()
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not cuda)
        with random_weights(args.model, device) if args.model in RANDOM_MODELS else contextlib.nullcontext():
            run = train.Trainer(cfg, accelerator)
        n_params = sum(p.numel() for p in train.unwrap(run.transformer).parameters())
        parts = [
            (train.unwrap(run.transformer), "transformer"),
            (run.components.vae.decoder, "decode_reward"),
            (run.reward, "decode_reward"),
        ]
        for ck in variants:
            if ck is not None:
                run.cfg.model.checkpoint_decode = ck
            for res in res_list:
                warm = set()
                for n in args.steps:
                    group, methods = [], {}
                    for m in args.methods:
                        if m not in warm:  # lazy inits (and compilation) outside the measured steps
                            row, method = measure(run, m, n, res, parts)
                            warm.add(m)
                        row, method = measure(run, m, n, res, parts)
                        group.append(row)
                        if not row["oom"]:
                            methods[m] = method
                    times = timed_repeats(run, methods, args.repeats)
                    for row in group:
                        timed = [t for t in times.get(row["method"], []) if "oom" not in t]
                        if len(timed) < len(times.get(row["method"], [])):  # the counted step fit, a timed one not
                            row["timing_oom"] = times[row["method"]][-1]["oom"]
                        if not row["oom"] and timed:
                            row.update(summarize_times(timed))
                            rss = [
                                x for x in [row.get("peak_rss_mib"), *(t["peak_rss"] for t in timed)] if x is not None
                            ]
                            if rss:  # resident memory moves with the allocator's reuse: median over every step
                                row["peak_rss_mib_counted_step"] = row["peak_rss_mib"]
                                row.update(
                                    peak_rss_mib=statistics.median(rss),
                                    peak_rss_mib_min=min(rss),
                                    peak_rss_mib_max=max(rss),
                                )
                        rows.append(row)
                        append_row(args.jsonl, {"bench": "memory", "model": args.model, **row})
                        print(
                            f"{row['method']:>10} N={n:<3} {res}px "
                            f"decode-ckpt={'on' if row['checkpoint_decode'] else 'off':<3} "
                            f"activation {row.get('activation_mib', float('nan')):8.2f} MiB "
                            f"(transformer "
                            f"{row.get('activation_by_part_mib', {}).get('transformer', float('nan')):.2f}) "
                            f"peak {row.get('peak_mib', row.get('peak_rss_mib')) or float('nan'):8.1f} MiB  "
                            f"step {row.get('step_seconds', float('nan')):7.3f} s ±{100 * row.get('spread', 0):.0f}%"
                            f"{'  OOM' if row['oom'] else ''}",
                            flush=True,
                        )
    if args.rss_isolated and not cuda:
        isolated_rss(rows, args, argv if argv is not None else sys.argv[1:])
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    name = f"memory_{args.model}_{slug(gpu)}{'_' + slug(args.tag) if args.tag else ''}"
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": args.model,
        "device": device,
        "transformer_parameters": n_params,
        "rows": rows,
        "ratios": ratios(rows),
        "variant_ratios": variant_ratios(rows),
        "flatness": flatness(rows),
        "config": config_dict(cfg),
        "threads": describe_threads(),
        "malloc_env": {k: os.environ.get(k) for k in _MALLOC_ENV},
        "wall_seconds": time.perf_counter() - t0,
        "note": "random weights (and, at full size, random prompt embeddings); the trainer's own step",
    }
    path = write_result(out / f"{name}.json", payload)
    extra = write_outputs(rows, out, name)
    for r in payload["ratios"]:
        counts = ", ".join(
            f"{k.removeprefix('full_over_')} {v:.2f}x" for k, v in r.items() if k.startswith("full_over")
        )
        paired = r.get("step_seconds_ratio_paired", {}).get("median")
        print(
            f"full/{r['method']} N={r['num_steps']} {r['resolution']}px "
            f"decode-ckpt={'on' if r['checkpoint_decode'] else 'off'}: "
            f"{counts}{'' if paired is None else f', step time {paired:.2f}x (paired median)'}"
        )
    for r in payload["variant_ratios"]:
        counts = ", ".join(
            f"{k.removeprefix('variant_over_method_')} {v:.2f}x" for k, v in r.items() if k.startswith("variant_over")
        )
        paired = r.get("step_seconds_ratio_paired", {})
        print(
            f"{r['variant']}/{r['method']} N={r['num_steps']}: {counts}"
            + (
                f", step time {paired['median']:.2f}x [{paired['min']:.2f}, {paired['max']:.2f}] (paired)"
                if paired
                else ""
            )
        )
    for f in payload["flatness"]:
        print("flatness", {k: round(v, 4) if isinstance(v, float) else v for k, v in f.items()})
    print("wrote", path, *extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
