"""Peak and activation memory and step time of every method vs the number of sampling steps N.

    python bench/memory.py --quick                       # CPU, tiny FLUX, N in {10, 25, 50}, 64 px (< 2 min)
    python bench/memory.py --model flux-dev              # GPU: full-size FLUX.1-dev transformer config, random
                                                         # bf16 weights, LoRA r16, N in {10, 25, 50}, 256/512/1024 px

One measured training step per (method, N, resolution), after one warm-up step, on the same sampler, rewards
and random weights (memory and speed do not depend on the values; random prompt embeddings stand in for T5).
Reported per row:
- CUDA: `peak_mib` (torch allocator peak during the step), `nvml_used_mib` (device memory in use, NVML, at the
  end of the step), `activation_mib` = peak - allocated before the step.
- CPU: `activation_mib` = the bytes autograd saved for backward during the step (unique storages, counted by
  saved-tensor hooks: every activation a grad-enabled forward keeps is one of them; all are alive at the
  start of the backward, so their sum is the activation peak). The CPU allocator has no peak counter and
  process RSS never falls, so this is the exact, repeatable measure of what grows with N.
- `seconds` split into `sampling` (no-grad forwards), `grad_forwards`, `backward`, `reward` (decode + reward).
An out-of-memory error is a result (`"oom": true`), not a crash. Writes JSON, a markdown table and plots
(memory vs N and time vs N, one line per method) under bench/results/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import slug, write_result  # noqa: E402
from leapalign_fast.config import FLUX_LORA_TARGETS  # noqa: E402
from leapalign_fast.flow import flux_schedule  # noqa: E402
from leapalign_fast.methods import METHODS as REGISTRY, StepInputs, build_method, method_settings  # noqa: E402
from leapalign_fast.models.flux import (  # noqa: E402
    FluxComponents,
    FluxVelocity,
    TinyFluxConfig,
    build_tiny_flux,
    decode_latents,
    latent_image_ids,
)
from leapalign_fast.rewards import build_reward  # noqa: E402

METHODS = list(REGISTRY)  # every registered method, each with its own (published) defaults
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))  # fmt: skip
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False)  # fmt: skip


def build_model(kind: str, device: str):
    """(components, text_dim, pooled_dim, text_len): random weights of the tiny or full-size FLUX classes."""
    if kind == "tiny":
        c = build_tiny_flux(TinyFluxConfig(), seed=0)
        c.text = None
        return c, 32, 32, 32
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from peft import LoraConfig

    with torch.device(device):
        transformer = FluxTransformer2DModel(**FLUX_DEV).to(torch.bfloat16)
        vae = AutoencoderKL(**FLUX_VAE).to(torch.bfloat16).eval()
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=FLUX_LORA_TARGETS))
    vae.requires_grad_(False)
    return FluxComponents(transformer, vae, None), 4096, 768, 512


class Timer:
    """Accumulates wall time per category; synchronizes CUDA around each timed call."""

    def __init__(self, cuda: bool):
        self.cuda, self.seconds = cuda, {"sampling": 0.0, "grad_forwards": 0.0, "backward": 0.0, "reward": 0.0}

    def wrap(self, fn, category=None):
        def timed(*args):
            cat = category or ("grad_forwards" if torch.is_grad_enabled() else "sampling")
            if self.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args)
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[cat] += time.perf_counter() - t0
            return out

        return timed


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward (the activations)."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, t):
        s = t.untyped_storage()
        self.storages[s.data_ptr()] = s.nbytes()
        return t

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20


def measure(method: str, n: int, res: int, comps, dims, batch: int, device: str, reward) -> dict:
    text_dim, pooled_dim, text_len = dims
    cuda = device == "cuda"
    h = w = res // comps.vae_scale_factor
    dtype = next(comps.transformer.parameters()).dtype
    params = [p for p in comps.transformer.parameters() if p.requires_grad]
    fn = build_method(method_settings(method, lam=1.0), n)
    sigmas = flux_schedule(n, (h // 2) * (w // 2))
    row = {"method": method, "num_steps": n, "resolution": res, "batch": batch}

    def step(timer, saved):
        g = torch.Generator().manual_seed(0)
        t5 = torch.randn(batch, text_len, text_dim, generator=g).to(device, dtype)
        pooled = torch.randn(batch, pooled_dim, generator=g).to(device, dtype)
        velocity = timer.wrap(FluxVelocity(comps.transformer, t5, pooled, latent_image_ids(h, w, device), 3.5))
        decode = timer.wrap(lambda x: decode_latents(comps.vae, x, h, w), "reward")
        noise = torch.randn(batch, (h // 2) * (w // 2), 64, generator=g).to(device, dtype)
        inputs = StepInputs(velocity, noise, sigmas, decode, timer.wrap(reward, "reward"), ["a red square"] * batch, g)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            out = fn(inputs)
        timer.wrap(lambda: out.loss.backward(), "backward")()
        for p in params:
            p.grad = None

    try:
        step(Timer(cuda), SavedBytes())  # warm-up: allocator pools, lazy inits
        timer, saved = Timer(cuda), SavedBytes()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        step(timer, saved)
        row["seconds"] = {k: round(v, 6) for k, v in timer.seconds.items()}
        row["step_seconds"] = sum(timer.seconds.values())
        row["saved_activation_mib"] = saved.mib
        if cuda:
            row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            row["activation_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
            row["nvml_used_mib"] = _nvml_used_mib()
        else:
            row["activation_mib"] = saved.mib
        row["oom"] = False
    except torch.cuda.OutOfMemoryError as e:
        row.update(oom=True, error=str(e).splitlines()[0])
        for p in params:
            p.grad = None
        torch.cuda.empty_cache()
    return row


def _nvml_used_mib() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / 2**20
    except Exception:  # no NVML (CPU machine): the allocator numbers stand alone
        return None


def write_outputs(rows: list[dict], out: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    md = ["| method | N | res | activation MiB | peak MiB | step s | sampling s | grad fwd s | backward s | reward s |",
          "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["oom"]:
            md.append(f"| {r['method']} | {r['num_steps']} | {r['resolution']} | OOM | OOM | | | | | |")
            continue
        s = r["seconds"]
        peak = f"{r['peak_mib']:.1f}" if "peak_mib" in r else "n/a"
        md.append(f"| {r['method']} | {r['num_steps']} | {r['resolution']} | {r['activation_mib']:.1f} | "
                  f"{peak} | {r['step_seconds']:.3f} | {s['sampling']:.3f} | "
                  f"{s['grad_forwards']:.3f} | {s['backward']:.3f} | {s['reward']:.3f} |")  # fmt: skip
    paths = [out / f"{name}.md"]
    paths[0].write_text("\n".join(md) + "\n")
    for res in sorted({r["resolution"] for r in rows}):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = [r for r in rows if r["method"] == m and r["resolution"] == res and not r["oom"]]
            axes[0].plot([r["num_steps"] for r in pts], [r["activation_mib"] for r in pts], marker="o", label=m)
            axes[1].plot([r["num_steps"] for r in pts], [r["step_seconds"] for r in pts], marker="o", label=m)
        axes[0].set(xlabel="sampling steps N", ylabel="activation memory (MiB)", title=f"memory vs N, {res} px")
        axes[1].set(xlabel="sampling steps N", ylabel="step time (s)", title=f"time vs N, {res} px")
        axes[0].legend()
        fig.tight_layout()
        paths.append(out / f"{name}_{res}px.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, 64 px")
    p.add_argument("--model", choices=["tiny", "flux-dev"], default=None)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--resolutions", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reward", default="colour", help="reward name (its weights count in the memory)")
    p.add_argument("--reward-options", default="{}", help='JSON, e.g. \'{"clip": "...", "checkpoint": "...", '
                   '"dtype": "bfloat16"}\' for hpsv2.1')  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    kind = args.model or ("tiny" if args.quick or device == "cpu" else "flux-dev")
    res_list = args.resolutions or ([64] if kind == "tiny" else [256, 512, 1024])
    comps, *dims = build_model(kind, device)
    comps.transformer.to(device)
    comps.vae.to(device)
    if kind == "tiny":  # train everything, as the tiny default does
        comps.transformer.requires_grad_(True)
    import json

    reward = build_reward(args.reward, **json.loads(args.reward_options)).to(device)
    reward_mib = sum(t.numel() * t.element_size() for t in reward.state_dict().values()) / 2**20
    rows = []
    t0 = time.perf_counter()
    for res in res_list:
        for n in args.steps:
            for m in args.methods:
                rows.append(measure(m, n, res, comps, dims, args.batch, device, reward))
                r = rows[-1]
                print(f"{m:>10} N={n:<3} {res}px  activation {r.get('activation_mib', float('nan')):9.2f} MiB  "
                      f"step {r.get('step_seconds', float('nan')):7.3f} s{'  OOM' if r['oom'] else ''}", flush=True)  # fmt: skip
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    name = f"memory_{kind}_{slug(gpu)}"
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_result(args.out / f"{name}.json", {"model": kind, "device": device, "rows": rows,
                                                    "reward": args.reward, "reward_weights_mib": reward_mib,
                                                    "wall_seconds": time.perf_counter() - t0,
                                                    "note": "random weights and prompt embeddings"})  # fmt: skip
    extra = write_outputs(rows, args.out, name)
    print("wrote", path, *extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
