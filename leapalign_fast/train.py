"""The training loop: build the run from a Config, then optimizer steps of the chosen method.

accelerate owns devices, DDP/FSDP wrapping, mixed precision and gradient accumulation. Everything random
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

from leapalign_fast import checkpoint as ckpt
from leapalign_fast.config import Config, config_dict, config_toml
from leapalign_fast.errors import UserError
from leapalign_fast.flow import flux_schedule
from leapalign_fast.images import save_grid
from leapalign_fast.io import write_text_atomic
from leapalign_fast.methods import StepInputs, build_method
from leapalign_fast.models.fast import GraphedVelocity, prepare_transformer
from leapalign_fast.models.lora_export import export_lora
from leapalign_fast.models.flux import (
    DTYPES,
    FluxComponents,
    FluxVelocity,
    build_tiny_flux,
    decode_latents,
    latent_image_ids,
    load_flux,
)
from leapalign_fast.models.text import PromptCache, prompt_cache_key, write_prompt_cache
from leapalign_fast.prompts import PromptOrder, builtin_prompts, read_prompt_file
from leapalign_fast.rewards import build_reward, check_reward_name
from leapalign_fast.sampler import sample_trajectory
from leapalign_fast.validation import build_validator, validation_prompts

# Config keys whose change alters the math of a resumed run.
MATH_KEYS = ("seed", "batch_size", "grad_accum", "num_steps", "resolution", "guidance", "lr", "weight_decay",
             "adam_betas", "adam_eps", "warmup_steps", "max_grad_norm", "ema_decay", "mixed_precision",
             "prompt_file", "model", "lora", "method", "reward")  # fmt: skip


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after writing a checkpoint; rerun with resume=true


class TrainingDiverged(Exception):
    """Too many consecutive non-finite steps; the last good checkpoint is left in place."""


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


def load_components(cfg: Config, need_text: bool = True) -> FluxComponents:
    """The model's components; the text encoders only when some prompt embeddings are not cached yet."""
    if cfg.model.source == "tiny":
        return build_tiny_flux(cfg.model.tiny, cfg.seed)
    dtype = DTYPES[cfg.model.dtype]
    return load_flux(cfg.model.source, dtype, need_text=need_text, max_sequence_length=cfg.model.max_sequence_length)


def train_prompts(cfg: Config) -> list[str]:
    return read_prompt_file(cfg.prompt_file) if cfg.prompt_file else builtin_prompts()


def prompt_cache_path(cfg: Config, prompts: list[str]) -> Path:
    """The index of the cached embeddings of `prompts`: output_dir/prompt_cache/<key>/index.json, keyed by model
    and prompts, written last (its presence means the cache is complete)."""
    key = prompt_cache_key(f"{cfg.model.source}:{cfg.seed if cfg.model.source == 'tiny' else ''}", prompts,
                           cfg.model.max_sequence_length)
    return Path(cfg.output_dir) / "prompt_cache" / key / "index.json"


def prompt_embeddings(cfg: Config, components: FluxComponents, prompts: list[str], device=None) -> PromptCache:
    """Encode every prompt once, on `device` (the accelerator; `leapalign-fast encode-prompts` does it ahead of
    training), then read them per batch from the cache."""
    path = prompt_cache_path(cfg, prompts)
    if not path.is_file():
        text = components.text
        if device is not None:  # T5-XXL on a CPU takes hours for a large prompt set
            text.clip.to(device)
            text.t5.to(device)
        write_prompt_cache(text, prompts, path)
    return PromptCache(path)


def wait_for_files(paths: list[Path], timeout_s: float = 6 * 3600, poll_s: float = 2.0) -> None:
    """Wait for rank 0 to write `paths`, polling the file system: a collective (barrier) would hit the process
    group's timeout while rank 0 encodes a large prompt set. If rank 0 dies, torchrun stops this rank."""
    start = time.monotonic()
    while not all(p.is_file() for p in paths):
        if time.monotonic() - start > timeout_s:
            raise UserError(f"waited {timeout_s / 3600:.1f} h for rank 0 to write the prompt cache {paths[0]}; run "
                            "`leapalign-fast encode-prompts` with the same config before training")  # fmt: skip
        time.sleep(poll_s)


def encode_prompt_cache(cfg: Config) -> list[Path]:
    """The `encode-prompts` command: write the embeddings of the training and evaluation prompts."""
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    components = load_components(cfg, need_text=True)
    device = torch.device("cuda") if torch.cuda.is_available() else None
    paths = []
    for prompts in (train_prompts(cfg), list(cfg.eval_prompts), *validation_prompts(cfg)):
        prompt_embeddings(cfg, components, prompts, device)
        paths.append(prompt_cache_path(cfg, prompts))
    return paths


def add_trainable(transformer, cfg: Config) -> list[torch.nn.Parameter]:
    """Freeze the base, add LoRA (peft) or unfreeze everything; trainable parameters in float32."""
    transformer.requires_grad_(False)
    if cfg.lora.enabled:
        from peft import LoraConfig
        from peft.utils.error import NoMatchingPeftModuleError

        try:
            transformer.add_adapter(
                LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, init_lora_weights="gaussian",
                           target_modules=list(cfg.lora.target_modules))
            )  # fmt: skip
        except NoMatchingPeftModuleError as e:
            raise UserError(f"lora.target_modules {cfg.lora.target_modules} matched no transformer module; use "
                            "names such as 'attn.to_q', 'ff.net.2' (see configs/flux_leapalign.toml)") from e
    else:
        transformer.requires_grad_(True)
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"lora.target_modules {cfg.lora.target_modules} matched no transformer module")
    for p in params:
        p.data = p.data.float()
    return params


def unwrap(model):
    """Strip accelerate/DDP wrappers and torch.compile's `_orig_mod`."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def load_trained(model, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy checkpointed parameters into `model` by name; names or shapes that do not fit are a UserError."""
    named = dict(model.named_parameters())
    missing = [n for n in weights if n not in named]
    if missing:
        raise UserError(f"checkpoint {source} has weights the model lacks (e.g. {missing[0]}); train, resume and "
                        "evaluate with the model/lora config the run was trained with")  # fmt: skip
    with torch.no_grad():
        for n, t in weights.items():
            if named[n].shape != t.shape:
                raise UserError(f"checkpoint weight {n} has shape {tuple(t.shape)}, model expects {tuple(named[n].shape)}")
            named[n].copy_(t)


def trained_state(transformer) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in unwrap(transformer).named_parameters() if p.requires_grad}


class EMA:
    """Exponential moving average of the trained parameters, kept in float32."""

    def __init__(self, named: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {n: t.detach().float().clone() for n, t in named.items()}

    @torch.no_grad()
    def update(self, named: dict[str, torch.Tensor]) -> None:
        for n, t in named.items():
            self.shadow[n].lerp_(t.float(), 1.0 - self.decay)


@dataclass
class Run:
    cfg: Config
    accelerator: Accelerator
    components: FluxComponents
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
    latent_hw: tuple[int, int]
    out: Path
    graphed: GraphedVelocity | None = None  # CUDA-graph replays of the no-grad forwards


def build_run(cfg: Config, accelerator: Accelerator) -> Run:
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir {out} is not writable ({e.strerror}); pick a directory you can write") from None
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
    components = load_components(cfg, need_text=not cached and accelerator.is_main_process)
    latent_hw = components.latent_hw(cfg.resolution)
    if accelerator.is_main_process:  # rank 0 encodes what is not cached, on its accelerator
        for p in prompt_sets:
            prompt_embeddings(cfg, components, p, accelerator.device)
    else:
        wait_for_files([prompt_cache_path(cfg, p) for p in prompt_sets])
    accelerator.wait_for_everyone()
    components.text = None  # text encoders are not needed once prompts are embedded
    # Every rank reads its batches from the cache files (memory-mapped), not the whole cache.
    embeds = prompt_embeddings(cfg, components, prompts)
    eval_embeds = prompt_embeddings(cfg, components, cfg.eval_prompts)

    reward = build_reward(cfg.reward.name, **cfg.reward.options).to(accelerator.device)
    if hasattr(reward, "check_prompts"):  # fail now, not at the first step that draws a bad prompt
        reward.check_prompts(prompts + list(cfg.eval_prompts))
    device, dtype = accelerator.device, DTYPES[cfg.model.dtype]
    components.vae.requires_grad_(False)
    for module in (components.vae, components.transformer):  # cast only when needed: diffusers warns on .to(dtype)
        module.to(device)
        if next(module.parameters()).dtype != dtype:
            module.to(dtype)
    transformer = components.transformer
    torch.manual_seed(cfg.seed + 1)  # LoRA init, identical on every rank
    params = add_trainable(transformer, cfg)
    switches = prepare_transformer(transformer, cfg.model, device)  # checkpointing, then compile, then DDP
    if accelerator.is_main_process:
        print(f"leapalign-fast: transformer {switches}", flush=True)
    graphed = GraphedVelocity(transformer) if cfg.model.cuda_graph and device.type == "cuda" else None
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)  # fmt: skip
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    ema = EMA(trained_state(transformer), cfg.ema_decay) if cfg.ema_decay > 0 else None
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    h, w = latent_hw
    sigmas = flux_schedule(cfg.num_steps, (h // 2) * (w // 2), device=device)  # read every step: on the device
    return Run(cfg, accelerator, components, transformer, optimizer, scheduler, params, ema, reward, prompts, embeds,
               eval_embeds, sigmas, latent_hw, out, graphed)  # fmt: skip


def velocity_for(run: Run, idx: list[int], embeds: PromptCache):
    t5, pooled = embeds.select(idx)
    dev = run.accelerator.device
    h, w = run.latent_hw
    velocity = FluxVelocity(run.transformer, t5.to(dev), pooled.to(dev), latent_image_ids(h, w, dev), run.cfg.guidance)
    return run.graphed.bind(velocity) if run.graphed is not None else velocity


def make_noise(run: Run, batch: int, generator: torch.Generator) -> torch.Tensor:
    """(B, L, 64) packed Gaussian latents, drawn on CPU so every device gets the same numbers."""
    h, w = run.latent_hw
    noise = torch.randn(batch, (h // 2) * (w // 2), 64, generator=generator)
    return noise.to(run.accelerator.device, DTYPES[run.cfg.model.dtype])


def decoder(run: Run):
    h, w = run.latent_hw
    return lambda x: decode_latents(run.components.vae, x, h, w)


@torch.no_grad()
def write_grid(run: Run, step: int) -> Path:
    """Images of the fixed evaluation prompts from fixed noise, with the current weights."""
    n = len(run.cfg.eval_prompts)
    velocity = velocity_for(run, list(range(n)), run.eval_embeds)
    noise = make_noise(run, n, torch.Generator().manual_seed(run.cfg.seed + 12345))
    x0 = sample_trajectory(velocity, noise, run.sigmas).x0
    path = run.out / "grids" / f"step_{step:06d}.png"
    save_grid(decoder(run)(x0), path)
    return path


def save_checkpoint(run: Run, step: int, consumed: int) -> Path:
    acc = run.accelerator
    tmp = ckpt.staging_dir(run.out, step)
    if acc.is_main_process:
        tmp.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    ckpt.save_rank_rng(tmp, acc.process_index)
    acc.wait_for_everyone()
    path = ckpt.checkpoint_root(run.out) / f"step_{step:08d}"
    if acc.is_main_process:
        scaler = acc.scaler.state_dict() if acc.scaler is not None else None
        state = {"consumed": consumed, "scheduler": run.scheduler.state_dict(), "config": config_dict(run.cfg),
                 "world_size": acc.num_processes, "grad_scaler": scaler}  # fmt: skip
        ema = run.ema.shadow if run.ema is not None else None
        ckpt.write_checkpoint(run.out, step, trained_state(run.transformer), ema, run.optimizer.state_dict(), state,
                              run.cfg.keep_checkpoints)  # fmt: skip
    acc.wait_for_everyone()
    return path


def config_differences(saved: dict, current: dict, keys=MATH_KEYS) -> list[str]:
    diffs = []
    for k in keys:
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{k}.{d}" for d in config_differences(a, b, sorted(set(a) | set(b)))]
        elif a != b:
            diffs.append(f"{k} ({a!r} -> {b!r})")
    return diffs


def resume(run: Run) -> tuple[int, int]:
    """Load the newest complete checkpoint; returns (step, prompts consumed). (0, 0) when there is none."""
    if run.accelerator.is_main_process:
        ckpt.remove_partial(run.out)
    run.accelerator.wait_for_everyone()
    found = ckpt.list_checkpoints(run.out)
    if not found:
        return 0, 0
    data = ckpt.read_checkpoint(found[-1], run.accelerator.process_index)
    diffs = config_differences(data["state"]["config"], config_dict(run.cfg))
    if diffs and not run.cfg.resume_force:
        raise UserError(
            f"cannot resume from {found[-1]}: its config differs in {', '.join(diffs)}; use the saved config "
            f"({run.out / 'config.toml'}), a new output_dir, or resume_force=true to resume anyway"
        )
    load_trained(unwrap(run.transformer), data["trained"], found[-1])
    run.optimizer.load_state_dict(data["optimizer"])
    run.scheduler.load_state_dict(data["state"]["scheduler"])
    if run.accelerator.scaler is not None and data["state"].get("grad_scaler"):
        run.accelerator.scaler.load_state_dict(data["state"]["grad_scaler"])
    if run.ema is not None and data["ema"] is not None:
        run.ema.shadow = {n: t.to(run.accelerator.device) for n, t in data["ema"].items()}
    if "rng" in data:
        ckpt.set_rng_state(*data["rng"])
    return int(data["state"]["step"]), int(data["state"]["consumed"])


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines after the resumed step, so the log has no duplicate steps."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a crash mid-write
    write_text_atomic(path, "".join(line + "\n" for line in keep))


@dataclass
class TrainResult:
    steps: int
    wall_seconds: float
    rewards: list[float]  # mean reward of each optimizer step run in this call
    output_dir: str
    grid: str | None
    run: Run


def train(cfg: Config) -> TrainResult:
    """Run `cfg` to `max_steps`. Raises Preempted after a signal, TrainingDiverged after non-finite steps."""
    # accelerate keeps its settings in process-wide singletons; a second run in this process (tests, benchmarks)
    # may use other ones. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=not torch.cuda.is_available())  # fmt: skip
    if cfg.deterministic and torch.cuda.is_available():  # else cuBLAS matmuls raise under deterministic mode
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS makes its first handle
    torch.use_deterministic_algorithms(cfg.deterministic)
    start_time = time.perf_counter()
    method = build_method(cfg.method, cfg.num_steps)  # bad method settings fail before anything is written
    run = build_run(cfg, accelerator)
    metrics_path = run.out / "metrics.jsonl"
    step, consumed = resume(run) if cfg.resume else (0, 0)
    if accelerator.is_main_process:
        write_text_atomic(run.out / "config.toml", config_toml(cfg))
        if step == 0:
            metrics_path.unlink(missing_ok=True)
            write_grid(run, 0)
        truncate_metrics(metrics_path, step)
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
    with StopSignal() as stop:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            losses, rewards, extra, grad_norm, finite = [], [], {}, None, True
            for micro in range(cfg.grad_accum):
                idx = order.take(B * world)[rank * B : (rank + 1) * B]  # this rank's prompts
                gen = step_generator(cfg.seed, step, micro, rank)
                with accelerator.accumulate(run.transformer):
                    inputs = StepInputs(velocity_for(run, idx, run.embeds), make_noise(run, B, gen), run.sigmas,
                                        decoder(run), run.reward, [run.prompts[i] for i in idx], gen)  # fmt: skip
                    out = method(inputs)
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients:
                        # Gradients are all-reduced by now, so every rank sees the same norm and takes the same branch.
                        grad_norm = accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
                        loss_sum = accelerator.reduce(torch.stack([*losses, out.loss.detach()]).sum(), "sum")
                        finite = bool(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))  # host sync
                        if finite:
                            run.optimizer.step()
                    run.optimizer.zero_grad(set_to_none=True)
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
                    f"{_newest(run.out)}. Lower lr, raise max_grad_norm headroom or check the reward."
                )
            # Any rank's signal stops every rank at the same step (a max-reduce: one more sync point).
            stopping = accelerator.reduce(torch.tensor(float(stop.received is not None), device=accelerator.device), "max")
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or bool(stopping):
                path = save_checkpoint(run, step, order.consumed)
                if bool(stopping):
                    bar.close()
                    raise Preempted(step, path)
            if validator is not None and validator(run, step, writer):  # early stop: no new best for a while
                if step % cfg.checkpoint_every != 0 and step != cfg.max_steps:  # else saved above
                    save_checkpoint(run, step, order.consumed)
                break
            if accelerator.is_main_process and cfg.grid_every and step % cfg.grid_every == 0 and step != cfg.max_steps:
                write_grid(run, step)
    bar.close()
    grid = write_grid(run, step) if accelerator.is_main_process else None
    if accelerator.is_main_process and cfg.lora.enabled:  # diffusers-loadable LoRA: FluxPipeline.load_lora_weights
        export_lora(unwrap(run.transformer), run.out / "lora")
        if run.ema is not None:
            export_lora(unwrap(run.transformer), run.out / "lora_ema", run.ema.shadow)
    if writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(step, time.perf_counter() - start_time, rewards_log, str(run.out), str(grid) if grid else None, run)


def _finite_or_none(x: float) -> float | None:
    """JSON has no NaN/inf: non-finite metrics are written as null."""
    return x if math.isfinite(x) else None


def _newest(out: Path) -> str:
    found = ckpt.list_checkpoints(out)
    return str(found[-1]) if found else "none"
