"""Sampler throughput and peak memory: ours (eager, eager + CUDA graph, compiled, compiled + CUDA graph) vs
diffusers' FluxPipeline eager, same transformer, dtype, steps, resolution and prompt embeddings. The eager
variants are timed before the (in-place) compile; within a phase, repeats are interleaved and medians reported.

    python bench/sampler.py                 # GPU: full-size FLUX.1-dev transformer config, RANDOM bf16 weights and
                                            # prompt embeddings (speed and memory do not depend on the values),
                                            # 512 and 1024 px, 28 steps
    python bench/sampler.py --quick         # CPU: tiny FLUX, eager vs FluxPipeline (checks the script)

On a GPU machine without diffusers or a package index: bench/gpu_prepare.sh here, bench/gpu_run.sh there.
Both paths denoise only (the VAE decode is the same code in both and is excluded); images/s counts trajectories.
Writes JSON under bench/results/ (--quick: a temporary directory, never over committed results).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after site-packages: an installed leapalign_fast (with its kernels) wins

from bench.common import interleaved_times, paired_ratio, peak_rss_mib, slug, time_summary, write_result  # noqa: E402
from leapalign_fast.flow import flux_schedule  # noqa: E402
from leapalign_fast.models.fast import GraphedVelocity, compile_transformer  # noqa: E402
from leapalign_fast.models.flux import FluxVelocity, TinyFluxConfig, build_tiny_flux, latent_image_ids  # noqa: E402
from leapalign_fast.sampler import sample_trajectory  # noqa: E402


def build(kind: str, device: str):
    """(transformer, vae_scale_factor, text_len, text_dim, pooled_dim)"""
    if kind == "tiny":
        return build_tiny_flux(TinyFluxConfig(), seed=0).transformer.to(device), 8, 32, 32, 32
    from diffusers import FluxTransformer2DModel

    from bench.memory import FLUX_DEV

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: an fp32 build would first take 48 GiB
    try:
        with torch.device(device):
            tr = FluxTransformer2DModel(**FLUX_DEV).eval()
    finally:
        torch.set_default_dtype(previous)
    return tr.requires_grad_(False), 8, 512, 4096, 768


def pipeline_runner(transformer, steps, res, embeds):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    # output_type="latent": the pipeline reads only the VAE's config (8x, scaling/shift): a tiny one of the same
    # layout stands in for the 84M-parameter FLUX VAE.
    vae = build_tiny_flux(TinyFluxConfig(vae_channels=8), seed=0).vae.to(transformer.device)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    t5, pooled, noise = embeds

    def run():
        with torch.no_grad():
            return pipe(prompt_embeds=t5, pooled_prompt_embeds=pooled, latents=noise, height=res, width=res,
                        num_inference_steps=steps, guidance_scale=3.5, output_type="latent", return_dict=False)[0]  # fmt: skip

    return run


def ours_runner(transformer, steps, res, embeds, graphed: bool):
    t5, pooled, noise = embeds
    h = res // 8
    velocity = FluxVelocity(transformer, t5, pooled, latent_image_ids(h, h, noise.device), 3.5)
    if graphed:
        velocity = GraphedVelocity(transformer).bind(velocity)
    sigmas = flux_schedule(steps, noise.shape[1], device=noise.device)

    def run():
        with torch.no_grad():
            return sample_trajectory(velocity, noise, sigmas).x0

    return run


def timed_interleaved(variants: list[tuple[str, callable]], reps: int, cuda: bool) -> dict[str, dict]:
    """Warm every variant up (compilation, graph capture, allocator), measure each one's peak memory alone (CUDA:
    the allocator's peak; CPU: the process's peak RSS), then time them interleaved (A B C, A B C, ...) so drift
    (clocks, heat, other load) hits all alike; median, min, max, spread, and each variant's round-by-round ratio to
    the first (the reference)."""
    stats = {}
    for name, run in variants:
        run()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        run()
        if cuda:
            torch.cuda.synchronize()
        stats[name] = {"peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = interleaved_times(dict(variants), reps, sync=sync, warmup=0)
    first = variants[0][0]
    for name, ts in times.items():
        stats[name].update(time_summary(ts))
        stats[name]["time_ratio_vs_" + first] = paired_ratio(ts, times[first])
    return stats


def bench_resolution(kind: str, device: str, res: int, steps: int, batch: int, reps: int, cuda: bool) -> list[dict]:
    transformer, vsf, text_len, text_dim, pooled_dim = build(kind, device)
    dtype = next(transformer.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    tokens = (res // vsf // 2) ** 2
    embeds = (torch.randn(batch, text_len, text_dim, generator=g).to(device, dtype),
              torch.randn(batch, pooled_dim, generator=g).to(device, dtype),
              torch.randn(batch, tokens, 64, generator=g).to(device, dtype))  # fmt: skip
    # Eager variants first: compiling is in place, so anything timed after it runs compiled.
    phases = [[("flux_pipeline_eager", pipeline_runner(transformer, steps, res, embeds)),
               ("ours_eager", ours_runner(transformer, steps, res, embeds, graphed=False))]]  # fmt: skip
    if cuda:
        phases[0].append(("ours_eager_cuda_graph", ours_runner(transformer, steps, res, embeds, graphed=True)))
    reference = phases[0][0][1]()
    rows = []
    for variants in phases + ([None] if cuda else []):
        if variants is None:  # the compiled phase, built only after the eager one is timed
            compile_transformer(transformer, "regional")
            variants = [("ours_compiled", ours_runner(transformer, steps, res, embeds, graphed=False)),
                        ("ours_compiled_cuda_graph", ours_runner(transformer, steps, res, embeds, graphed=True))]  # fmt: skip
        for name, stat in timed_interleaved(variants, reps, cuda).items():
            run = dict(variants)[name]
            r = {"variant": name, "resolution": res, "steps": steps, "batch": batch, "dtype": str(dtype), **stat}
            r["images_per_second"] = batch / r["seconds_median"]
            r["max_abs_diff_vs_pipeline"] = (run().float() - reference.float()).abs().max().item()
            rows.append(r)
            print(f"{res}px {name:>26}: {r['images_per_second']:.3f} img/s (median of {reps})  "
                  f"peak {r['peak_mib']:.0f} MiB  max|diff| {r['max_abs_diff_vs_pipeline']:.2e}",
                  flush=True)  # fmt: skip
    base = next(r for r in rows if r["variant"] == "flux_pipeline_eager")
    for r in rows:
        r["speedup_vs_pipeline"] = r["images_per_second"] / base["images_per_second"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--resolutions", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="default: bench/results (a temp dir with --quick)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    if not cuda and not args.quick:
        print("bench/sampler.py needs a CUDA GPU; --quick checks the script on CPU", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    kind = "flux-dev" if cuda else "tiny"
    res_list = args.resolutions or ([512, 1024] if cuda else [64])
    steps = args.steps if cuda else 6
    out = args.out or (Path(tempfile.mkdtemp(prefix="sampler-quick-")) if args.quick else ROOT / "bench" / "results")
    rows = []
    for res in res_list:
        # One 12B model alive at a time: the previous resolution's model and graphs are gone before this build.
        rows += bench_resolution(kind, device, res, steps, args.batch, args.reps if cuda else 3, cuda)
        gc.collect()
        if cuda:
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    path = write_result(out / f"sampler_{kind}_{slug(gpu)}.json", {"model": kind, "rows": rows,
                        "note": "random weights and prompt embeddings; denoising only; times are medians of "
                                "interleaved repeats"})  # fmt: skip
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
