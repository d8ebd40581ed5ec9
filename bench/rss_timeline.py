"""Where a step's peak resident memory goes: RSS sampled every ~0.5 ms through one trainer step, by phase.

    python bench/rss_timeline.py                          # mid model, N=25, leapalign and full, decode recompute on
    python bench/rss_timeline.py --methods leapalign --steps 10 --model tiny

A thread reads /proc/self/status while the step runs (torch ops release the GIL); forward pre-hooks and backward
pre-hooks on the transformer, the VAE decoder's layers and the reward label the phase. Per phase: the highest RSS
above the step's starting RSS, beside the step's activation count (bench/memory.py's). Same allocator settings
and build as bench/memory.py; one warm-up step first. Linux only. Writes JSON under --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from bench import memory  # noqa: E402


class Phases:
    """The current phase's label, set by module hooks; a polling thread records (seconds, RSS MiB, label)."""

    def __init__(self):
        self._label, self.samples, self.backward, self._stop = "start", [], False, threading.Event()

    @property
    def label(self) -> str:
        return self._label

    @label.setter
    def label(self, value: str) -> None:
        """Each phase is sampled as it starts too: a short phase is not lost when the poller is not scheduled."""
        self._label = value
        self.samples.append((time.perf_counter(), memory.rss_mib(), value))

    def poll(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), memory.rss_mib(), self._label))
            time.sleep(0.0005)

    def set(self, name: str):
        import torch

        def pre(*_):
            grad = "grad" if torch.is_grad_enabled() else "no grad"
            in_backward = self.backward or torch._C._current_graph_task_id() != -1  # also a backward inside the method
            self.label = f"{'backward: recompute ' if in_backward else ''}{name} ({grad})"

        return pre

    def set_backward(self, name: str):
        def pre(*_):
            self.label = f"backward: {name}"

        return pre

    def hook(self, run) -> list:
        from leapalign_fast import train

        tr, dec = train.unwrap(run.transformer), run.components.vae.decoder
        handles = [
            tr.register_forward_pre_hook(self.set("transformer")),
            dec.register_forward_pre_hook(self.set("decode")),
            run.reward.register_forward_pre_hook(self.set("reward")),
        ]
        for name, m in dec.named_modules():  # the decoder's layers (resnets, upsamplers, head convs)
            if name.count(".") in (0, 3) and name and not name.startswith("mid_block"):
                handles += [
                    m.register_forward_pre_hook(self.set(f"decode {name}")),
                    m.register_full_backward_pre_hook(self.set_backward(f"decode {name}")),
                ]
        blocks = [*getattr(tr, "transformer_blocks", []), *getattr(tr, "single_transformer_blocks", [])]
        for i, b in enumerate(blocks):
            handles.append(b.register_full_backward_pre_hook(self.set_backward(f"transformer block {i}")))
        return handles


def timeline(run, method_name: str, n: int, res: int) -> dict:
    from leapalign_fast import train

    row, method = memory.measure(run, method_name, n, res, [])  # warm-up and the activation count
    phases = Phases()
    handles = phases.hook(run)
    backward = run.accelerator.backward

    def labelled_backward(loss):
        phases.backward, phases.label = True, "backward: start"
        backward(loss)
        phases.backward, phases.label = False, "after backward"

    run.accelerator.backward = labelled_backward
    try:
        memory.reset_peak_rss()
        before = memory.rss_mib()
        thread = threading.Thread(target=phases.poll, daemon=True)
        thread.start()
        memory.trainer_step(run, method, memory.Timer(False), None)
        phases.label = "end"
        time.sleep(0.01)
        phases._stop.set()
        thread.join()
        peak = memory.rss_mib("VmHWM") - before
    finally:
        run.accelerator.backward = backward
        for h in handles:
            h.remove()
    by_phase: dict[str, float] = {}
    for _, rss, label in phases.samples:
        by_phase[label] = max(by_phase.get(label, float("-inf")), rss - before)
    top = sorted(by_phase.items(), key=lambda kv: -kv[1])
    trainable = sum(p.numel() * p.element_size() for p in train.unwrap(run.transformer).parameters() if p.requires_grad)
    return {
        "method": method_name,
        "num_steps": n,
        "resolution": res,
        "activation_mib": row["activation_mib"],
        "peak_rss_mib": peak,
        "peak_phase": top[0][0],
        "peak_over_activation_mib": peak - row["activation_mib"],
        "trainable_parameter_mib": trainable / 2**20,
        "phase_max_rss_mib": dict(top),
        "samples": len(phases.samples),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(memory.MODELS), default="mid")
    p.add_argument("--methods", nargs="+", default=["leapalign", "full"])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, as on the CLI")
    p.add_argument("--checkpoint-decode", choices=["on", "off"], default="on")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if sys.platform == "linux" and any(k not in os.environ for k in memory._MALLOC_ENV):
        os.environ.update(memory._MALLOC_ENV)  # as bench/memory.py: resident memory follows live memory
        os.execv(
            sys.executable,
            [sys.executable, str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:])],
        )
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from bench.common import slug, write_result
    from leapalign_fast import train
    from leapalign_fast.config import config_dict
    from leapalign_fast.threads import describe_threads

    margs = memory.parse_args(
        ["--model", args.model, "--checkpoint-decode", args.checkpoint_decode, "--set", *args.set]
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = memory.bench_config(margs, Path(tmp))
        AcceleratorState._reset_state()  # as bench/memory.py: a fresh accelerator, whatever ran before in-process
        GradientState._reset_state()
        run = train.Trainer(cfg, Accelerator(mixed_precision=cfg.mixed_precision, cpu=True))
        for m in args.methods:
            rows.append(timeline(run, m, args.steps, memory.MODELS[args.model][1]))
            r = rows[-1]
            print(
                f"{m} N={args.steps}: peak RSS {r['peak_rss_mib']:.1f} MiB above the step's start, activation "
                f"{r['activation_mib']:.1f} MiB; peak in '{r['peak_phase']}'",
                flush=True,
            )
            for label, v in list(r["phase_max_rss_mib"].items())[:8]:
                print(f"    {v:8.1f} MiB  {label}")
    name = f"rss_timeline_{args.model}_cpu{'_' + slug(args.tag) if args.tag else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_result(
        args.out / f"{name}.json",
        {
            "model": args.model,
            "rows": rows,
            "config": config_dict(cfg),
            "threads": describe_threads(),
            "allocator_env": {
                k: os.environ.get(k) for k in ("LD_PRELOAD", "MALLOC_CONF", "MALLOC_ARENA_MAX", *memory._MALLOC_ENV)
            },
        },
    )
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
