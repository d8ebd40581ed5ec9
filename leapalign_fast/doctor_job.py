"""`leapalign-fast doctor`'s checks of what the job reads and writes: model and reward weights (local or on the Hub,
nothing downloaded), the prompt sets and their embedding caches, device memory and disk against the job's sizes.
The command is leapalign_fast/doctor.py; `Check` and `Context` are in doctor_machine.py."""

from __future__ import annotations

import shutil
from pathlib import Path

from leapalign_fast.doctor_machine import GIB, Check, Context
from leapalign_fast.errors import UserError

# ---- measurements (the checks' only view of the machine's free space) --------------------------------------------


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def free_device_bytes(device) -> int | None:
    from leapalign_fast.preflight import available_bytes

    return available_bytes(device)


def hub_fix(state: str, key: str, value: str) -> str:
    """The fix for a Hub status that stops a run (`key`: the config key that names `value`)."""
    return {
        "missing": f"download it first (`hf download {value}` with the same HF_HOME, or one run with network access), "
        f"or set {key} to a local copy",
        "gated": f"accept {value}'s license on its Hub page, then `hf auth login` (or set HF_TOKEN)",
        "not-found": f"check {key} (and model.revision)",
    }.get(state, f"check {key}")


def check_weights(ctx: Context, need_text: bool = False) -> Check:
    """model.source present / stale / missing / gated / not found, without downloading: the parts every run reads,
    or (`need_text`: some prompts are not cached) the text encoders too. Sets ctx.backbone and ctx.model_dir."""
    from leapalign_fast import hub
    from leapalign_fast.models.backbone import backbone_for

    cfg, source = ctx.cfg, ctx.cfg.model.source
    name = "text-encoders" if need_text else "weights"
    if source == "tiny":
        ctx.backbone = backbone_for(cfg.model)
        return Check(name, "ok", "model.source=tiny: a random model of the real classes, built here")
    state = hub.status(source, cfg.model.revision or None, hub.model_patterns(need_text))
    if state.state not in ("local", "present", "stale"):
        fix = hub_fix(state.state, "model.source", source)
        if need_text:
            fix = f"some prompts are not cached, so the run needs the text encoders: {fix}, or run encode-prompts first"
        return Check(name, "fail", f"model.source {state.state}: {state.detail}", fix)
    ctx.model_dir = state.path
    if need_text and state.state == "local":  # a local folder: are the text encoders' files there at all
        found = [f for pattern in hub.TEXT_PATTERNS for f in Path(state.path).glob(pattern)]
        if not found:
            return Check(
                name,
                "fail",
                f"model.source {state.path} has no text_encoder*/ or tokenizer*/ files",
                "some prompts are not cached, so the run needs the text encoders: add them to the folder, or run "
                "encode-prompts where they are and copy output_dir/prompt_cache here",
            )
    if ctx.backbone is None:
        try:
            ctx.backbone = backbone_for(cfg.model)
        except UserError as e:
            return Check(name, "fail", str(e), "set model.family, or fix the folder's model_index.json")
    return Check(name, "warn" if state.state == "stale" else "ok", f"model.source {state.state}: {state.detail}")


def _reward_sources() -> dict[str, list[tuple[str, str, list[str] | None]]]:
    """Reward name -> (option, its default source, the files a run reads of a repository; None: one file) for the
    rewards whose builders read published weights (rewards/clip_rewards.py, rewards/imagereward.py)."""
    from leapalign_fast.rewards import clip_rewards as cr
    from leapalign_fast.rewards import imagereward as ir

    tokenizer = ["config.json", *cr.TOKENIZER_FILES]
    weights = [*tokenizer, "model.safetensors*"]
    return {
        "clip": [("path", cr.CLIP_L, weights)],
        "pickscore": [("path", cr.PICKSCORE, weights), ("tokenizer", cr.CLIP_H, tokenizer)],
        "hpsv2.1": [("clip", cr.CLIP_H, tokenizer), ("checkpoint", cr.HPS_V21, None)],
        "aesthetic": [("clip", cr.CLIP_L, weights), ("mlp", cr.AESTHETIC_MLP, None)],
        "imagereward": [("checkpoint", ir.IMAGEREWARD, None), ("tokenizer", ir.BERT, ir.BERT_FILES)],
    }


def check_reward_weights(cfg) -> list[Check]:
    """Each weight source the reward (or each part of a weighted sum) reads: its option, else its published default;
    a local path exists, a Hub id / hf:// file is present / stale / missing / gated (nothing downloaded)."""
    from leapalign_fast import hub
    from leapalign_fast.rewards import parse_mixture

    name, options = cfg.reward.name, cfg.reward.options
    mixture = "," in name or ":" in name
    parts = {p: options.get(p, {}) for p in parse_mixture(name)} if mixture else {name: options}
    sources = _reward_sources()
    checks = []
    for part, opts in parts.items():
        wanted = [(o, opts.get(o) or default, files) for o, default, files in sources.get(part, [])]
        if part not in sources and isinstance(opts, dict) and opts.get("path"):  # toy rewards: their weight files
            paths = opts["path"] if isinstance(opts["path"], list) else [opts["path"]]
            wanted = [("path", p, None) for p in paths]
        for option, value, files in wanted:
            what = f"reward {part}: options.{option}"
            ref = hub.parse(value)
            if ref is not None and ref.filename:
                files = [ref.filename]
            state = hub.status(value, None, files, ref.repo_type if ref else "model", what)
            bad = state.state not in ("present", "stale", "local")
            detail = state.detail if state.detail.startswith(what) else f"{what} {state.state}: {state.detail}"
            checks.append(
                Check(
                    "reward-weights",
                    "fail" if bad else ("warn" if state.state == "stale" else "ok"),
                    detail,
                    hub_fix(state.state, f"reward.options.{option}", ref.repo_id if ref else str(value)) if bad else "",
                )
            )
    return checks


def _published_prompt_set(cfg) -> Check | None:
    """`prompts = "<published set>"` read from its Hub dataset: a failure when its files are not there to read (not
    cached offline, gated, not found), without downloading them; None when they are (or the prompts are local)."""
    from leapalign_fast import hub
    from leapalign_fast.prompts import PROMPT_SETS

    name, _, where = cfg.prompts.partition(":")
    spec = PROMPT_SETS.get(name)
    if spec is None or where or spec.repo is None:
        return None
    state = hub.status(spec.repo, None, list(spec.files.values()), "dataset", f"prompts {name}")
    if state.state in ("present", "stale"):
        return None
    fix = hub_fix(state.state, "prompts", f"{spec.repo} --repo-type dataset")
    return Check("prompts", "fail", f"prompt set {name} {state.state}: {state.detail}", fix)


def check_prompts(ctx: Context) -> Check:
    """Each prompt set's embedding cache in output_dir (keyed by model and prompts): present, missing or stale."""
    from leapalign_fast.build import prompt_cache_path, train_prompts
    from leapalign_fast.models.text import check_prompt_cache
    from leapalign_fast.prompts import validation_prompts

    cfg = ctx.cfg
    if ctx.backbone is None:
        return Check("prompts", "skipped", "no backbone (see weights)")
    published = _published_prompt_set(cfg)
    if published is not None:
        return published
    try:
        sets = {"training": train_prompts(cfg), "eval_prompts": list(cfg.eval_prompts)}
        sets.update({"validation": v for v in validation_prompts(cfg)})
    except UserError as e:
        return Check("prompts", "fail", str(e), "fix prompts / prompt_file / eval_prompt_file")
    present, missing, stale = [], [], []
    for label, prompts in sets.items():
        path = prompt_cache_path(cfg, ctx.backbone, prompts)
        problem = check_prompt_cache(path, prompts)
        if problem is None:
            present.append(label)
        elif not path.parent.exists():
            missing.append(label)
        else:
            stale.append(f"{label} ({path.parent}: {problem})")
    ctx.need_text = bool(missing or stale)
    counts = f"{len(sets['training'])} training prompts"
    if stale:
        return Check(
            "prompts",
            "fail",
            f"prompt cache stale: {'; '.join(stale)}",
            f"rerun `leapalign-fast encode-prompts` with this config (it encodes them again), or delete {stale[0]}",
        )
    if missing:
        return Check(
            "prompts",
            "warn",
            f"{counts}; not cached yet: {', '.join(missing)} (rank 0 loads the text encoders and encodes them at "
            "start; `leapalign-fast encode-prompts` does it ahead)",
        )
    return Check("prompts", "ok", f"{counts}; cached and verified: {', '.join(present)}")


def _build_components(ctx: Context) -> str | None:
    """The model's components for the estimates (transformer on the meta device); None, or why they could not be."""
    from leapalign_fast.models.backbone import DTYPES

    cfg = ctx.cfg
    if ctx.build_error is not None:
        return ctx.build_error
    if ctx.backbone is None:
        return "no backbone (see weights)"
    if cfg.model.source == "tiny":
        ctx.components = ctx.backbone.build_tiny(cfg.model.tiny, cfg.seed)
        return None
    if ctx.model_dir is None:
        return "the model's weights are not here (see weights)"
    try:
        ctx.components = ctx.backbone.load(
            ctx.model_dir,
            DTYPES[cfg.model.dtype],
            need_text=False,
            max_sequence_length=cfg.model.max_sequence_length,
            empty_transformer=True,
        )
    except UserError as e:
        ctx.build_error = str(e)
        return ctx.build_error
    return None


def _unbuilt(name: str, ctx: Context, why: str) -> Check:
    """Skipped when the weights are not here (the weights check failed); a failure when a folder that is here does
    not load (an incomplete or damaged model directory)."""
    if ctx.model_dir is None or ctx.backbone is None:
        return Check(name, "skipped", why)
    return Check(name, "fail", why, "complete or re-download model.source (the parts named above)")


def _trainable_numel(ctx: Context) -> int:
    """Parameters the run trains: every transformer parameter, or LoRA's A and B of each targeted Linear."""
    import torch

    from leapalign_fast.build import lora_targets

    transformer = ctx.components.transformer
    if not ctx.cfg.lora.enabled:
        return sum(p.numel() for p in transformer.parameters())
    targets, rank = lora_targets(ctx.cfg, ctx.backbone), ctx.cfg.lora.rank
    return sum(
        rank * (m.in_features + m.out_features)
        for n, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
    )


def check_memory(ctx: Context) -> Check:
    """Free device memory against the weights, the trained state and preflight's lower bound of one micro-step."""
    from leapalign_fast.models.backbone import DTYPES
    from leapalign_fast.preflight import step_bytes

    cfg = ctx.cfg
    why = _build_components(ctx) if ctx.components is None else None
    if why is not None:
        return _unbuilt("memory", ctx, why)
    comps = ctx.components
    elem = DTYPES[cfg.model.dtype].itemsize
    shards = ctx.world if cfg.fsdp else 1
    frozen = sum(p.numel() for p in comps.transformer.parameters()) * elem // shards
    frozen += sum(p.numel() for p in comps.vae.parameters()) * elem
    # float32 weights (LoRA / the upcast copy), gradients, two Adam moments, the EMA
    trained = _trainable_numel(ctx) * 4 * (4 + (cfg.ema_decay > 0)) // shards
    geometry = ctx.backbone.geometry(comps, cfg.image_size)
    step = step_bytes(cfg, ctx.backbone, comps, geometry)
    need, free = frozen + trained + step, free_device_bytes(ctx.device)
    parts = f"weights {frozen / GIB:.2f} + trained state {trained / GIB:.2f} + one micro-step {step / GIB:.2f} GiB"
    if free is None:
        return Check("memory", "skipped", f"needs at least {need / GIB:.2f} GiB ({parts}); free memory unknown")
    where = f"free on {ctx.device}: {free / GIB:.2f} GiB"
    if need > free:
        return Check(
            "memory",
            "fail",
            f"needs at least {need / GIB:.2f} GiB ({parts}); {where}",
            "lower batch_size (use grad_accum), the resolution or the method's step counts, enable "
            "model.gradient_checkpointing, LoRA or fsdp=true, or free the device",
        )
    return Check("memory", "ok", f"needs at least {need / GIB:.2f} GiB ({parts}); {where}")


def check_disk(ctx: Context) -> Check:
    """Free disk at output_dir against the checkpoints kept (one more while a save is written) and the export."""
    cfg = ctx.cfg
    why = _build_components(ctx) if ctx.components is None else None
    if why is not None:
        return _unbuilt("disk", ctx, why)
    trainable = _trainable_numel(ctx) * 4  # float32
    ema = cfg.ema_decay > 0
    checkpoint = trainable * (1 + ema + 2)  # weights, EMA, Adam's two moments
    export = trainable * (1 + ema)
    need = (cfg.keep_checkpoints + 1) * checkpoint + export
    free = free_disk_bytes(Path(cfg.output_dir))
    detail = (
        f"{cfg.keep_checkpoints + 1} checkpoints of {checkpoint / GIB:.3f} GiB + export {export / GIB:.3f} GiB = "
        f"{need / GIB:.3f} GiB; free at {cfg.output_dir}: {free / GIB:.1f} GiB"
    )
    if need > free:
        return Check(
            "disk",
            "fail",
            detail,
            "free disk space, point output_dir at a larger disk, or lower keep_checkpoints",
        )
    return Check("disk", "ok", detail)
