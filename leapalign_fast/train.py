"""The training loop: build the run from a Config, then optimizer steps of the chosen method.

accelerate owns devices, DDP wrapping, mixed precision and gradient accumulation; with `fsdp = true` the
transformer is sharded by fsdp.py (FSDP2) instead, and its checkpoints by dist_checkpoint.py. Everything random
in a step (noise, method draws) comes from a generator seeded by (seed, step, micro-step, rank), so a
resumed run replays the very same steps.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from tqdm.auto import tqdm

from leapalign_fast import build, fsdp
from leapalign_fast import checkpoint as ckpt
from leapalign_fast.build import (  # noqa: F401  (wait_for_files, encode_prompt_cache, EMA: re-exported)
    EMA,
    add_trainable,
    decoder,
    encode_prompt_cache,
    load_trained,
    prompt_cache_path,
    to_device,
    train_prompts,
    trained_state,
    unwrap,
    velocity_for,
    wait_for_files,
)
from leapalign_fast.checkpoint import MATH_KEYS, config_differences, resume, save_checkpoint, truncate_metrics  # noqa: F401
from leapalign_fast.config import Config, config_dict, config_toml  # noqa: F401  (config_dict: re-exported, bench)
from leapalign_fast.dist_checkpoint import ShardedSaver, export_transformer
from leapalign_fast.errors import TrainingDiverged, UserError  # noqa: F401  (TrainingDiverged: re-exported)
from leapalign_fast.images import save_grid
from leapalign_fast.io import write_text_atomic
from leapalign_fast.methods import StepInputs, build_method
from leapalign_fast.models.backbone import DTYPES, Backbone, Geometry, backbone_for
from leapalign_fast.models.fast import GraphedVelocity, prepare_transformer
from leapalign_fast.models.lora_export import export_lora
from leapalign_fast.models.text import PromptCache
from leapalign_fast.preflight import check_memory, mixed_precision_note
from leapalign_fast.prompts import PromptOrder
from leapalign_fast.recompute import checkpointed_decode_reward
from leapalign_fast.rewards import build_reward, check_reward_name
from leapalign_fast.runlock import RunLock, check_writable, is_main_rank
from leapalign_fast.sampler import sample_trajectory
from leapalign_fast.validation import build_validator, validation_prompts

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after writing a checkpoint; rerun with resume=true


class Preempted(Exception):
    """SIGTERM/SIGINT: the current step finished and a checkpoint was written."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"stopped by signal at step {step}; checkpoint {path}; rerun with resume=true to continue")
        self.step, self.path = step, path


class StopSignal:
    """First SIGTERM/SIGINT: ask the loop to checkpoint and stop after the current step. Second: exit at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """CPU generator for one micro-step of one rank, independent of anything that ran before."""
    s = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(s) & ((1 << 63) - 1))


@dataclass
class Run:
    cfg: Config
    accelerator: Accelerator
    backbone: Backbone
    components: object  # the backbone's components (transformer, vae, text)
    transformer: torch.nn.Module  # prepared (maybe DDP-wrapped)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[torch.nn.Parameter]
    ema: EMA | None
    reward: torch.nn.Module
    prompts: list[str]
    embeds: PromptCache
    eval_embeds: PromptCache
    sigmas: torch.Tensor
    geometry: Geometry  # the latent layout at cfg.resolution
    out: Path
    graphed: GraphedVelocity | None = None  # CUDA-graph replays of the no-grad forwards
    saver: ShardedSaver | None = None  # fsdp: sharded (DCP) checkpoints, maybe asynchronous


def build_run(cfg: Config, accelerator: Accelerator) -> Run:
    out = Path(cfg.output_dir)
    check_writable(out, "output_dir")
    if ckpt.checkpoint_root(out).is_dir():  # found now, not after the first training step
        check_writable(ckpt.checkpoint_root(out), "checkpoint directory")
    if not cfg.resume and ckpt.list_checkpoints(out):
        raise UserError(
            f"output_dir {out} already holds checkpoints of an earlier run; pass resume=true to continue it "
            "or choose a new output_dir (nothing was changed)"
        )
    check_reward_name(cfg.reward.name)  # a typo fails before the model is loaded
    torch.manual_seed(cfg.seed)  # same init on every rank
    prompts = train_prompts(cfg)
    prompt_sets = (prompts, list(cfg.eval_prompts), *validation_prompts(cfg))
    cached = all(prompt_cache_path(cfg, p).is_file() for p in prompt_sets)
    # Only rank 0 encodes, so only it loads the text encoders (T5-XXL: 9.5 GB a rank).
    backbone = backbone_for(cfg.model)
    # FSDP from a model directory: the transformer on the meta device; each rank reads only its shards (fsdp.py).
    components = build.load_components(cfg, need_text=not cached and accelerator.is_main_process,
                                       empty_transformer=cfg.fsdp)  # fmt: skip
    geometry = backbone.geometry(components, cfg.resolution)
    check_memory(cfg, components, geometry, accelerator.device)  # a blow-up fails now, with an estimate, not minutes later
    if accelerator.is_main_process:  # rank 0 encodes what is not cached, on its accelerator
        for p in prompt_sets:
            build.prompt_embeddings(cfg, components, p, accelerator.device)
    else:
        wait_for_files([prompt_cache_path(cfg, p) for p in prompt_sets])
    accelerator.wait_for_everyone()
    components.text = None  # text encoders are not needed once prompts are embedded
    # Every rank reads its batches from the cache files (memory-mapped), not the whole cache.
    embeds = build.prompt_embeddings(cfg, components, prompts)
    eval_embeds = build.prompt_embeddings(cfg, components, cfg.eval_prompts)

    reward = build_reward(cfg.reward.name, **cfg.reward.options).to(accelerator.device)
    if hasattr(reward, "check_prompts"):  # fail now, not at the first step that draws a bad prompt
        reward.check_prompts(prompts + list(cfg.eval_prompts))
    device, dtype = accelerator.device, DTYPES[cfg.model.dtype]
    components.vae.requires_grad_(False)
    # FSDP: the transformer stays on the host in its storage dtype until sharding moves each rank's shards over.
    for module in (components.vae,) if cfg.fsdp else (components.vae, components.transformer):
        to_device(module, device, dtype)
    transformer = components.transformer
    if cfg.fsdp and next(transformer.parameters()).dtype != dtype:
        transformer.to(dtype)
    torch.manual_seed(cfg.seed + 1)  # LoRA init, identical on every rank
    with fsdp.host_placeholders(transformer):  # on meta parameters, peft's LoRA init as on loaded ones
        params = add_trainable(transformer, cfg, upcast=not cfg.fsdp)
    switches = prepare_transformer(transformer, cfg.model, device)  # checkpointing, then compile, then DDP/FSDP
    if cfg.fsdp:  # the trainable state (parameters, optimizer, EMA) is built from the shards, after this
        weights = Path(cfg.model.source) / "transformer" if cfg.model.source != "tiny" else None
        switches += ", " + fsdp.shard_transformer(transformer, device, fsdp.compute_dtype(cfg.mixed_precision, dtype),
                                                  weights, dtype)  # fmt: skip
        params = [p for p in transformer.parameters() if p.requires_grad]
    if accelerator.is_main_process:
        decode = ", decode+reward recomputed in the backward" if cfg.model.checkpoint_decode else ""
        print(f"leapalign-fast: transformer {switches}{decode}", flush=True)
    graphed = GraphedVelocity(transformer) if cfg.model.cuda_graph and device.type == "cuda" else None  # not FSDP
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)  # fmt: skip
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    ema = EMA(trained_state(transformer), cfg.ema_decay) if cfg.ema_decay > 0 else None  # FSDP: sharded DTensors
    saver = None
    if cfg.fsdp:  # sharded above; accelerate keeps accumulation and collectives (MixedPrecisionPolicy, not autocast)
        saver = ShardedSaver(cfg.async_checkpoint, log=out / "checkpoints.jsonl")
    else:
        transformer, optimizer = accelerator.prepare(transformer, optimizer)
    sigmas = backbone.schedule(components, cfg.num_steps, geometry, device=device)  # read every step: on the device
    return Run(cfg, accelerator, backbone, components, transformer, optimizer, scheduler, params, ema, reward, prompts,
               embeds, eval_embeds, sigmas, geometry, out, graphed, saver)  # fmt: skip


def make_noise(run: Run, batch: int, generator: torch.Generator) -> torch.Tensor:
    """(B, L, C) packed Gaussian latents, drawn on CPU so every device gets the same numbers."""
    noise = torch.randn(*run.geometry.noise_shape(batch), generator=generator)
    return noise.to(run.accelerator.device, DTYPES[run.cfg.model.dtype])


def step_decode_reward(run: Run):
    """(decode, reward) of a training step; `model.checkpoint_decode` recomputes both in the backward."""
    return checkpointed_decode_reward(run.components.vae, decoder(run), run.reward, run.cfg.model.checkpoint_decode)


@torch.no_grad()
def write_grid(run: Run, step: int) -> Path | None:
    """Images of the fixed evaluation prompts from fixed noise, with the current weights, written by rank 0.
    Other ranks return at once, except under FSDP, where every rank's shards take part in each forward."""
    if not (run.accelerator.is_main_process or run.saver is not None):
        return None
    n = len(run.cfg.eval_prompts)
    velocity = velocity_for(run, list(range(n)), run.eval_embeds)
    noise = make_noise(run, n, torch.Generator().manual_seed(run.cfg.seed + 12345))
    x0 = sample_trajectory(velocity, noise, run.sigmas).x0
    if run.saver is not None:
        unwrap(run.transformer).reshard()  # FSDP keeps the root unsharded after a forward without backward
    if not run.accelerator.is_main_process:
        return None
    path = run.out / "grids" / f"step_{step:06d}.png"
    save_grid(decoder(run)(x0), path)
    return path


@dataclass
class TrainResult:
    steps: int  # the step the run is at
    wall_seconds: float
    rewards: list[float]  # mean reward of each optimizer step run in this call
    output_dir: str
    grid: str | None
    run: Run
    start_step: int = 0  # the step it resumed from: this call ran steps - start_step steps


def train(cfg: Config) -> TrainResult:
    """Run `cfg` to `max_steps`. Raises Preempted after a signal, TrainingDiverged after non-finite steps.
    Rank 0 holds the output_dir's lock for the whole run: a second run into it is refused."""
    if not is_main_rank():
        return _train(cfg)
    with RunLock(cfg.output_dir):
        return _train(cfg)


def _train(cfg: Config) -> TrainResult:
    # accelerate keeps its settings in process-wide singletons; a second run in this process (tests, benchmarks)
    # may use other ones. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    if (note := mixed_precision_note(cfg)) and is_main_rank():
        print(f"leapalign-fast: {note}", flush=True)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=not torch.cuda.is_available())  # fmt: skip
    if accelerator.distributed_type.name == "FSDP":
        raise UserError("accelerate's FSDP mode (distributed_type: FSDP) is not used by this trainer; launch with "
                        "configs/accelerate_fsdp.yaml (distributed_type: MULTI_GPU) and set fsdp=true in the run "
                        "config: the trainer applies FSDP2 itself")  # fmt: skip
    if cfg.deterministic and torch.cuda.is_available():  # else cuBLAS matmuls raise under deterministic mode
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS makes its first handle
    torch.use_deterministic_algorithms(cfg.deterministic)
    start_time = time.perf_counter()
    method = build_method(cfg.method, cfg.num_steps)  # bad method settings fail before anything is written
    run = build_run(cfg, accelerator)
    metrics_path = run.out / "metrics.jsonl"
    step, consumed = resume(run) if cfg.resume else (0, 0)
    start_step = step
    if step >= cfg.max_steps and accelerator.is_main_process:
        print(f"leapalign-fast: the checkpoint is at step {step} >= max_steps={cfg.max_steps}: nothing to train; "
              "raise max_steps to continue (final grid and LoRA export are rewritten)", flush=True)  # fmt: skip
    if accelerator.is_main_process:
        write_text_atomic(run.out / "config.toml", config_toml(cfg))
        if step == 0:
            metrics_path.unlink(missing_ok=True)
        truncate_metrics(metrics_path, step)
    if step == 0:
        write_grid(run, 0)
    writer = None
    if cfg.tensorboard and accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run.out / "tensorboard"), purge_step=step + 1)
    validator = build_validator(run, step)  # eval_every: validation scores, the `best` checkpoint, early stop
    if validator is not None and step == 0:
        validator(run, 0, writer)
    order = PromptOrder(len(run.prompts), cfg.seed, consumed)
    world, rank, B = accelerator.num_processes, accelerator.process_index, cfg.batch_size
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    rewards_log: list[float] = []
    nonfinite_in_row = 0
    with StopSignal() as stop, bar:  # the bar closes on any exception: an error message starts on its own line
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            losses, rewards, extra, grad_norm, finite = [], [], {}, None, True
            for micro in range(cfg.grad_accum):
                idx = order.take(B * world)[rank * B : (rank + 1) * B]  # this rank's prompts
                gen = step_generator(cfg.seed, step, micro, rank)
                with accelerator.accumulate(run.transformer):
                    decode, reward = step_decode_reward(run)
                    inputs = StepInputs(velocity_for(run, idx, run.embeds), make_noise(run, B, gen), run.sigmas,
                                        decode, reward, [run.prompts[i] for i in idx], gen)  # fmt: skip
                    out = method(inputs)
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients:
                        # Gradients are all-reduced by now, so every rank sees the same norm and takes the same branch.
                        clip = fsdp.clip_grad_norm if run.saver is not None else accelerator.clip_grad_norm_
                        grad_norm = clip(run.params, cfg.max_grad_norm or math.inf)  # 0: off
                        loss_sum = accelerator.reduce(torch.stack([*losses, out.loss.detach()]).sum(), "sum")
                        finite = bool(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))  # host sync
                        if finite:
                            run.optimizer.step()
                        run.optimizer.zero_grad(set_to_none=True)  # FSDP's bare optimizer: not between micro-steps
                losses.append(out.loss.detach())
                rewards.append(out.reward)
                extra = out.metrics
            if finite:
                nonfinite_in_row = 0
                run.scheduler.step()
                if run.ema is not None:
                    run.ema.update(trained_state(run.transformer))
            else:
                nonfinite_in_row += 1
            step += 1
            # Reduce across ranks for logging: these gathers and .item() calls are host sync points.
            loss = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
            reward_all = accelerator.gather(torch.cat(rewards).float())
            record = {"step": step, "loss": _finite_or_none(loss), "reward": _finite_or_none(reward_all.mean().item()),
                      "reward_std": _finite_or_none(reward_all.std().item()) if reward_all.numel() > 1 else 0.0,
                      "grad_norm": _finite_or_none(float(grad_norm)), "skipped": not finite,
                      "nonfinite_in_row": nonfinite_in_row, "lr": run.scheduler.get_last_lr()[0],
                      "step_seconds": time.perf_counter() - t0, **extra}  # fmt: skip
            if record["reward"] is not None:
                rewards_log.append(record["reward"])
            if accelerator.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if writer is not None:
                    for k, v in record.items():
                        if k != "step" and isinstance(v, (int, float)):
                            writer.add_scalar(k, v, step)
                bar.set_postfix(loss=f"{loss:.4f}", reward=f"{record['reward'] or math.nan:.4f}",
                                s_step=f"{record['step_seconds']:.2f}")  # fmt: skip
                bar.update(1)
            if nonfinite_in_row >= cfg.max_nonfinite_steps:
                raise TrainingDiverged(
                    f"{nonfinite_in_row} consecutive steps had a non-finite loss or gradient norm (last at step "
                    f"{step}); stopped without writing a checkpoint. Last good checkpoint: "
                    f"{ckpt.newest(run.out)}. Lower lr, raise max_grad_norm headroom or check the reward."
                )
            # Any rank's signal stops every rank at the same step (a max-reduce: one more sync point).
            stopping = accelerator.reduce(torch.tensor(float(stop.received is not None), device=accelerator.device), "max")
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or bool(stopping):
                path = save_checkpoint(run, step, order.consumed)
                if bool(stopping):
                    bar.close()
                    if run.saver is not None:
                        run.saver.close()  # the checkpoint is committed on every rank before the exit
                    raise Preempted(step, path)
            if validator is not None and validator(run, step, writer):  # early stop: no new best for a while
                if step % cfg.checkpoint_every != 0 and step != cfg.max_steps:  # else saved above
                    save_checkpoint(run, step, order.consumed)
                break
            if cfg.grid_every and step % cfg.grid_every == 0 and step != cfg.max_steps:
                write_grid(run, step)
    bar.close()
    grid = write_grid(run, step)
    if run.saver is not None:
        run.saver.close()  # the last save is committed before anything reads it
        if cfg.lora.enabled:
            export_sharded_lora(run)
    elif accelerator.is_main_process and cfg.lora.enabled:  # diffusers-loadable LoRA: <Pipeline>.load_lora_weights
        export_lora(unwrap(run.transformer), run.out / "lora", pipeline=run.backbone.pipeline)
        if run.ema is not None:
            export_lora(unwrap(run.transformer), run.out / "lora_ema", run.ema.shadow, pipeline=run.backbone.pipeline)
    if writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if run.saver is not None and not cfg.lora.enabled and accelerator.is_main_process:
        export_full(run, step)  # after the other ranks are released: no collective waits on this read and write
    return TrainResult(step, time.perf_counter() - start_time, rewards_log, str(run.out), str(grid) if grid else None, run,
                       start_step)  # fmt: skip


def _finite_or_none(x: float) -> float | None:
    """JSON has no NaN/inf: non-finite metrics are written as null."""
    return x if math.isfinite(x) else None


def export_sharded_lora(run: Run) -> None:
    """FSDP LoRA runs: lora/ and lora_ema/ as diffusers loads them, from the adapters gathered once (a collective:
    every rank calls this; the adapters are small)."""
    weights = {"lora": fsdp.full_tensors(trained_state(run.transformer))}
    if run.ema is not None:
        weights["lora_ema"] = fsdp.full_tensors(run.ema.shadow)
    if run.accelerator.is_main_process:
        for name, named in weights.items():
            export_lora(unwrap(run.transformer), run.out / name, named, pipeline=run.backbone.pipeline)


def export_full(run: Run, step: int) -> None:
    """FSDP full fine-tunes, rank 0: transformer/ and transformer_ema/ (diffusers model directories) consolidated
    from the last checkpoint's shards in this process alone, as `leapalign-fast export` does."""
    last = ckpt.checkpoint_root(run.out) / f"step_{step:08d}"
    if last.is_dir():
        export_transformer(last, run.out / "transformer")
        if run.ema is not None:
            export_transformer(last, run.out / "transformer_ema", ema=True)
