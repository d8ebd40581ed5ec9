"""Sampler throughput and peak memory of any backbone: ours (eager, eager + CUDA graph, compiled, compiled + CUDA
graph) vs the family's diffusers pipeline eager (`Backbone.pipeline_sample`), same transformer, dtype, steps,
resolution, guidance and prompt embeddings. The eager variants are timed before the (in-place) compile; within a
phase, repeats are interleaved and medians reported.

    python bench/sampler.py                       # GPU: full-size FLUX.1-dev (--backbone flux), RANDOM bf16 weights
                                                  # and prompt embeddings (speed and memory do not depend on the
                                                  # values), 512 and 1024 px, 28 steps, its config's guidance
    python bench/sampler.py --backbone sd3        # GPU: SD3.5-Medium; flux2: FLUX.2-Klein-base 9B; qwenimage:
                                                  # Qwen-Image (bench/random_models.py RANDOM_MODELS: shapes and config)
    python bench/sampler.py --quick --backbone X  # CPU: the same path at toy size, float32, eager vs the pipeline

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

from bench.common import (  # noqa: E402
    append_row,
    free_device_memory,
    interleaved_times,
    is_oom,
    paired_ratio,
    peak_rss_mib,
    slug,
    time_summary,
    write_result,
)
from bench.random_models import RANDOM_MODELS, RANDOM_RESOLUTIONS  # noqa: E402
from leapalign_fast.models.backbone import BACKBONES, get_backbone  # noqa: E402
from leapalign_fast.models.fast import GraphedVelocity, compile_transformer  # noqa: E402
from leapalign_fast.sampler import sample_trajectory  # noqa: E402


def model_kind(family: str, full_size: bool) -> str:
    """The bench/random_models.py random-weight model of `family`: its full size, or its toy-size stand-in on CPU."""
    kinds = [k for k, spec in RANDOM_MODELS.items() if spec[0] == family and k.startswith("random-tiny") != full_size]
    if not kinds:
        raise SystemExit(
            f"bench/sampler.py: no {'full-size' if full_size else 'toy'} model of backbone {family} in "
            "bench/random_models.py RANDOM_MODELS"
        )
    return kinds[0]


def build(kind: str, device: str, dtype: torch.dtype, batch: int, max_sequence_length: int):
    """(backbone, components, conditioning) of a random-weight model, built directly in `dtype` on `device` (a
    float32 build of a 12B model would first take 48 GiB); conditioning: random tensors of the cache's shapes."""
    family, _, build_components, shapes = RANDOM_MODELS[kind]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            comps = build_components()
    finally:
        torch.set_default_dtype(previous)
    comps.transformer.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    cond = {
        k: (torch.ones(batch, *s, dtype=torch.long) if k.endswith("mask") else torch.randn(batch, *s, generator=g))
        for k, s in shapes(max_sequence_length).items()
    }
    cond = {k: v.to(device) if k.endswith("mask") else v.to(device, dtype) for k, v in cond.items()}
    return get_backbone(family), comps, cond


def pipeline_runner(backbone, comps, cond, noise, geom, steps, guidance):
    return lambda: backbone.pipeline_sample(comps, cond, noise, geom, steps, guidance)


def ours_runner(backbone, comps, cond, noise, geom, steps, guidance, graphed: bool):
    velocity = backbone.velocity(comps.transformer, cond, geom, guidance)
    if graphed:
        velocity = GraphedVelocity(comps.transformer).bind(velocity)
    sigmas = backbone.schedule(comps, steps, geom, device=noise.device)

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


def bench_resolution(
    kind: str,
    device: str,
    dtype,
    res: int,
    steps: int,
    batch: int,
    reps: int,
    cuda: bool,
    guidance: float,
    max_sequence_length: int,
    num_frames: int = 1,
    jsonl: Path | None = None,
) -> list[dict]:
    """Rows of every variant at `res`; each phase's rows are appended to `jsonl` as soon as they are timed, and a
    phase that runs out of device memory gives rows with `oom` (the next phase still runs)."""
    backbone, comps, cond = build(kind, device, dtype, batch, max_sequence_length)
    size = tuple(int(s) for s in res.split("x")) if isinstance(res, str) else res  # "HxW": non-square
    geom = backbone.layout(comps, size, num_frames if backbone.video else 1)
    noise = torch.randn(*geom.noise_shape(batch), generator=torch.Generator().manual_seed(0))
    noise = noise.to(device, backbone.noise_dtype(dtype))
    args = (backbone, comps, cond, noise, geom, steps, guidance)
    # Eager variants first: compiling is in place, so anything timed after it runs compiled.
    phases = [[("pipeline_eager", pipeline_runner(*args)), ("ours_eager", ours_runner(*args, graphed=False))]]
    graphs = cuda and backbone.graphable  # Z-Image: prompt-dependent shapes, no CUDA graph
    if graphs:
        phases[0].append(("ours_eager_cuda_graph", ours_runner(*args, graphed=True)))
    reference = phases[0][0][1]()
    rows = []
    base = None
    for variants in phases + ([None] if cuda else []):
        if variants is None:  # the compiled phase, built only after the eager one is timed
            compile_transformer(comps.transformer, "regional")
            variants = [("ours_compiled", ours_runner(*args, graphed=False))]
            if graphs:
                variants.append(("ours_compiled_cuda_graph", ours_runner(*args, graphed=True)))
        common = {
            "bench": "sampler",
            "model": kind,
            "backbone": backbone.name,
            "pipeline": backbone.pipeline,
            "resolution": res,
            "steps": steps,
            "batch": batch,
            "guidance": guidance,
            "dtype": str(dtype),
        }
        try:
            stats = timed_interleaved(variants, reps, cuda)
        except Exception as e:
            if not is_oom(e):
                raise
            free_device_memory()
            for name, _ in variants:
                rows.append({"variant": name, **common, "oom": True, "error": str(e).splitlines()[0]})
                append_row(jsonl, rows[-1])
                print(f"{backbone.name} {res}px {name:>24}: out of memory", flush=True)
            continue
        for name, stat in stats.items():
            run = dict(variants)[name]
            r = {"variant": name, **common, **stat, "oom": False}
            r["images_per_second"] = batch / r["seconds_median"]
            r["max_abs_diff_vs_pipeline"] = (run().float() - reference.float()).abs().max().item()
            base = base or (r if name == "pipeline_eager" else None)
            if base is not None:
                r["speedup_vs_pipeline"] = r["images_per_second"] / base["images_per_second"]
            rows.append(r)
            append_row(jsonl, r)
            print(
                f"{backbone.name} {res}px {name:>24}: {r['images_per_second']:.3f} img/s (median of {reps})  "
                f"peak {r['peak_mib']:.0f} MiB  max|diff| {r['max_abs_diff_vs_pipeline']:.2e}",
                flush=True,
            )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=list(BACKBONES), default="flux")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--resolutions", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="default: bench/results (a temp dir with --quick)")
    p.add_argument(
        "--jsonl",
        type=Path,
        default=None,
        help="also append each row to this JSONL file as soon as it is timed (the JSON is rewritten after each "
        "resolution), so a run stopped from outside keeps what finished",
    )
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    if not cuda and not args.quick:
        print("bench/sampler.py needs a CUDA GPU; --quick checks the script on CPU", file=sys.stderr)
        return 2
    from leapalign_fast.config import load_config

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    kind = model_kind(args.backbone, full_size=cuda)
    cfg = load_config(ROOT / "configs" / RANDOM_MODELS[kind][1])  # the family's config: guidance, text length
    msl = cfg.model.max_sequence_length if cuda else 16
    res_list = args.resolutions or (RANDOM_RESOLUTIONS[kind] if cuda else [64])
    steps = args.steps if cuda else 6
    out = args.out or (Path(tempfile.mkdtemp(prefix="sampler-quick-")) if args.quick else ROOT / "bench" / "results")
    rows = []
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    for res in res_list:
        # One full-size model alive at a time: the previous resolution's model and graphs are gone before this build.
        rows += bench_resolution(
            kind,
            device,
            dtype,
            res,
            steps,
            args.batch,
            args.reps if cuda else 3,
            cuda,
            cfg.guidance,
            msl,
            num_frames=cfg.num_frames,
            jsonl=args.jsonl,
        )
        path = write_result(  # after every resolution: a later one that fails or is stopped loses nothing here
            out / f"sampler_{kind}_{slug(gpu)}.json",
            {
                "model": kind,
                "backbone": args.backbone,
                "rows": rows,
                "note": "random weights and prompt embeddings; denoising only; times are medians of interleaved "
                "repeats",
            },
        )
        gc.collect()
        if cuda:
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
