"""Building a run's parts from a Config, shared by training and evaluation: the backbone's components, the
prompt-embedding cache, the trainable parameters (LoRA or full) and loading trained weights back into them.

Only the backbone interface (models/backbone.py) is used: nothing here knows a model family. The backbone is
resolved once, by the caller (`backbone_for(cfg.model)`), and passed to every function here that needs it.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch

from leapalign_fast import hub
from leapalign_fast.config import Config
from leapalign_fast.dtypes import DTYPES
from leapalign_fast.errors import UserError
from leapalign_fast.models.backbone import Backbone, backbone_for
from leapalign_fast.models.common import unwrap
from leapalign_fast.models.text import PromptCache, check_prompt_cache, prompt_cache_key, write_prompt_cache
from leapalign_fast.prompts import (
    PromptSet,
    builtin_prompts,
    prompts_sha256,
    read_prompt_file,
    resolve_prompt_set,
    validation_prompts,
)
from leapalign_fast.runlock import check_writable


def load_components(cfg: Config, backbone: Backbone, need_text: bool = True, empty_transformer: bool = False):
    """The model's components; the text encoders only when some prompt embeddings are not cached yet.
    `empty_transformer`: a model directory's transformer on the meta device, weights unread (FSDP reads each rank's
    shards itself); the tiny random model is built whole."""
    if cfg.model.source == "tiny":
        return backbone.build_tiny(cfg.model.tiny, cfg.seed)
    root = model_root(cfg, need_text)
    try:
        return backbone.load(
            root,
            DTYPES[cfg.model.dtype],
            need_text=need_text,
            max_sequence_length=cfg.model.max_sequence_length,
            empty_transformer=empty_transformer,
        )
    except Exception as e:  # noqa: BLE001 - the parts' own loaders name what they know; this is the rest
        # e.g. safetensors' SafetensorError for a truncated text encoder (transformers does not wrap it)
        if isinstance(e, UserError) and hub.is_hub(cfg.model.source):  # say which repository the folder is
            fix = "; download it with network access" + (" (HF_HUB_OFFLINE=1 is set)" if hub.offline() else "")
            raise UserError(f"{e} (the Hugging Face cache's snapshot of {cfg.model.source}{fix})") from None
        if isinstance(e, UserError) or not (
            type(e).__name__ == "SafetensorError" or isinstance(e, (EOFError, OSError))
        ):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(
            f"cannot load the model from {cfg.model.source} ({type(e).__name__}: {first}); a weights file there is "
            "truncated or damaged: restore or re-download that part"
        ) from None


def model_root(cfg: Config, need_text: bool = True) -> Path:
    """`model.source` as a local diffusers-format folder: a local path as it is, a hub id as its cache snapshot
    holding the parts this command reads (`hub.model_patterns`: no text encoders when every prompt is cached)."""
    return hub.resolve_model(cfg.model.source, cfg.model.revision or None, need_text)


def to_device(module: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to `device`, cast only when needed (diffusers warns on .to(dtype))."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)
    return module


def train_prompt_set(cfg: Config) -> PromptSet:
    """The training prompts: `prompts` (a published set by name, or a file), else `prompt_file`, else the built-in
    colour prompts; with their source and checksum (a run records them in its config.toml)."""
    if cfg.prompts:
        return resolve_prompt_set(cfg.prompts)
    if cfg.prompt_file:
        prompts = read_prompt_file(cfg.prompt_file)
        return PromptSet(cfg.prompt_file, prompts, [""] * len(prompts), cfg.prompt_file, prompts_sha256(prompts))
    prompts = builtin_prompts()
    return PromptSet(
        "builtin", prompts, [""] * len(prompts), "leapalign_fast.prompts.builtin_prompts", prompts_sha256(prompts)
    )


def train_prompts(cfg: Config) -> list[str]:
    return train_prompt_set(cfg).prompts


def prompt_cache_path(cfg: Config, backbone: Backbone, prompts: list[str]) -> Path:
    """The index of the cached embeddings of `prompts`: output_dir/prompt_cache/<key>/index.json, keyed by model
    (the backbone's `cache_prefix`, the source, the seed of a tiny model) and prompts, written last (its presence
    means the cache is complete)."""
    source = cfg.model.source + (f"@{cfg.model.revision}" if cfg.model.revision else "")
    model_id = f"{backbone.cache_prefix}{source}:{cfg.seed if cfg.model.source == 'tiny' else ''}"
    key = prompt_cache_key(model_id, prompts, cfg.model.max_sequence_length)
    return Path(cfg.output_dir) / "prompt_cache" / key / "index.json"


def prompt_cache_intact(cfg: Config, backbone: Backbone, prompts: list[str]) -> bool:
    """Whether the cache of `prompts` exists and verifies (every chunk's sha256; hashed once per process)."""
    return check_prompt_cache(prompt_cache_path(cfg, backbone, prompts), prompts) is None


def prompt_embeddings(
    cfg: Config, backbone: Backbone, components, prompts: list[str], device=None, verify: bool = True
) -> PromptCache:
    """Encode every prompt once, on `device` (the accelerator; `leapalign-fast encode-prompts` does it ahead of
    training), then read them per batch from the cache. The cache is verified first (`verify`; a rank that is not
    the main one trusts the main one's check): one that is damaged, stale or of another prompt set is encoded again,
    with one line."""
    path = prompt_cache_path(cfg, backbone, prompts)
    problem = check_prompt_cache(path, prompts) if verify or not path.is_file() else None
    if problem is not None:
        if path.parent.exists():  # there, but unusable (absent is a first run: nothing to say)
            print(
                f"leapalign-fast: prompt cache {path.parent} is unusable ({problem}); encoding its {len(prompts)} "
                "prompts again",
                flush=True,
            )
        text = components.text
        if text is None:
            raise UserError(
                f"prompt cache {path.parent} is unusable ({problem}) and the text encoders are not loaded; rerun "
                "(it is encoded again), or run `leapalign-fast encode-prompts` with this config first"
            )
        if device is not None:  # T5-XXL (or an LLM encoder) on a CPU takes hours for a large prompt set
            for module in vars(text).values():
                if isinstance(module, torch.nn.Module):
                    module.to(device)
        write_prompt_cache(partial(backbone.encode_prompts, text), prompts, path)
    return PromptCache(path, prompts, verify=False)  # verified or written just now


def wait_for_files(paths: list[Path], timeout_s: float = 6 * 3600, poll_s: float = 2.0) -> None:
    """Wait for rank 0 to write `paths`, polling the file system: a collective (barrier) would hit the process
    group's timeout while rank 0 encodes a large prompt set. If rank 0 dies, torchrun stops this rank."""
    start = time.monotonic()
    while not all(p.is_file() for p in paths):
        if time.monotonic() - start > timeout_s:
            raise UserError(
                f"waited {timeout_s / 3600:.1f} h for rank 0 to write the prompt cache {paths[0]}; run "
                "`leapalign-fast encode-prompts` with the same config before training"
            )
        time.sleep(poll_s)


def encode_prompt_cache(cfg: Config) -> list[Path]:
    """The `encode-prompts` command: write the embeddings of the training and evaluation prompts."""
    check_writable(Path(cfg.output_dir), "output_dir")  # a file, or a folder under one: one line
    backbone = backbone_for(cfg.model)
    components = load_components(cfg, backbone, need_text=True)
    device = torch.device("cuda") if torch.cuda.is_available() else None
    paths = []
    for prompts in (train_prompts(cfg), list(cfg.eval_prompts), *validation_prompts(cfg)):
        prompt_embeddings(cfg, backbone, components, prompts, device)
        paths.append(prompt_cache_path(cfg, backbone, prompts))
    return paths


def lora_targets(cfg: Config, backbone: Backbone) -> list[str]:
    """`lora.target_modules`; left at its default, the backbone's own names (`Backbone.resolve_lora_targets`)."""
    return backbone.resolve_lora_targets(cfg.lora.target_modules)


def add_trainable(transformer, cfg: Config, backbone: Backbone, upcast: bool = True) -> list[torch.nn.Parameter]:
    """Freeze the base, add LoRA (peft) or unfreeze everything; trainable parameters in float32 (`upcast=False`:
    left in the storage dtype, for FSDP, which upcasts them block by block as it shards)."""
    transformer.requires_grad_(False)
    targets = lora_targets(cfg, backbone)
    if cfg.lora.enabled:
        from peft import LoraConfig
        from peft.utils.error import NoMatchingPeftModuleError

        try:
            transformer.add_adapter(
                LoraConfig(
                    r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, init_lora_weights="gaussian", target_modules=targets
                )
            )
        except NoMatchingPeftModuleError as e:
            raise UserError(
                f"lora.target_modules {targets} matched no transformer module; use "
                "names such as 'attn.to_q', 'ff.net.2' (see configs/flux_leapalign.toml)"
            ) from e
    else:
        transformer.requires_grad_(True)
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"lora.target_modules {targets} matched no transformer module")
    for p in params if upcast else ():
        p.data = p.data.float()
    return params


def load_trained(model, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy checkpointed parameters into `model` by name; names or shapes that do not fit are a UserError."""
    named = dict(model.named_parameters())
    missing = [n for n in weights if n not in named]
    if missing:
        raise UserError(
            f"checkpoint {source} has weights the model lacks (e.g. {missing[0]}); train, resume and "
            "evaluate with the model/lora config the run was trained with"
        )
    with torch.no_grad():
        for n, t in weights.items():
            if named[n].shape != t.shape:
                raise UserError(
                    f"checkpoint weight {n} has shape {tuple(t.shape)}, model expects {tuple(named[n].shape)}"
                )
            named[n].copy_(t)


def trained_state(transformer) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in unwrap(transformer).named_parameters() if p.requires_grad}
