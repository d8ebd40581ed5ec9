"""Run configuration: TOML tables mapped onto dataclasses, `key=value` overrides, validated once.

Precedence: CLI overrides > TOML file > dataclass defaults (the defaults are the tiny CPU run).
An unknown key or a value of the wrong type is a UserError naming the key and the fix.

Typed once: `load_config` returns the final Config, `[method]` included (as the chosen method's settings dataclass,
registered by name in `leapalign_fast/methods/settings.py`). No torch: config.py imports only `errors` and the
method settings, so a config error comes before any heavy import.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from leapalign_fast.errors import UserError
from leapalign_fast.hub import is_hub
from leapalign_fast.methods.settings import METHOD_SETTINGS, LeapAlignSettings, MethodSettings

# FLUX attention and MLP projections (double and single blocks), as diffusers' LoRA examples name them.
FLUX_LORA_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
]


@dataclass
class TinyFluxConfig:
    """Sizes of the tiny random FLUX used on CPU (same classes as FLUX.1-dev). Defined here, not in models/, so
    reading a config imports neither torch nor diffusers (config errors appear before the heavy imports)."""

    layers: int = 1
    single_layers: int = 1
    heads: int = 2
    head_dim: int = 16
    text_dim: int = 32
    vae_channels: int = 16
    max_sequence_length: int = 32


@dataclass
class ModelConfig:
    # "tiny" (random init, real classes), a local diffusers-format model directory, or a Hugging Face Hub id
    # ("black-forest-labs/FLUX.1-dev"), fetched into the Hub cache (HF_HOME) with only the parts a command reads
    source: str = "tiny"
    revision: str = ""  # a hub id's branch, tag or commit; "" = its default branch
    family: str = ""  # backbone (models/backbone.py BACKBONES): flux | sd3 ...; "" = from model_index.json, else flux
    dtype: str = "float32"  # dtype of the frozen weights: float32 | bfloat16 | float16
    max_sequence_length: int = 32  # T5 tokens (FLUX.1-dev: 512)
    attention: str = (
        "auto"  # auto (FlashAttention 2 on CUDA for bf16/fp16 weights if usable, else SDPA) | native | flash | ...
    )
    compile: str = "none"  # none | regional (each transformer block) | full
    compile_backend: str = "inductor"
    cuda_graph: bool = False  # replay the no-grad sampler forwards from CUDA graphs (CUDA only)
    gradient_checkpointing: bool = False  # recompute the grad-enabled forwards' activations in the backward
    checkpoint_decode: bool = False  # recompute the VAE decode and the reward in the backward (per VAE block)
    tf32: bool = False  # TF32 matmuls and convolutions on GPUs that have them (FlowBP: on); false: full float32
    # True-CFG backbones (SD3.5, FLUX.2-Klein base): false runs the negative-prompt branch of the grad-enabled
    # forwards without grad (the gradient then flows through the conditional branch only, scaled by guidance)
    uncond_grad: bool = True
    tiny: TinyFluxConfig = field(default_factory=TinyFluxConfig)


@dataclass
class LoraConfig:
    enabled: bool = False  # true: LoRA adapters (peft); false: full fine-tune of the transformer
    rank: int = 16
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: list(FLUX_LORA_TARGETS))


@dataclass
class RewardConfig:
    name: str = "colour"
    options: dict = field(default_factory=dict)  # passed to the reward's builder (weights paths, ...)
    frames: int = 0  # video: score this many evenly spaced frames (all decoded), their mean; 0 = every frame
    temporal_weight: float = 0.0  # video: minus this x the mean |frame_{i+1} - frame_i| (a consistency penalty)


@dataclass
class Config:
    output_dir: str = "runs/tiny"
    seed: int = 0
    max_steps: int = 400  # optimizer steps
    batch_size: int = 8  # samples per process per micro-step
    grad_accum: int = 1
    num_steps: int = 8  # sampling steps N
    resolution: int = 64  # image side in pixels (a square); height/width below override it
    height: int = 0  # image height in pixels; 0 = resolution
    width: int = 0  # image width in pixels; 0 = resolution
    num_frames: int = 1  # video frames (a video backbone, e.g. wan: 1 + a multiple of 4); images: 1
    guidance: float = 3.5  # FLUX guidance embedding
    lr: float = 1e-3
    weight_decay: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.995  # 0 disables the EMA
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate autocast)
    checkpoint_every: int = 100  # optimizer steps; the last step always checkpoints
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest checkpoint in output_dir
    resume_force: bool = False  # resume even if the checkpoint's config differs in a key that changes the math
    max_nonfinite_steps: int = 5  # abort after this many consecutive steps with a non-finite loss or grad norm
    prompt_file: str = ""  # one prompt per line; "" = the built-in colour prompts
    # a published prompt set by name (hpdv2-train, hpdv2-test, hpdv2-benchmark, geneval; "<name>:<local copy>"),
    # or a prompt file; "" = prompt_file
    prompts: str = ""
    eval_prompts: list[str] = field(
        default_factory=lambda: ["a red square", "a green circle", "a blue triangle", "a yellow star"]
    )
    grid_every: int = 0  # image grid every n steps; 0 = only at start and end
    # Validation during training (leapalign_fast/validation.py): every eval_every steps (and at steps 0 and max_steps)
    eval_every: int = 0  # 0 = off
    eval_prompt_file: str = ""  # validation prompts, one per line (repeats: more images of a prompt, other noise)
    eval_rewards: list[str] = field(default_factory=lambda: ["reward"])  # reward | evaluator | a label below
    eval_reward_options: dict = field(default_factory=dict)  # label -> {name = registered reward, its options}
    eval_num_steps: int = 0  # sampling steps of validation images; 0 = num_steps
    # the validation score that picks the `best` checkpoint and drives early stop: an eval_rewards label, or one of
    # the toy evaluator's columns, "evaluator/<column>" (strict, extra, empty, artefact, ...); "" = the first label
    best_metric: str = ""
    best_mode: str = ""  # max | min; "" = the metric's own direction (scores: max; extra, empty, artefact: min)
    early_stop_patience: int = 0  # stop after this many validations without a new best; 0 = never
    # Experiment trackers, through accelerate (leapalign_fast/trackers.py): "tensorboard", "wandb" (optional
    # dependency: pip install 'leapalign-fast[wandb]'), a list of them, or "none"; metrics.jsonl is always written
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    deterministic: bool = False  # torch.use_deterministic_algorithms
    # The method's random draws ((k, j), ReFL's step, ...) per micro-step: "per_rank" (each rank its own: lower
    # variance of the global gradient) or "shared" (every rank the same, as FlowBP); the expected gradient is the same
    method_draws: str = "per_rank"
    # FSDP2 (fully_shard per transformer block, then the root) for full fine-tunes and LoRA; checkpoints are then
    # sharded (torch.distributed.checkpoint), resumable at another world size (leapalign_fast/dist_checkpoint.py)
    fsdp: bool = False
    async_checkpoint: bool = True  # fsdp: shards are written in the background while training goes on
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    method: MethodSettings = field(default_factory=LeapAlignSettings)  # [method]: `name` picks the settings class
    reward: RewardConfig = field(default_factory=RewardConfig)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels: `height`/`width` where set, else `resolution`."""
        return (self.height or self.resolution, self.width or self.resolution)


def _keys(cls, prefix="") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        out.append(name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += _keys(hints[f.name], name + ".")
    return out


RENAMED = {"tensorboard": 'report_to (tensorboard=false is report_to="none")'}


def _unknown(key: str, root_cls) -> UserError:
    if key in RENAMED:
        return UserError(f"config key '{key}' was replaced by {RENAMED[key]}")
    close = difflib.get_close_matches(key, _keys(root_cls), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see configs/defaults.toml for every key"
    return UserError(f"unknown config key '{key}'{hint}")


def check_type(key: str, value, hint):
    origin = typing.get_origin(hint)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
    }
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, list) and all(ok[item](v) for v in value):
            return [float(v) if item is float else v for v in value]
        want = f"a list of {item.__name__}"
    else:
        if ok[hint](value):
            return float(value) if hint is float else value
        want = ("an " if hint.__name__[0] in "aeiou" else "a ") + hint.__name__
    raise UserError(f"config key '{key}' must be {want}, got {value!r} ({type(value).__name__})")


def _build(cls, data: dict, prefix: str, root_cls):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = prefix + key
        if key not in names:
            raise _unknown(full, root_cls)
        hint = hints[key]
        if full == "report_to" and isinstance(value, str):  # one tracker by name, or "none"
            value = [] if value == "none" else [value]
        if hint is MethodSettings:
            kwargs[key] = method_from_table(value, full + ".")
        elif dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"config key '{full}' is a table; write it as [{full}] with keys inside")
            kwargs[key] = _build(hint, value, full + ".", root_cls)
        else:
            kwargs[key] = check_type(full, value, hint)
    return cls(**kwargs)


def method_from_table(data, prefix: str = "method.") -> MethodSettings:
    """The `[method]` table as the chosen method's settings (its values checked in `validate`, which knows
    num_steps). Keys that belong only to other methods are ignored, so one file can switch methods with
    `method.name=...`; an error names only the chosen method's keys."""
    if not isinstance(data, dict):
        raise UserError(f"config key '{prefix[:-1]}' is a table; write it as [{prefix[:-1]}] with keys inside")
    name = check_type(prefix + "name", data.get("name", "leapalign"), str)
    if name not in METHOD_SETTINGS:
        close = difflib.get_close_matches(name, METHOD_SETTINGS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown method '{name}'; known methods: {', '.join(sorted(METHOD_SETTINGS))}.{hint}")
    cls = METHOD_SETTINGS[name]
    hints, own = typing.get_type_hints(cls), set(cls.keys())
    others = {k for c in METHOD_SETTINGS.values() for k in c.keys()} - own
    kwargs = {}
    for key, value in data.items():
        if key in own:
            kwargs[key] = check_type(prefix + key, value, hints[key])
        elif key not in others:
            close = difflib.get_close_matches(key, sorted(own), n=1, cutoff=0.5)
            hint = (
                f"; did you mean '{prefix}{close[0]}'?"
                if close
                else f"; method '{name}' takes {', '.join(sorted(own))}"
            )
            raise UserError(f"unknown config key '{prefix}{key}'{hint}")
    return cls(**kwargs)


def parse_value(text: str):
    """A CLI override value as TOML (`3`, `1e-4`, `true`, `[0, 4]`, `"x"`), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise UserError(f"override '{item}' must look like key=value (dotted keys for tables, e.g. method.alpha=0.5)")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{item}': '{p}' is not a table")
    node[parts[-1]] = parse_value(text.strip())


def _relative(value, base: Path) -> bool:
    """A relative local path (not "", "tiny", a hub id `org/name` that is no path beside the config, or hf://)."""
    if not isinstance(value, str) or value in ("", "tiny") or Path(value).is_absolute():
        return False
    return not (value.startswith("hf://") or (is_hub(value) and not (base / value).exists()))


def resolve_file_paths(data: dict, base: Path) -> None:
    """Relative paths written in a config file are relative to that file's directory (so `configs/tiny.toml` finds
    `../assets/toy` from any working directory): `model.source` (unless "tiny"), `prompt_file` and the reward's
    `path` option (a path or a list of paths). Hub ids (`org/name` naming nothing beside the file, `hf://...`) stay
    as they are. Paths in command-line overrides stay relative to the working directory."""

    def fix(value):
        return os.path.normpath(base / value) if _relative(value, base) else value

    model, reward = data.get("model"), data.get("reward")
    if isinstance(model, dict) and "source" in model:
        model["source"] = fix(model["source"])
    for key in ("prompt_file", "eval_prompt_file"):
        if key in data:
            data[key] = fix(data[key])
    if isinstance(data.get("prompts"), str) and (base / data["prompts"]).is_file():  # a prompt file, not a set name
        data["prompts"] = fix(data["prompts"])
    options = [reward.get("options")] if isinstance(reward, dict) else []
    if isinstance(data.get("eval_reward_options"), dict):
        options += list(data["eval_reward_options"].values())
    for opts in options:
        if isinstance(opts, dict) and "path" in opts:
            path = opts["path"]
            opts["path"] = [fix(x) for x in path] if isinstance(path, list) else fix(path)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a TOML file (or nothing: defaults), apply overrides, and validate every key and type."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} not found; pass an existing TOML file, e.g. configs/tiny.toml")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {p} is not valid TOML: {e}") from None
        resolve_file_paths(data, p.resolve().parent)
    for item in overrides:
        apply_override(data, item)
    cfg = _build(Config, data, "", Config)
    validate(cfg)
    return cfg


FLOAT32_MAX = 3.4028234663852886e38


def _numbers(obj, prefix=""):
    """(key, value) of every float/int setting, nested tables and lists included (bools excluded)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, key + ".")
        elif isinstance(value, list):
            yield from (
                (f"{key}[{i}]", v)
                for i, v in enumerate(value)
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            )
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value


def check_numbers(obj, prefix: str = "") -> None:
    """Every number of a settings dataclass (nested tables and lists too) finite and within float32."""
    for key, value in _numbers(obj, prefix):
        if not math.isfinite(value):
            raise UserError(f"config key '{key}' must be a finite number, got {value}")
        # Optimizer state and weights are float32: a larger value overflows inside the first step.
        if abs(value) > FLOAT32_MAX and not isinstance(value, int):
            raise UserError(f"config key '{key}' must be within float32 range (|x| <= 3.4e38), got {value}")


def validate_numbers(cfg: Config) -> None:
    """Every numeric key finite and in its range, so no value can train backwards, into NaN or into a crash."""

    def need(cond, msg):
        if not cond:
            raise UserError(msg)

    check_numbers(cfg)
    need(cfg.output_dir.strip() != "", "output_dir must not be empty; name the run's directory, e.g. output_dir=runs/x")
    need(0 <= cfg.seed < 2**63, f"seed must be in [0, 2^63), got {cfg.seed}")
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.adam_eps >= 1e-30, f"adam_eps must be > 0 (and >= 1e-30, float32 precision), got {cfg.adam_eps}")
    need(
        len(cfg.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in cfg.adam_betas),
        f"adam_betas must be two values in [0, 1), got {cfg.adam_betas}",
    )
    need(cfg.warmup_steps >= 0, f"warmup_steps must be >= 0 (0: no warm-up), got {cfg.warmup_steps}")
    need(cfg.max_grad_norm >= 0, f"max_grad_norm must be > 0, or 0 for no clipping, got {cfg.max_grad_norm}")
    need(cfg.grid_every >= 0, f"grid_every must be >= 0 (0: only at start and end), got {cfg.grid_every}")
    need(cfg.guidance >= 0, f"guidance must be >= 0, got {cfg.guidance}")
    need(
        1 <= cfg.model.max_sequence_length <= 512,
        f"model.max_sequence_length must be in [1, 512] (FLUX's T5 limit), got {cfg.model.max_sequence_length}",
    )
    need(cfg.lora.alpha > 0, f"lora.alpha must be > 0, got {cfg.lora.alpha}")
    need(
        len(cfg.eval_prompts) >= 1 and all(p.strip() for p in cfg.eval_prompts),
        "eval_prompts must hold at least one non-empty prompt (they draw the progress grids)",
    )
    need(
        not (cfg.prompts and cfg.prompt_file),
        f"prompts = '{cfg.prompts}' and prompt_file = '{cfg.prompt_file}' both name the training prompts; keep one",
    )
    need(cfg.resolution <= 8192, f"resolution must be <= 8192, got {cfg.resolution}")
    for key in ("height", "width"):
        side = getattr(cfg, key)
        need(0 <= side <= 8192, f"{key} must be in [1, 8192] pixels, or 0 for resolution, got {side}")
    need(1 <= cfg.num_frames <= 1025, f"num_frames must be in [1, 1025] (1: an image), got {cfg.num_frames}")
    need(cfg.reward.frames >= 0, f"reward.frames must be >= 0 (0: every frame), got {cfg.reward.frames}")
    need(cfg.reward.temporal_weight >= 0, f"reward.temporal_weight must be >= 0, got {cfg.reward.temporal_weight}")


def validate(cfg: Config) -> None:
    def need(cond, msg):
        if not cond:
            raise UserError(msg)

    validate_numbers(cfg)

    for key in (
        "max_steps",
        "batch_size",
        "grad_accum",
        "num_steps",
        "resolution",
        "checkpoint_every",
        "keep_checkpoints",
        "max_nonfinite_steps",
    ):
        need(getattr(cfg, key) >= 1, f"config key '{key}' must be >= 1, got {getattr(cfg, key)}")
    need(0.0 <= cfg.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(len(cfg.adam_betas) == 2, f"adam_betas must have two values, got {cfg.adam_betas}")
    need(
        cfg.mixed_precision in ("no", "bf16", "fp16"),
        f"mixed_precision must be no, bf16 or fp16, got '{cfg.mixed_precision}'",
    )
    need(
        cfg.model.dtype in ("float32", "bfloat16", "float16"),
        f"model.dtype must be float32, bfloat16 or float16, got '{cfg.model.dtype}'",
    )
    need(
        cfg.model.compile in ("none", "regional", "full"),
        f"model.compile must be none, regional or full, got '{cfg.model.compile}'",
    )
    need(cfg.lora.rank >= 1, f"lora.rank must be >= 1, got {cfg.lora.rank}")
    need(
        cfg.method_draws in ("per_rank", "shared"),
        f"method_draws must be 'per_rank' or 'shared', got '{cfg.method_draws}'",
    )
    validate_report_to(cfg, need)
    validate_validation(cfg, need)
    validate_fsdp(cfg, need)
    validate_method(cfg, need)


def validate_method(cfg: Config, need) -> None:
    """The chosen method's keys (they depend on num_steps) and what it cannot run with."""
    cfg.method.validate(cfg.num_steps)
    need(
        not (cfg.mixed_precision == "fp16" and cfg.method.decode_apart()),
        f"method '{cfg.method.name}' with "
        "method.reward_first=true takes the reward's gradient before the trainer's backward, outside fp16's loss "
        "scaling (small gradients would underflow); use mixed_precision='bf16' or 'no', or method.reward_first=false",
    )


def validate_report_to(cfg: Config, need) -> None:
    """report_to: known trackers, each once ("none", read as an empty list, stands alone)."""
    known = ("tensorboard", "wandb")
    for name in cfg.report_to:
        need(
            name in known,
            f"report_to: unknown tracker '{name}'; use tensorboard, wandb, a list of them, or \"none\"",
        )
    need(len(set(cfg.report_to)) == len(cfg.report_to), f"report_to names a tracker twice: {cfg.report_to}")


def validate_fsdp(cfg: Config, need) -> None:
    """What cannot run sharded: refused before anything is loaded."""
    if not cfg.fsdp:
        return
    need(
        not cfg.model.cuda_graph,
        "model.cuda_graph=true cannot be used with fsdp=true: the graphs would replay the "
        "bare module, whose parameters FSDP has sharded; set model.cuda_graph=false",
    )
    need(
        cfg.mixed_precision != "fp16",
        "mixed_precision='fp16' is not supported with fsdp=true (it needs a sharded "
        "grad scaler); use mixed_precision='bf16'",
    )
    need(
        not cfg.eval_every,
        "eval_every > 0 is not supported with fsdp=true yet (validation samples on rank 0 alone); "
        "set eval_every=0 and score exported checkpoints with `leapalign-fast eval`",
    )


def validate_validation(cfg: Config, need) -> None:
    """The validation keys: each mistake its own error naming the key and the fix."""
    need(cfg.eval_every >= 0, f"eval_every must be >= 0 (0 = no validation), got {cfg.eval_every}")
    need(cfg.eval_num_steps >= 0, f"eval_num_steps must be >= 0 (0 = num_steps), got {cfg.eval_num_steps}")
    need(
        cfg.early_stop_patience >= 0,
        f"early_stop_patience must be >= 0 (0 = never stop early), got {cfg.early_stop_patience}",
    )
    need(
        not cfg.early_stop_patience or cfg.eval_every,
        "early_stop_patience needs validation: set eval_every > 0 and eval_prompt_file",
    )
    need(not cfg.best_metric or cfg.eval_every, "best_metric needs validation: set eval_every > 0 and eval_prompt_file")
    need(
        cfg.best_mode in ("", "max", "min"),
        f"best_mode must be 'max', 'min' or '' (the metric's own), got {cfg.best_mode!r}",
    )
    if not cfg.eval_every:
        return
    need(
        bool(cfg.eval_prompt_file),
        f"eval_every = {cfg.eval_every} needs eval_prompt_file: a text file of validation "
        "prompts, one per line (the toy benchmark's: assets/toy/prompts_validation.txt)",
    )
    need(
        bool(cfg.eval_rewards),
        "eval_rewards is empty; name at least one scorer: 'reward' (the trained one), "
        "'evaluator' (toy captions) or a label of eval_reward_options",
    )
    need(len(set(cfg.eval_rewards)) == len(cfg.eval_rewards), f"eval_rewards names a scorer twice: {cfg.eval_rewards}")
    for label in cfg.eval_reward_options:
        need(
            isinstance(cfg.eval_reward_options[label], dict),
            f"eval_reward_options.{label} must be a table of the "
            'reward\'s options, e.g. { name = "toy", path = "reward.safetensors" }',
        )
    head, column = cfg.best_metric.partition("/")[::2]
    need(
        not cfg.best_metric or head in cfg.eval_rewards,
        f"best_metric '{cfg.best_metric}' is not one of "
        f"eval_rewards {cfg.eval_rewards}; pick one of them (or leave it empty for the first)",
    )
    need(
        not column or head == "evaluator",
        f"best_metric '{cfg.best_metric}': only the toy evaluator has columns ('evaluator/strict', "
        f"'evaluator/artefact', ...); use the label '{head}' alone",
    )


def config_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_toml(cfg: Config) -> str:
    return tomli_w.dumps(config_dict(cfg))
