"""What every backbone family shares: reading a local diffusers-format directory (required parts, one UserError
line per gap or bad part, the transformer on the meta device for FSDP), the pipelines' schedule from a scheduler
config, and FluxPipeline's 2x2 latent packing, which SD3.5 and Qwen-Image use too. Family modules import from here,
never from one another.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from leapalign_fast.errors import UserError

_LOGGED: set[str] = set()


def log_once(message: str) -> None:
    """Print `leapalign-fast: <message>` the first time this process is given it (a velocity is built per batch)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        print(f"leapalign-fast: {message}", flush=True)


def unwrap(module):
    """The module under accelerate/DDP's `.module` and torch.compile's `_orig_mod` (its config, its marks)."""
    module = getattr(module, "module", module)
    return getattr(module, "_orig_mod", module)


def pipeline_schedule(
    scheduler_config,
    num_steps: int,
    mu: float | None = None,
    linspace: bool = True,
    flow_sigmas: bool = True,
    device=None,
    sigmas=None,
) -> torch.Tensor:
    """(N + 1,) float32 sigmas, 1 ... 0, exactly as a pipeline's `retrieve_timesteps` sets them on a
    FlowMatchEulerDiscreteScheduler of `scheduler_config` (the model directory's): `linspace` passes
    `sigmas=linspace(1, 1/N, N)` (FLUX.1, FLUX.2-Klein, Qwen-Image), else `num_inference_steps=N` (SD3);
    `flow_sigmas`: a config's `use_flow_sigmas` drops the linspace (FluxPipeline and Flux2KleinPipeline read it,
    QwenImagePipeline does not); `mu` is the resolution's shift where the config shifts dynamically (a static
    `shift` ignores it). Then whatever the config asks: its shift, `shift_terminal`, Karras/exponential/beta sigmas.
    `sigmas`: the N sigmas the pipeline passes where they are not numpy's linspace (ZImagePipeline: torch's).
    A step count the config cannot sample is one UserError line."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if num_steps < 1:
        raise UserError(f"{num_steps} sampling steps: use 1 or more (num_steps, eval_num_steps, eval --steps)")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    terminal = scheduler.config.get("shift_terminal")
    if terminal and num_steps == 1:  # stretch_shift_to_terminal divides by 1 - sigma_last = 0: a NaN first sigma
        raise UserError(
            f"1 sampling step cannot be sampled with this model's scheduler (shift_terminal={terminal} stretches the "
            "schedule by 1 - its last sigma, 0 at one step: NaN); use 2 or more steps (num_steps, eval_num_steps, "
            "eval --steps)"
        )
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps) if linspace else None
    if sigmas is not None and flow_sigmas and scheduler.config.get("use_flow_sigmas"):
        sigmas = None
    scheduler.set_timesteps(num_steps if sigmas is None else None, device="cpu", sigmas=sigmas, mu=mu)
    return scheduler.sigmas.to(torch.float32).to(device)


def missing_parts(root: Path, required: dict, need_text: bool = True) -> list[str]:
    """Paths (relative to root) that a diffusers-format directory lacks of `required` ({subfolder: [file or
    (alternatives)]}); alternatives are joined with ' or '. Text parts are skipped unless `need_text`."""
    missing = []
    for sub, entries in required.items():
        if not need_text and sub.startswith(("text_encoder", "tokenizer")):
            continue
        for entry in entries:
            names = (entry,) if isinstance(entry, str) else entry
            if not any((root / sub / n).is_file() for n in names):
                missing.append(" or ".join(f"{sub}/{n}" for n in names))
    return missing


def model_dir(path, required: dict, need_text: bool, family: str) -> Path:
    """`path` as a local diffusers-format directory holding every part in `required`, else one UserError line."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"model.source: {root} is not a directory; give a local diffusers-format {family} directory")
    missing = missing_parts(root, required, need_text)
    if missing:
        raise UserError(f"model.source {root} is incomplete; missing: {', '.join(missing)}")
    return root


# One transformer, one VAE, one LLM text encoder with its tokenizer (FLUX.2-Klein, Qwen-Image).
SINGLE_ENCODER_PARTS = {
    "transformer": [
        "config.json",
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    ],
    "vae": ["config.json", ("diffusion_pytorch_model.safetensors",)],
    "scheduler": ["scheduler_config.json"],
    "text_encoder": ["config.json", ("model.safetensors", "model.safetensors.index.json")],
    "tokenizer": [("tokenizer.json", "vocab.json")],
}


def load_part(root: Path, what: str, fn):
    """`fn()` (a from_pretrained of part `what`), with a load failure or missing weights as one UserError line."""
    try:
        module = fn()
    except (OSError, ValueError, RuntimeError) as e:  # e.g. weights whose shapes do not match config.json
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load {what} from {root / what}: {first}; check that the directory holds "
            "matching config.json and weights"
        ) from e
    # Weights of another model (e.g. the VAE's in the transformer's place) load with a warning, leaving the
    # parameters they lack on the meta device: refuse here, not at the first .to() or step.
    empty = [n for n, p in getattr(module, "named_parameters", lambda: [])() if p.is_meta]
    if empty:
        raise UserError(
            f"cannot load {what} from {root / what}: its weights file lacks {len(empty)} of the "
            f"model's parameters (e.g. {empty[0]}); is it the {what}'s file?"
        )
    return module


def empty_transformer(root: Path, transformer_cls, dtype: torch.dtype):
    """The transformer of `root/transformer/config.json` with its parameters on the meta device (no memory, no
    weights read) in `dtype`, in eval mode like from_pretrained's; buffers are real (built by __init__, small).
    fsdp.py shards it, then fills each rank's shards from the safetensors files."""
    from accelerate import init_empty_weights

    try:
        config = transformer_cls.load_config(root / "transformer")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {root / 'transformer' / 'config.json'}: {e}; check the model directory") from e
    with init_empty_weights(include_buffers=False):
        model = transformer_cls.from_config(config)
    return torch.nn.Module.to(model, dtype).eval()  # (diffusers' own .to(dtype) warns)


def load_denoiser(
    root: Path, transformer_cls, vae_cls, dtype: torch.dtype, scheduler: bool = True, empty: bool = False
):
    """(transformer, vae in eval mode, scheduler or None) of a local diffusers-format directory, each through
    `load_part` (one UserError line per bad part). `empty`: the transformer on the meta device, weights unread
    (`empty_transformer`, for FSDP)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    kw = dict(torch_dtype=dtype, local_files_only=True)
    if empty:
        transformer = empty_transformer(root, transformer_cls, dtype)
    else:
        transformer = load_part(
            root, "transformer", lambda: transformer_cls.from_pretrained(root, subfolder="transformer", **kw)
        )
    vae = load_part(root, "vae", lambda: vae_cls.from_pretrained(root, subfolder="vae", **kw)).eval()
    sched = (
        FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
        if scheduler
        else None
    )
    return transformer, vae, sched


def load_single_encoder(root: Path, encoder_cls, dtype: torch.dtype):
    """(tokenizer, text encoder in eval mode) of a SINGLE_ENCODER_PARTS directory (FLUX.2-Klein, Qwen-Image)."""
    from transformers import AutoTokenizer

    enc = load_part(
        root,
        "text_encoder",
        lambda: encoder_cls.from_pretrained(root, subfolder="text_encoder", dtype=dtype, local_files_only=True),
    ).eval()
    tok = load_part(root, "tokenizer", lambda: AutoTokenizer.from_pretrained(root / "tokenizer"))
    return tok, enc


def tiny_flux_vae(channels: int, scaling_factor: float = 0.3611, shift_factor: float = 0.1159):
    """A tiny random AutoencoderKL with the 16-channel latent layout (no quant convs) of FLUX.1 (its scaling and
    shift, the defaults: the tiny FLUX.1 and Z-Image builds) and SD3 (which passes its own)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(channels,) * 4,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=min(8, channels),
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), FluxPipeline's 2x2 patch packing."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W), the inverse of `pack_latents`."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)
