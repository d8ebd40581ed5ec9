"""A trained transformer as a diffusers model directory: `config.json` + `diffusion_pytorch_model.safetensors`, which
`<Model>.from_pretrained` and the pipeline (`transformer=`) load, and `export.json` naming what it was exported from.
Built in a new staging folder, then renamed into place; it replaces nothing but an earlier export
(`check_export_target`), so an `--out` naming a run, a checkpoint or a folder of other files loses nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from leapalign_fast.errors import UserError
from leapalign_fast.io import file_sha256, new_staging_dir, save_tensors_atomic, swap_in, write_json_atomic

EXPORT_MARK = "export.json"  # in every export folder: the checkpoint (or run step) it was exported from
MODEL_FILES = {"config.json", "diffusion_pytorch_model.safetensors"}
RUN_FILES = {"checkpoints", "metrics.jsonl", "config.toml", ".lock", "validation.jsonl"}


def model_config(transformer: torch.nn.Module) -> dict:
    """The bare transformer's diffusers config, with its `_class_name` (an FSDP wrapper's name stripped)."""
    config = dict(transformer.config)
    config["_class_name"] = type(transformer).__name__.removeprefix("FSDP")
    return json.loads(json.dumps(config, default=str))


def export_mark(checkpoint: Path, ema: bool, step: int) -> dict:
    """What `export.json` records: the checkpoint, by path and by its manifest's sha256 (its content, wherever it
    lies), the step and whether the weights are the EMA."""
    manifest = Path(checkpoint) / "manifest.json"
    return {
        "checkpoint": str(Path(checkpoint).resolve()),
        "manifest_sha256": file_sha256(manifest) if manifest.is_file() else None,
        "step": step,
        "ema": ema,
    }


def write_model_dir(
    weights: dict[str, torch.Tensor],
    config: dict,
    target: Path,
    mark: dict | None = None,
    replace_exports: bool = False,
    source: Path | None = None,
) -> Path:
    """`weights` (full tensors by state_dict name, in the dtype to store) and `config` as the directory `target`,
    with `mark` as its `export.json`. `target` must pass `check_export_target` (else a UserError, nothing touched).
    Written into a new staging folder and swapped in by renames; a failure (a full disk: an OSError) removes the
    staging folder and leaves `target` as it was."""
    target = Path(target)
    mark = mark if mark is not None else {"checkpoint": None, "manifest_sha256": None, "step": None, "ema": False}
    check_export_target(target, mark, replace_exports, source)
    tensors = {n: t.detach().cpu().contiguous() for n, t in weights.items()}
    staged = new_staging_dir(target)
    try:
        save_tensors_atomic(tensors, staged / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        write_json_atomic(staged / "config.json", config)
        write_json_atomic(staged / EXPORT_MARK, mark)
        swap_in(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return target


def check_export_target(target: Path, mark: dict, replace_exports: bool = False, source: Path | None = None) -> None:
    """A UserError (nothing touched) unless `target` is new, an empty folder, or an earlier export of the same
    checkpoint (same manifest and EMA choice; with `replace_exports`, an export of anything). Refused with one line:
    a file, the checkpoint `source` or a folder holding it, a folder inside a checkpoint, a run's output_dir, a
    folder of other files. An unwritable parent is found here too (an OSError), before any weights are read."""
    target = Path(target)
    tgt = target.resolve()
    fix = "name a new or empty folder (nothing was changed)"
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UserError(f"export target {target} is a file, not a folder; {fix}")
    if source is not None:
        src = Path(source).resolve()
        if tgt == src or tgt in src.parents:
            what = (
                "is the checkpoint being exported" if tgt == src else f"holds the checkpoint being exported ({source})"
            )
            raise UserError(f"export target {target} {what}; {fix}")
    inside = next((p for p in [tgt, *tgt.parents] if _is_checkpoint(p)), None)
    if inside is not None:
        what = "is a checkpoint" if inside == tgt else f"is inside the checkpoint {inside}"
        raise UserError(f"export target {target} {what}; {fix}")
    if target.is_dir() and any(target.iterdir()):
        names = sorted(p.name for p in target.iterdir())
        run = sorted(RUN_FILES & set(names))
        if run:
            raise UserError(f"export target {target} is a run's output_dir (it holds {run[0]}); {fix}")
        if not _is_export(names):
            raise UserError(f"export target {target} holds files that are not an export (e.g. {names[0]}); {fix}")
        try:
            found = json.loads((target / EXPORT_MARK).read_text())
        except (OSError, ValueError):
            found = None
        if not replace_exports and not _same(found, mark):
            was = found.get("checkpoint") if isinstance(found, dict) else None
            raise UserError(
                f"export target {target} holds an export of {'checkpoint ' + str(was) if was else 'another checkpoint'}"
                "; pass --force to replace it, or name a new folder (nothing was changed)"
            )
    shutil.rmtree(new_staging_dir(target))  # the parent is writable (or this is the OSError of why not)


def _same(found, mark: dict) -> bool:
    if not isinstance(found, dict) or found.get("ema") != mark.get("ema"):
        return False
    key = "manifest_sha256" if mark.get("manifest_sha256") else "checkpoint"
    return mark.get(key) is not None and found.get(key) == mark.get(key)


def _is_checkpoint(p: Path) -> bool:
    return (p / "manifest.json").is_file() or (p / "state.json").is_file() or (p / "shards").is_dir()


def _is_export(names: list[str]) -> bool:
    """An export folder's files: config.json, the weights and export.json (or, written before export.json existed,
    the first two only)."""
    return "config.json" in names and set(names) <= MODEL_FILES | {EXPORT_MARK}
