"""Fused connector kernels vs the eager PyTorch reference at FLUX latent shapes.

    python bench/kernel_speed.py                      # CUDA: B in {1,4,8} x 4096 tokens x 64 channels, bf16
    python bench/kernel_speed.py --mib 64 256 512     # CUDA: the same at 64/256/512 MiB per tensor (8 rows): sizes
                                                      # where HBM bandwidth, not launch overhead, is measured
    python bench/kernel_speed.py --interpret-smoke    # CPU: tiny shapes under TRITON_INTERPRET=1 (checks the script)

Reports p20/p50/p80 ms for forward, backward and forward+backward of `connect_discount` (the LeapAlign
connector at x_j, the larger of the two), achieved HBM GB/s of the Triton path (bytes it must move: forward
reads x_pred, x_real and writes x_conn, x_disc; backward reads two gradients and writes one) and the peak
memory of forward+backward. The two implementations are timed interleaved (one call of each per round), and
the speed-up is also given round by round (median, min, max). Ratios are measured in this run. Writes JSON under
bench/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument(
        "--mib",
        type=float,
        nargs="*",
        default=[],
        help="also tensors of these sizes in MiB (8 rows x n x channels): FLUX's latents (0.5 MiB a sample at 1024²) "
        "measure launch overhead, these measure bandwidth",
    )
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--jsonl", type=Path, default=None, help="also append each size's rows here as they finish")
    p.add_argument("--interpret-smoke", action="store_true", help="tiny CPU run under Triton's interpreter")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results (a temp dir with --interpret-smoke)")
    return p.parse_args()


def _interleaved_ms(fns: dict, reps: int, cuda: bool) -> dict[str, list[float]]:
    """Milliseconds of each implementation over `reps` rounds after 3 warm-up rounds; each round calls every
    implementation once in turn, so load changes on a shared machine hit them alike."""
    import torch

    for _ in range(3):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _quantiles(times: list[float]) -> list[float]:
    """p20/p50/p80."""
    times = sorted(times)
    return [times[int(q * (len(times) - 1))] for q in (0.2, 0.5, 0.8)]


def main() -> int:
    args = _args()
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.batch, args.tokens, args.channels, args.reps, args.dtype = [1, 3], 33, 64, 3, "float32"
        args.mib = [0.25] if args.mib else []  # the bandwidth path too, at an interpretable size
    import torch

    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))  # after site-packages: an installed leapalign_fast (with its kernels) wins
    from bench.common import append_row, paired_ratio, slug, write_result
    from leapalign_fast.kernels.connector import connect_discount

    cuda = torch.cuda.is_available() and not args.interpret_smoke
    if not cuda and not args.interpret_smoke:
        print(
            "bench/kernel_speed.py needs a CUDA GPU; use --interpret-smoke to check the script on CPU", file=sys.stderr
        )
        return 2
    device, dtype = ("cuda" if cuda else "cpu"), getattr(torch, args.dtype)
    rows = []
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shapes = [(b, args.tokens, args.channels) for b in args.batch]
    shapes += [(8, max(1, int(m * 2**20 / itemsize) // (8 * args.channels)), args.channels) for m in args.mib]
    for case, shape in enumerate(shapes):
        b = case  # rows are keyed by their case (the batch alone repeats between the FLUX and the MiB shapes)
        x_pred = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        x_real = torch.randn(shape, device=device, dtype=dtype)
        g_conn, g_disc = torch.randn_like(x_real), torch.randn_like(x_real)
        nbytes = x_real.numel() * x_real.element_size()
        fns: dict[tuple[str, str], object] = {}
        for impl in ("reference", "triton"):

            def fwd(impl=impl):
                with torch.no_grad():
                    return connect_discount(x_pred, x_real, 0.3, impl=impl)

            def full(impl=impl):
                conn, disc, _ = connect_discount(x_pred, x_real, 0.3, impl=impl)
                torch.autograd.backward([conn, disc], [g_conn, g_disc])

            outs = connect_discount(x_pred, x_real, 0.3, impl=impl)

            def bwd(outs=outs):
                torch.autograd.backward(outs[:2], [g_conn, g_disc], retain_graph=True)

            fns.update({(impl, "forward"): fwd, (impl, "backward"): bwd, (impl, "full"): full})
        for mode in ("forward", "backward", "full"):
            times = _interleaved_ms({impl: fns[impl, mode] for impl in ("reference", "triton")}, args.reps, cuda)
            for impl, ms in times.items():
                row = next((r for r in rows if r["case"] == b and r["impl"] == impl), None)
                if row is None:
                    row = {
                        "case": b,
                        "batch": shape[0],
                        "tokens": shape[1],
                        "channels": shape[2],
                        "tensor_mib": nbytes / 2**20,
                        "dtype": args.dtype,
                        "impl": impl,
                    }
                    rows.append(row)
                row[f"{mode}_ms_p20_p50_p80"] = _quantiles(ms)
                row[f"{mode}_spread"] = (max(ms) - min(ms)) / statistics.median(ms)
            row = next(r for r in rows if r["case"] == b and r["impl"] == "triton")
            row[f"{mode}_speedup_vs_reference_paired"] = paired_ratio(times["reference"], times["triton"])
        for row in (r for r in rows if r["case"] == b):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fns[row["impl"], "full"]()
                torch.cuda.synchronize()
                row["full_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            row["forward_gbps"] = 4 * nbytes / (row["forward_ms_p20_p50_p80"][1] * 1e-3) / 1e9
            row["backward_gbps"] = 3 * nbytes / (row["backward_ms_p20_p50_p80"][1] * 1e-3) / 1e9
        ref, tri = (next(r for r in rows if r["case"] == b and r["impl"] == i) for i in ("reference", "triton"))
        for mode in ("forward", "backward", "full"):
            tri[f"{mode}_speedup_vs_reference"] = ref[f"{mode}_ms_p20_p50_p80"][1] / tri[f"{mode}_ms_p20_p50_p80"][1]
        for row in (ref, tri):
            append_row(args.jsonl, {"bench": "kernels", **row})
    import torch as _t

    gpu = _t.cuda.get_device_name(0) if cuda else ("cpu-interpret" if args.interpret_smoke else "cpu")
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="bench-kernels-")) if args.interpret_smoke else ROOT / "bench" / "results"
    )
    path = write_result(out / f"kernels_{slug(gpu)}.json", {"rows": rows, "interpret_smoke": args.interpret_smoke})
    print(f"{'B':>3} {'MiB':>7} {'impl':>9} {'fwd ms':>8} {'bwd ms':>8} {'full ms':>8} {'fwd GB/s':>9} {'speedup':>8}")
    for r in rows:
        print(
            f"{r['batch']:>3} {r['tensor_mib']:>7.1f} {r['impl']:>9} {r['forward_ms_p20_p50_p80'][1]:>8.3f} "
            f"{r['backward_ms_p20_p50_p80'][1]:>8.3f} {r['full_ms_p20_p50_p80'][1]:>8.3f} "
            f"{r['forward_gbps']:>9.1f} {r.get('full_speedup_vs_reference', 1.0):>8.2f}"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
