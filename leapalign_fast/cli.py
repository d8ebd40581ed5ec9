"""`leapalign-fast` command line: `train [--config FILE] [key=value ...]`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import typing
from pathlib import Path

from leapalign_fast.errors import UserError, disk_failure
from leapalign_fast.threads import configure_threads, describe_threads

CHECKOUT = Path(__file__).resolve().parent.parent  # the repository, when the package runs from a checkout
DEFAULT_CONFIG = CHECKOUT / "configs" / "tiny.toml"


def _is_checkout(folder: Path) -> bool:
    """The package runs from this project's source tree, not from an install (whose parent is site-packages or a
    --target folder, beside which a `configs` folder would be someone else's)."""
    try:
        return 'name = "leapalign-fast"' in (folder / "pyproject.toml").read_text()
    except OSError:
        return False


def _default_config() -> Path | None:
    """configs/tiny.toml of the working directory, else of the checkout the package runs from; None (the library
    defaults, said on stderr) for an installed package run elsewhere: a wheel carries no configs."""
    local = Path("configs/tiny.toml")
    if local.is_file():
        return local
    if DEFAULT_CONFIG.is_file() and _is_checkout(CHECKOUT):
        return DEFAULT_CONFIG
    print(
        "leapalign-fast: no configs/tiny.toml in the working directory and the package is installed (a wheel carries "
        "no configs): training the library defaults (a random tiny FLUX, the colour reward); pass --config FILE",
        file=sys.stderr,
    )
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="leapalign-fast", description="LeapAlign trainer for FLUX")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="fine-tune a FLUX model (default: configs/tiny.toml)")
    p_train.add_argument("--config", type=Path, default=None, help="TOML config (default: configs/tiny.toml)")
    p_train.add_argument("overrides", nargs="*", help="key=value overrides, dotted for tables (method.alpha=0.5)")
    p_eval = sub.add_parser("eval", help="sample a prompt file with a checkpoint and score it with rewards")
    p_eval.add_argument("--config", type=Path, default=None, help="the run's TOML config (default: configs/tiny.toml)")
    p_eval.add_argument("--checkpoint", default="latest", help="'latest' (default), 'base' or a checkpoint directory")
    p_eval.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p_eval.add_argument(
        "--prompts",
        default=None,
        help="prompt file (default: the config's eval_prompts); with --benchmark: a local "
        "copy (folder or hf:// URL) of the benchmark's files",
    )
    p_eval.add_argument(
        "--benchmark",
        default=None,
        help="a published protocol: hpdv2 (HPD v2 test split, 400 prompts) or hpsv2 (HPS v2 benchmark, 4 styles); "
        "scores HPSv2.1, PickScore, ImageReward, CLIP and aesthetic on the same images (docs/benchmarks.md)",
    )
    p_eval.add_argument("--limit", type=int, default=0, help="--benchmark: the first N prompts of each style only")
    p_eval.add_argument("--rewards", default=None, help="comma-separated reward names (default: the config's reward)")
    p_eval.add_argument("--steps", type=int, default=50, help="sampling steps (the paper evaluates with 50)")
    p_eval.add_argument("--batch", type=int, default=4)
    p_eval.add_argument("--out", type=Path, default=None, help="default: <output_dir>/eval/<checkpoint>")
    p_eval.add_argument("overrides", nargs="*", help="key=value overrides")
    p_enc = sub.add_parser("encode-prompts", help="cache the prompt embeddings so training never loads text encoders")
    p_enc.add_argument("--config", type=Path, default=None, help="TOML config (default: configs/tiny.toml)")
    p_enc.add_argument("overrides", nargs="*", help="key=value overrides")
    p_doc = sub.add_parser(
        "doctor",
        help="check this machine (and launcher) for the config's job in seconds: devices, dtypes, versions, kernels, "
        "attention, collective, weights, prompt caches, memory, disk, trackers; exit 2 if a check fails",
    )
    p_doc.add_argument("--config", type=Path, default=None, help="the job's TOML config (default: configs/tiny.toml)")
    p_doc.add_argument("--timeout", type=float, default=60.0, help="seconds the collective may take (launched runs)")
    p_doc.add_argument("overrides", nargs="*", help="key=value overrides, as the job will get them")
    p_exp = sub.add_parser(
        "export",
        help="write a checkpoint's weights as a diffusers model directory (sharded "
        "FSDP checkpoints are consolidated in this process, any world size wrote them)",
    )
    p_exp.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint directory (.../checkpoints/step_*)")
    p_exp.add_argument("--ema", action="store_true", help="export the EMA weights")
    p_exp.add_argument("--out", type=Path, default=None, help="default: <output_dir>/export/<step>[_ema]")
    p_exp.add_argument("--force", action="store_true", help="replace an earlier export of another checkpoint at --out")
    # Options may come after overrides (`train lr=1e-4 --config x.toml`): collect the leftovers as overrides.
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides = [*getattr(args, "overrides", []), *rest]
    configure_threads()  # before torch is imported
    if args.command == "doctor" and not os.path.exists("/dev/nvidiactl"):
        # no GPU: doctor checks the Triton kernels under Triton's interpreter, chosen before triton is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.command == "export":
        return _export(args)
    sigint = []  # Ctrl-C inside an import can surface as another error: numpy's lazy `numpy.dtypes`, interrupted
    # half-way, then recursed (RecursionError from `import accelerate`); remember that it came

    def on_sigint(signum, frame):
        sigint.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        # The whole config, the method's keys included, is read and checked before torch is imported: a config
        # error comes in a fraction of a second instead of after the whole stack's imports.
        from leapalign_fast.config import load_config

        cfg = load_config(args.config or _default_config(), args.overrides)
        from leapalign_fast.train import EXIT_PREEMPTED, Preempted, TrainingDiverged
    except UserError as e:
        print(f"leapalign-fast: error: {e}", file=sys.stderr)
        return 2
    except BaseException:
        if sigint:
            return _interrupted()
        raise
    finally:
        signal.signal(signal.SIGINT, previous)

    if args.command == "doctor":
        return _doctor(cfg, args.timeout)
    rank0 = os.environ.get("RANK", "0") == "0"  # torchrun / accelerate launch: one closing line, not one per rank
    if rank0:
        print(f"leapalign-fast: {describe_threads()}", flush=True)
    try:
        if args.command == "train":
            from leapalign_fast.train import train

            result = train(cfg)
            r = result.rewards
            n = min(10, len(r))
            ran = result.steps - result.start_step  # after a resume: the steps this call ran, not the total
            span = f"steps {result.start_step + 1}-{result.steps}" if result.start_step else f"{ran} steps"
            if rank0:
                if r:
                    print(
                        f"done: {span} in {result.wall_seconds:.1f} s; mean reward first {n} steps "
                        f"{sum(r[:n]) / n:.4f}, last {n} steps {sum(r[-n:]) / n:.4f}; outputs in {result.output_dir}"
                    )
                else:
                    print(
                        f"done: no step to run (at step {result.steps}, max_steps={cfg.max_steps}); outputs in "
                        f"{result.output_dir}"
                    )
        elif args.command == "eval" and args.benchmark:
            from leapalign_fast.evaluate import benchmark

            if args.rewards:
                raise UserError(
                    "--benchmark scores its own rewards (HPSv2.1, PickScore, ImageReward, CLIP, aesthetic); "
                    "drop --rewards"
                )
            result = benchmark(
                cfg,
                args.benchmark,
                args.checkpoint,
                args.ema,
                args.batch,
                args.limit,
                args.prompts,
                args.steps,
                args.out,
            )
            if rank0:
                print(result["table"], end="")
                print(f"wrote {result['out']}/benchmark.json and benchmark.md")
        elif args.command == "eval":
            from leapalign_fast.evaluate import evaluate

            rewards = [r.strip() for r in (args.rewards or cfg.reward.name).split(",") if r.strip()]
            result = evaluate(
                cfg, args.prompts, rewards, args.checkpoint, args.ema, args.steps, args.batch, out=args.out
            )
            for name, s in result["scores"].items():
                print(f"{name}: {s['mean']:.4f} ± {s['std']:.4f} (n={s['n']}, {result['checkpoint']})")
        elif args.command == "encode-prompts":
            from leapalign_fast.build import encode_prompt_cache

            for path in encode_prompt_cache(cfg):
                print(f"wrote {path}")
    except UserError as e:
        print(f"leapalign-fast: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"leapalign-fast: training diverged: {e}", file=sys.stderr)
        return 3
    except Preempted as e:
        print(f"leapalign-fast: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # Ctrl-C outside the training loop's own handler (start-up, export, eval)
        return _interrupted()
    except Exception as e:  # noqa: BLE001 - only a disk or file-system failure is caught; anything else re-raised
        # The machine, not the code: a full disk or quota, a read-only or unwritable file system, found while
        # writing metrics, grids, exports or the prompt cache; whichever library raised it (an OSError, safetensors'
        # SafetensorError, torch.save's RuntimeError). Checkpoints are written atomically: those written are intact.
        return _disk_failed(e, AFTER[args.command])
    return 0


AFTER = {
    "train": "rerun with resume=true (the checkpoints written so far are intact)",
    "eval": "rerun eval",
    "encode-prompts": "rerun encode-prompts",
    "export": "rerun export (nothing was replaced)",
}


def _disk_failed(e: BaseException, then: str) -> int:
    """The one line for a disk or file-system failure (`errors.disk_failure`), exit 2; anything else re-raised."""
    disk = disk_failure(e)
    if disk is None:
        raise e
    print(
        f"leapalign-fast: error: {disk.strerror}: {disk.filename or 'a file being written'}; free space or fix "
        f"permissions, then {then}",
        file=sys.stderr,
    )
    return 2


def _doctor(cfg, timeout_s: float) -> int:
    """`leapalign-fast doctor` (leapalign_fast/doctor.py): the table, one line per failure, 0 or 2."""
    try:
        from leapalign_fast.doctor import main as doctor

        return doctor(cfg, timeout_s)
    except UserError as e:
        print(f"leapalign-fast: error: {e}", file=sys.stderr)
        return 2


def _export(args) -> int:
    """`leapalign-fast export`: consolidate and write; no config and no process group needed."""
    try:
        from leapalign_fast.checkpoint import verify_checkpoint
        from leapalign_fast.dist_checkpoint import export_transformer, is_sharded

        path = args.checkpoint
        if not is_sharded(path):
            raise UserError(
                f"{path} is not a sharded (fsdp=true) checkpoint directory; export reads "
                ".../checkpoints/step_* of an FSDP run (LoRA runs export lora/ at their end)"
            )
        if (problem := verify_checkpoint(path)) is not None:
            raise UserError(f"checkpoint {path} is damaged ({problem}); export an intact one")
        out = args.out or path.parent.parent / "export" / (path.name + ("_ema" if args.ema else ""))
        print(f"wrote {export_transformer(path, out, ema=args.ema, replace_exports=args.force)}")
    except UserError as e:
        print(f"leapalign-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as e:  # noqa: BLE001 - a disk or file-system failure is one line; anything else re-raised
        return _disk_failed(e, AFTER["export"])
    return 0


def _interrupted() -> typing.NoReturn:
    print(
        "leapalign-fast: interrupted (Ctrl-C) outside a training step; checkpoints already written are intact; "
        "rerun with resume=true to continue",
        file=sys.stderr,
    )
    # Exit now: a Ctrl-C that landed inside `import torch` can leave a half-initialised module whose shutdown
    # handlers end the process by SIGINT (status -2, seen once under load) instead of 130. Nothing is left to
    # clean up here: checkpoints are atomic and the run lock is released with the process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
