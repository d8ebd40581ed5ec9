"""The trainer: built once from a typed Config, then optimizer steps of the chosen method.

`Trainer(cfg)` holds the backbone (resolved once), the method, the optimizer/EMA/scheduler and a checkpointer. Its
seams are public, and everything that runs a step calls them (benchmarks and validation too):

    micro_step(idx, generator)   one forward + backward of the method on prompts `idx` (no optimizer step)
    optimizer_step()             clip, check finiteness on every rank, step or skip, zero the gradients
    train_step()                 grad_accum micro-steps + optimizer step + scheduler + EMA; its metrics record
    train()                      the loop: logging, divergence, signals, checkpoints, validation, grids, export

accelerate owns devices, DDP wrapping, mixed precision and gradient accumulation; with `fsdp = true` the
transformer is sharded by fsdp.py (FSDP2) instead, and checkpoints are sharded (checkpoint.ShardedCheckpointer).
Everything random in a step (noise, method draws) comes from a generator seeded by (seed, step, micro-step, rank),
so a resumed run replays the very same steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from tqdm.auto import tqdm

from leapalign_fast import build, fsdp, trackers
from leapalign_fast import checkpoint as ckpt
from leapalign_fast.build import add_trainable, prompt_cache_path, to_device, trained_state, unwrap
from leapalign_fast.checkpoint import TrainState, make_checkpointer, truncate_metrics
from leapalign_fast.config import Config, config_toml
from leapalign_fast.ema import EMA
from leapalign_fast.errors import TrainingDiverged, UserError
from leapalign_fast.images import grid_array, save_grid
from leapalign_fast.io import write_text_atomic
from leapalign_fast.methods import StepInputs, StepOutput, build_method
from leapalign_fast.models.backbone import DTYPES, backbone_for
from leapalign_fast.models.fast import GraphedVelocity, prepare_transformer
from leapalign_fast.models.text import PromptCache
from leapalign_fast.preflight import check_memory, mixed_precision_note
from leapalign_fast.prompts import PromptOrder, validation_prompts
from leapalign_fast.recompute import checkpointed_decode_reward
from leapalign_fast.rewards import build_reward, check_reward_name
from leapalign_fast.rewards.video import video_reward
from leapalign_fast.runlock import RunLock, check_writable, is_main_rank
from leapalign_fast.sampler import sample_trajectory
from leapalign_fast.validation import build_validator

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after writing a checkpoint; rerun with resume=true

# `instrument(fn, part)` wraps a step's parts for measurement (bench/memory.py): part is "velocity", "decode",
# "reward" or "backward"; it returns a callable with fn's signature.
Instrument = Callable[[Callable, str], Callable]


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


def step_generator(seed: int, step: int, micro: int, rank: int, stream: int = 0) -> torch.Generator:
    """CPU generator for one micro-step of one rank, independent of anything that ran before. `stream` > 0: another
    independent stream of the same micro-step (the method's draws shared by every rank, `method_draws = "shared"`)."""
    entropy = [seed, step, micro, rank] + ([stream] if stream else [])
    s = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(s) & ((1 << 63) - 1))


def make_accelerator(cfg: Config) -> Accelerator:
    """accelerate for this run. Its settings live in process-wide singletons; a second run in this process (tests,
    benchmarks) may use other ones, so they are reset first (the process group, PartialState, is kept)."""
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=not torch.cuda.is_available(),
        log_with=trackers.make_trackers(cfg) or None,  # report_to; started by Trainer.train once the step is known
    )
    if accelerator.distributed_type.name == "FSDP":
        raise UserError(
            "accelerate's FSDP mode (distributed_type: FSDP) is not used by this trainer; launch with "
            "configs/accelerate_fsdp.yaml (distributed_type: MULTI_GPU) and set fsdp=true in the run config: the "
            "trainer applies FSDP2 itself"
        )
    return accelerator


@dataclass
class TrainResult:
    steps: int  # the step the run is at
    wall_seconds: float
    rewards: list[float]  # mean reward of each optimizer step run in this call
    output_dir: str
    grid: str | None
    trainer: Trainer
    start_step: int = 0  # the step it resumed from: this call ran steps - start_step steps


class Trainer:
    """One run, built once from a typed Config (see the module docstring for its seams)."""

    def __init__(self, cfg: Config, accelerator: Accelerator | None = None):
        self.cfg = cfg
        if cfg.deterministic and torch.cuda.is_available():  # else cuBLAS matmuls raise under deterministic mode
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS makes its first handle
        torch.use_deterministic_algorithms(cfg.deterministic)
        # model.tf32: TF32 matmuls and convolutions on GPUs that have them (FlowBP's choice); false: full float32.
        torch.set_float32_matmul_precision("high" if cfg.model.tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = cfg.model.tf32
        self.method = build_method(cfg.method, cfg.num_steps)  # bad method settings fail before anything is written
        self.accelerator = acc = accelerator or make_accelerator(cfg)
        self.out = out = Path(cfg.output_dir)
        check_writable(out, "output_dir")
        if ckpt.checkpoint_root(out).is_dir():  # found now, not after the first training step
            check_writable(ckpt.checkpoint_root(out), "checkpoint directory")
        if not cfg.resume and ckpt.list_checkpoints(out):
            raise UserError(
                f"output_dir {out} already holds checkpoints of an earlier run; pass resume=true to continue it "
                "or choose a new output_dir (nothing was changed)"
            )
        check_reward_name(cfg.reward.name)  # a typo fails before the model is loaded
        self.backbone = backbone = backbone_for(cfg.model)  # resolved once; everything below is handed it
        backbone.check_frames(cfg.num_frames)  # num_frames on an image family fails before the model is loaded
        if cfg.model.cuda_graph and not backbone.graphable:
            raise UserError(
                f"model.cuda_graph=true: model.family {backbone.name}'s forward changes shape with the prompts (no "
                "CUDA graph can replay it); set model.cuda_graph=false"
            )
        torch.manual_seed(cfg.seed)  # same init on every rank
        self.prompt_set = build.train_prompt_set(cfg)  # its name, source and checksum head the run's config.toml
        self.prompts = self.prompt_set.prompts
        prompt_sets = (self.prompts, list(cfg.eval_prompts), *validation_prompts(cfg))
        # Only rank 0 encodes, so only it loads the text encoders (T5-XXL: 9.5 GB a rank), and only when a cache is
        # missing or fails its checksums. FSDP from a model directory: the transformer on the meta device; each rank
        # reads only its shards (fsdp.py).
        need_text = acc.is_main_process and not all(build.prompt_cache_intact(cfg, backbone, p) for p in prompt_sets)
        self.components = build.load_components(cfg, backbone, need_text=need_text, empty_transformer=cfg.fsdp)
        self.geometry = backbone.layout(self.components, cfg.image_size, cfg.num_frames)
        check_memory(cfg, backbone, self.components, self.geometry, acc.device)  # a blow-up fails now, not later
        self._embed_prompts(prompt_sets)
        reward = build_reward(cfg.reward.name, **cfg.reward.options)  # per frame on a video (rewards/video.py)
        self.reward = video_reward(reward, cfg.reward.frames, cfg.reward.temporal_weight).to(acc.device)
        if hasattr(self.reward, "check_prompts"):  # fail now, not at the first step that draws a bad prompt
            self.reward.check_prompts(self.prompts + list(cfg.eval_prompts))
        self.params = self._prepare_transformer()
        self.graphed = GraphedVelocity(self.transformer) if cfg.model.cuda_graph and acc.device.type == "cuda" else None
        optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        # FSDP: sharded DTensors, built from the shards after sharding
        self.ema = EMA(trained_state(self.transformer), cfg.ema_decay) if cfg.ema_decay > 0 else None
        if not cfg.fsdp:  # FSDP is sharded already; accelerate keeps accumulation and collectives there
            self.transformer, optimizer = acc.prepare(self.transformer, optimizer)
        self.optimizer = optimizer
        self.sigmas = backbone.schedule(self.components, cfg.num_steps, self.geometry, device=acc.device)
        self.checkpointer = make_checkpointer(cfg, acc, out, self.prompts)
        self.step, self.order, self.nonfinite_in_row = 0, PromptOrder(len(self.prompts), cfg.seed, 0), 0

    # -- building ----------------------------------------------------------------------------------------
    def _embed_prompts(self, prompt_sets) -> None:
        """Rank 0 encodes what is not cached, on its accelerator; every rank then reads its batches from the cache
        files (memory-mapped), not the whole cache. The text encoders are dropped afterwards."""
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            for p in prompt_sets:
                build.prompt_embeddings(cfg, self.backbone, self.components, p, acc.device)
        else:
            build.wait_for_files([prompt_cache_path(cfg, self.backbone, p) for p in prompt_sets])
        acc.wait_for_everyone()
        self.components.text = None
        main = acc.is_main_process  # verified by rank 0 above (each chunk hashed once); the others trust it
        self.embeds = build.prompt_embeddings(cfg, self.backbone, self.components, self.prompts, verify=main)
        self.eval_embeds = build.prompt_embeddings(cfg, self.backbone, self.components, cfg.eval_prompts, verify=main)

    def _prepare_transformer(self) -> list[torch.nn.Parameter]:
        """Place the frozen parts, add the trainable parameters (LoRA or full), then checkpointing, compile and
        FSDP in that order; returns the trainable parameters."""
        cfg, device, dtype = self.cfg, self.accelerator.device, DTYPES[self.cfg.model.dtype]
        comps = self.components
        comps.vae.requires_grad_(False)
        # FSDP: the transformer stays on the host in its storage dtype until sharding moves each rank's shards over.
        for module in (comps.vae,) if cfg.fsdp else (comps.vae, comps.transformer):
            to_device(module, device, dtype)
        transformer = self.transformer = comps.transformer
        if cfg.fsdp and next(transformer.parameters()).dtype != dtype:
            transformer.to(dtype)
        torch.manual_seed(cfg.seed + 1)  # LoRA init, identical on every rank
        with fsdp.host_placeholders(transformer):  # on meta parameters, peft's LoRA init as on loaded ones
            params = add_trainable(transformer, cfg, self.backbone, upcast=not cfg.fsdp)
        switches = prepare_transformer(transformer, cfg.model, device)  # checkpointing, then compile, then FSDP
        if cfg.fsdp:  # the trainable state (parameters, optimizer, EMA) is built from the shards, after this
            weights = build.model_root(cfg, need_text=False) / "transformer" if cfg.model.source != "tiny" else None
            param_dtype = fsdp.compute_dtype(cfg.mixed_precision, dtype)
            switches += ", " + fsdp.shard_transformer(transformer, device, param_dtype, weights, dtype)
            params = [p for p in transformer.parameters() if p.requires_grad]
        if self.accelerator.is_main_process:
            decode = ", decode+reward recomputed in the backward" if cfg.model.checkpoint_decode else ""
            print(f"leapalign-fast: transformer {switches}{decode}", flush=True)
        return params

    @property
    def state(self) -> TrainState:
        """What a checkpoint holds (the checkpointer loads into these objects in place)."""
        return TrainState(self.transformer, self.optimizer, self.scheduler, self.ema)

    # -- what a step samples with ------------------------------------------------------------------------
    def velocity(self, idx: list[int], embeds: PromptCache | None = None):
        """The backbone's velocity (with its guidance) for prompts `idx` of `embeds` (default: the training
        prompts), conditioning on the accelerator; replayed from CUDA graphs when model.cuda_graph."""
        dev = self.accelerator.device
        cond = {k: v.to(dev) for k, v in (embeds or self.embeds).tensors(idx, self.backbone.conditioning).items()}
        velocity = self.backbone.velocity(
            self.transformer, cond, self.geometry, self.cfg.guidance, uncond_grad=self.cfg.model.uncond_grad
        )
        return self.graphed.bind(velocity) if self.graphed is not None else velocity

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Packed latents (B, L, C) -> images (B, 3, H, W) in [0, 1], through the run's backbone."""
        return self.backbone.decode(self.components.vae, x, self.geometry)

    def noise(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(B, L, C) packed Gaussian latents, drawn on CPU so every device gets the same numbers."""
        noise = torch.randn(*self.geometry.noise_shape(batch), generator=generator)
        return noise.to(self.accelerator.device, self.backbone.noise_dtype(DTYPES[self.cfg.model.dtype]))

    def step_inputs(
        self,
        idx: list[int],
        generator: torch.Generator,
        instrument: Instrument | None = None,
        method_generator: torch.Generator | None = None,
    ):
        """A micro-step's method inputs: noise from `generator`, the method's draws (step indices) from
        `method_generator` (default: the same generator, after the noise); `model.checkpoint_decode` recomputes
        decode + reward in the backward."""
        wrap = instrument or (lambda fn, part: fn)
        decode, reward = checkpointed_decode_reward(
            self.components.vae, self.decode, self.reward, self.cfg.model.checkpoint_decode
        )
        return StepInputs(
            wrap(self.velocity(idx), "velocity"),
            self.noise(len(idx), generator),
            self.sigmas,
            wrap(decode, "decode"),
            wrap(reward, "reward"),
            [self.prompts[i] for i in idx],
            method_generator or generator,
        )

    # -- the seams ---------------------------------------------------------------------------------------
    def micro_step(
        self,
        idx: list[int],
        generator: torch.Generator,
        method=None,
        instrument: Instrument | None = None,
        around_loss=contextlib.nullcontext,
        method_generator: torch.Generator | None = None,
    ) -> StepOutput:
        """The method's loss on prompts `idx` and its backward (gradients accumulate; no optimizer step).
        `method` replaces the run's (bench/memory.py), `instrument` wraps the step's parts, `around_loss` is a
        context manager entered around the method's forward, `method_generator` draws the method's randomness."""
        inputs = self.step_inputs(idx, generator, instrument, method_generator)
        with around_loss():
            out = (method or self.method)(inputs)
        backward = self.accelerator.backward
        (instrument(backward, "backward") if instrument else backward)(out.loss)
        return out

    def optimizer_step(self, losses: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """Clip, then step only if the gradient norm and the summed loss are finite on every rank (they are
        all-reduced by now, so every rank takes the same branch); zero the gradients. (grad norm, stepped)."""
        clip = fsdp.clip_grad_norm if self.cfg.fsdp else self.accelerator.clip_grad_norm_
        grad_norm = clip(self.params, self.cfg.max_grad_norm or math.inf)  # 0: off
        loss_sum = self.accelerator.reduce(torch.stack(losses).sum(), "sum")
        finite = bool(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))  # host sync
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # FSDP's bare optimizer: not between micro-steps
        return grad_norm, finite

    def train_step(self) -> dict:
        """One optimizer step at `self.step` (grad_accum micro-steps of every rank's share of the global batch);
        advances `self.step` and returns the step's metrics record (reduced across ranks: host sync points)."""
        cfg, acc = self.cfg, self.accelerator
        world, rank, B = acc.num_processes, acc.process_index, cfg.batch_size
        t0 = time.perf_counter()
        losses, rewards, extra, grad_norm, finite = [], [], {}, None, True
        for micro in range(cfg.grad_accum):
            idx = self.order.take(B * world)[rank * B : (rank + 1) * B]  # this rank's prompts
            with acc.accumulate(self.transformer):
                # method_draws: "per_rank" (each rank its own (k, j), ...), "shared" (one per micro-step, as FlowBP)
                shared = cfg.method_draws == "shared"
                draws = step_generator(cfg.seed, self.step, micro, 0, stream=1) if shared else None
                out = self.micro_step(idx, step_generator(cfg.seed, self.step, micro, rank), method_generator=draws)
                losses.append(out.loss.detach())
                if acc.sync_gradients:
                    grad_norm, finite = self.optimizer_step(losses)
            rewards.append(out.reward)
            extra = out.metrics
        if finite:
            self.nonfinite_in_row = 0
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(trained_state(self.transformer))
        else:
            self.nonfinite_in_row += 1
        self.step += 1
        loss = acc.reduce(torch.stack(losses).mean(), "mean").item()
        reward_all = acc.gather(torch.cat(rewards).float())
        return {
            "step": self.step,
            "loss": _finite_or_none(loss),
            "reward": _finite_or_none(reward_all.mean().item()),
            "reward_std": _finite_or_none(reward_all.std().item()) if reward_all.numel() > 1 else 0.0,
            "grad_norm": _finite_or_none(float(grad_norm)),
            "skipped": not finite,
            "nonfinite_in_row": self.nonfinite_in_row,
            "lr": self.scheduler.get_last_lr()[0],
            "step_seconds": time.perf_counter() - t0,
            **extra,
        }

    def resume(self) -> None:
        """Continue from the newest intact checkpoint (`resume=true`), else from step 0."""
        self.step, consumed = self.checkpointer.resume(self.state) if self.cfg.resume else (0, 0)
        self.order = PromptOrder(len(self.prompts), self.cfg.seed, consumed)

    def save(self) -> Path:
        return self.checkpointer.save(self.step, self.order.consumed, self.state)

    @torch.no_grad()
    def write_grid(self) -> Path | None:
        """Images of the fixed evaluation prompts from fixed noise, with the current weights, written by rank 0.
        Other ranks return at once, except under FSDP, where every rank's shards take part in each forward."""
        acc = self.accelerator
        if not (acc.is_main_process or self.cfg.fsdp):
            return None
        n = len(self.cfg.eval_prompts)
        velocity = self.velocity(list(range(n)), self.eval_embeds)
        noise = self.noise(n, torch.Generator().manual_seed(self.cfg.seed + 12345))
        x0 = sample_trajectory(velocity, noise, self.sigmas).x0
        if self.cfg.fsdp:
            unwrap(self.transformer).reshard()  # FSDP keeps the root unsharded after a forward without backward
        if not acc.is_main_process:
            return None
        path = self.out / "grids" / f"step_{self.step:06d}.png"
        grid = grid_array(self.decode(x0))
        save_grid(grid, path)
        trackers.log_image(acc, "grid", grid, self.step)
        return path

    def export(self) -> None:
        """The end of the run: diffusers-loadable weights (LoRA: lora/ and lora_ema/; FSDP full fine-tunes:
        transformer/ and transformer_ema/)."""
        self.checkpointer.export(self.step, self.state, pipeline=self.backbone.pipeline)

    def train(self) -> TrainResult:
        """Resume if asked, then steps to `max_steps`. Raises Preempted after a signal, TrainingDiverged after
        max_nonfinite_steps non-finite steps in a row."""
        cfg, acc = self.cfg, self.accelerator
        start_time = time.perf_counter()
        self.resume()
        start_step = self.step
        if self.step >= cfg.max_steps and acc.is_main_process:
            print(
                f"leapalign-fast: the checkpoint is at step {self.step} >= max_steps={cfg.max_steps}: nothing to "
                "train; raise max_steps to continue (final grid and LoRA export are rewritten)",
                flush=True,
            )
        if acc.is_main_process:
            write_text_atomic(self.out / "config.toml", self.prompt_set.record() + config_toml(cfg))
        log = MetricsLog(self.out, self.step, acc, cfg)
        if self.step == 0:
            self.write_grid()
        validator = build_validator(self, self.step)  # eval_every: validation scores, the `best` checkpoint, early stop
        if validator is not None and self.step == 0:
            validator(self, 0)
        stopped = self._stopped_early(validator)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not acc.is_main_process, desc="train")
        rewards: list[float] = []
        with StopSignal() as stop, bar, log:  # the bar closes on any exception: an error message starts on its own line
            while self.step < cfg.max_steps and not stopped:
                record = self.train_step()
                if record["reward"] is not None:
                    rewards.append(record["reward"])
                log.write(record)
                bar.set_postfix(
                    loss=f"{record['loss'] or math.nan:.4f}",
                    reward=f"{record['reward'] or math.nan:.4f}",
                    s_step=f"{record['step_seconds']:.2f}",
                )
                bar.update(1)
                if self.nonfinite_in_row >= cfg.max_nonfinite_steps:
                    raise TrainingDiverged(
                        f"{self.nonfinite_in_row} consecutive steps had a non-finite loss or gradient norm (last at "
                        f"step "
                        f"{self.step}); stopped without writing a checkpoint. Last good checkpoint: "
                        f"{ckpt.newest(self.out)}. Lower lr, raise max_grad_norm headroom or check the reward."
                    )
                if self._after_step(stop, validator, log, bar):
                    break
        bar.close()
        grid = self.write_grid()
        self.export()
        log.close()
        acc.wait_for_everyone()
        acc.end_training()
        if cfg.fsdp and not cfg.lora.enabled and acc.is_main_process:
            self.checkpointer.export_full(self.step, ema=self.ema is not None)  # no collective waits on this one
        return TrainResult(
            self.step,
            time.perf_counter() - start_time,
            rewards,
            str(self.out),
            str(grid) if grid else None,
            self,
            start_step,
        )

    def _stopped_early(self, validator) -> bool:
        """A resumed run that had stopped early (`early_stop_patience` validations without a better score) trains
        no further, saying so once (every rank agrees with rank 0, which read the validation log)."""
        if validator is None or self.step == 0 or self.step >= self.cfg.max_steps:
            return False
        flag = torch.tensor(float(validator.stopped_early), device=self.accelerator.device)
        stopped = bool(self.accelerator.reduce(flag, "max"))
        if stopped and self.accelerator.is_main_process:
            print(
                f"leapalign-fast: this run stopped early at step {self.step} ({validator.since_best} validations "
                f"without a better val/{validator.metric}, early_stop_patience={self.cfg.early_stop_patience}): "
                "nothing to train; raise early_stop_patience (or set it to 0) to go on",
                flush=True,
            )
        return stopped

    def _after_step(self, stop: StopSignal, validator, log: MetricsLog, bar) -> bool:
        """The hooks after a step: checkpoint (and stop on a signal), validation (True: stop early), grid."""
        cfg, step = self.cfg, self.step
        # Any rank's signal stops every rank at the same step (a max-reduce: one more sync point).
        flag = torch.tensor(float(stop.received is not None), device=self.accelerator.device)
        stopping = bool(self.accelerator.reduce(flag, "max"))
        due = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
        if due or stopping:
            path = self.save()
            if stopping:
                bar.close()
                self.checkpointer.close()  # the checkpoint is committed on every rank before the exit
                raise Preempted(step, path)
        if validator is not None and validator(self, step):  # early stop: no new best for a while
            if not due:
                self.save()
            return True
        if cfg.grid_every and step % cfg.grid_every == 0 and step != cfg.max_steps:
            self.write_grid()
        return False


class MetricsLog:
    """metrics.jsonl (rank 0; cut back to the resumed step) and the `report_to` trackers (trackers.py), started
    here at the resumed step with the resolved config, closed by `close`."""

    def __init__(self, out: Path, step: int, accelerator: Accelerator, cfg: Config):
        self.path, self.acc, self.main = out / "metrics.jsonl", accelerator, accelerator.is_main_process
        if self.main:
            if step == 0:
                self.path.unlink(missing_ok=True)
            truncate_metrics(self.path, step)
        trackers.start(accelerator, cfg, step)

    def write(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        trackers.log_scalars(self.acc, record, record["step"])

    def close(self) -> None:
        trackers.finish(self.acc)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:  # on success train() closes it after the final grid
            trackers.finish(self.acc, failed=True)


@contextlib.contextmanager
def restored_torch_settings():
    """The process-wide settings the Trainer sets (deterministic algorithms, float32 matmul precision, cuDNN's
    TF32 and determinism) are put back as they were when the run ends, also on an error: a deterministic run left
    strict determinism on for the rest of the process, where cuDNN attention has no deterministic kernel."""
    cudnn = torch.backends.cudnn
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_float32_matmul_precision(),
        (cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark),
    )
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.set_float32_matmul_precision(saved[2])
        cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved[3]


def train(cfg: Config) -> TrainResult:
    """Build the trainer for `cfg` and run it to `max_steps`. Rank 0 holds the output_dir's lock for the whole
    run: a second run into it is refused. torch's global settings are restored at the end."""
    with RunLock(cfg.output_dir) if is_main_rank() else contextlib.nullcontext(), restored_torch_settings():
        if (note := mixed_precision_note(cfg)) and is_main_rank():
            print(f"leapalign-fast: {note}", flush=True)
        return Trainer(cfg).train()


def _finite_or_none(x: float) -> float | None:
    """JSON has no NaN/inf: non-finite metrics are written as null."""
    return x if math.isfinite(x) else None
