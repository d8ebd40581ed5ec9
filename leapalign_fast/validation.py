"""Validation during training: every `eval_every` steps, sample the validation prompts (`eval_prompt_file`) from
fixed noise with the current weights, score them with a set of rewards (`eval_rewards`), log the scores, keep a
`best` checkpoint by one of them (`best_metric`, in the direction `best_mode`), and stop early after
`early_stop_patience` validations without improvement.

Scorers, by label in `eval_rewards`:
  reward      the trained reward (`[reward]`), as the loss sees it
  evaluator   the toy benchmark's rule-based evaluator (leapalign_fast.toy.evaluator; GenEval-style mean of the
              per-category accuracies); the prompts must be toy captions. A score only: it has no gradient. Its
              columns, each selectable as best_metric = "evaluator/<column>": the per-category accuracies, `strict`
              (exactly the caption's objects and no artefact; also per category, `strict/<category>`), and per
              image `objects`, `extra` (objects beyond the caption's), `empty`, `specks`, `artefact`.
  <label>     a registered reward: `eval_reward_options.<label>` holds its builder options, and `name` picks the
              registered reward (default: the label itself), e.g.
              eval_reward_options = { second = { name = "toy", path = "assets/toy/reward_b.safetensors" } }

Writes, in output_dir:
  validation.jsonl   one row per validation: {"step", "val/<label>": mean score, "val/evaluator/<column>", "best",
                     "since_best", "eval_seconds"}; the `val/...` scores and a grid of the first batch's images
                     (`val/images`) also go to the run's trackers (`report_to`)
  best/              trained.safetensors (+ ema.safetensors), state.json {step, metric, value, prompts_sha256} and
                     manifest.json (sha256 of the others, written last, as a checkpoint's) of the best validation so
                     far; `leapalign-fast eval --checkpoint <output_dir>/best` verifies and samples it. Built in a new
                     `.tmp-best.*` folder and swapped in by renames; the regular checkpoints are never touched. On
                     resume a damaged best/ is moved to `damaged-best*` (one line) and the next validation writes a
                     new one; a best/ chosen on other validation prompts (resume_force) is moved to `best-old-prompts*`.
A non-finite validation score is an error (TrainingDiverged, exit 3), not a verdict: no best/ and no early stop come
from it, and its row holds null. Sampling and scoring run on the main process; its verdict (improved, stop, failed)
is shared with every rank.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from leapalign_fast import checkpoint as ckpt
from leapalign_fast.build import prompt_embeddings, trained_state
from leapalign_fast.config import Config
from leapalign_fast.errors import TrainingDiverged, UserError
from leapalign_fast.images import grid_array
from leapalign_fast.io import new_staging_dir, save_tensors_atomic, swap_in, write_json_atomic, write_text_atomic
from leapalign_fast.prompts import read_prompt_file, validation_prompts  # noqa: F401  (train reads it from here)
from leapalign_fast.resume_settings import prompts_digest
from leapalign_fast.sampler import sample_trajectory
from leapalign_fast.trackers import log_image


class Trainer(Protocol):
    """What validation reads of the trainer (`leapalign_fast.train.Trainer`)."""

    cfg: Config
    out: Path
    accelerator: object
    backbone: object
    components: object
    geometry: object
    reward: torch.nn.Module
    transformer: torch.nn.Module
    ema: object

    def velocity(self, idx: list[int], embeds=None): ...

    def decode(self, x: torch.Tensor) -> torch.Tensor: ...


BUILTIN = ("reward", "evaluator")


class EvaluatorScore(torch.nn.Module):
    """The toy rule-based evaluator as a per-image score in {0, 1} (not differentiable: validation only)."""

    def __init__(self, prompts: list[str]):
        super().__init__()
        from leapalign_fast.toy.scenes import parse_caption

        bad = [p for p in prompts if parse_caption(p) is None]
        if bad:
            raise UserError(
                f"eval_rewards: 'evaluator' judges toy captions (leapalign_fast/toy/scenes.py); the "
                f"validation prompt {bad[0]!r} is not one; drop 'evaluator' or use a toy prompt file"
            )
        self.specs = {p: parse_caption(p) for p in prompts}

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.tensor(self.columns(images, prompts)["evaluator"])

    def columns(self, images: torch.Tensor, prompts: list[str]) -> dict[str, list[float]]:
        """Per-image values of every evaluator column: `evaluator` (the GenEval-style pass) and `evaluator/<column>`
        (strict pass, objects, extra objects, empty, specks, artefact)."""
        from leapalign_fast.toy.evaluator import assess

        found = [assess(im, self.specs[p]) for im, p in zip(images.detach().float().cpu().numpy(), prompts)]
        return {
            "evaluator": [float(a.passed) for a in found],
            "evaluator/strict": [float(a.strict) for a in found],
            "evaluator/objects": [float(a.objects) for a in found],
            "evaluator/extra": [float(a.extra) for a in found],
            "evaluator/empty": [float(a.objects == 0) for a in found],
            "evaluator/specks": [float(a.specks) for a in found],
            "evaluator/artefact": [float(a.artefact) for a in found],
        }


def best_direction(cfg: Config) -> tuple[str, float]:
    """The validation score that picks `best` (best_metric, or the first eval_rewards label) and +1 when higher is
    better, -1 when lower is (best_mode, or the column's own direction). An unknown evaluator column, or `objects`
    (no direction of its own) without best_mode, is a UserError."""
    metric = cfg.best_metric or cfg.eval_rewards[0]
    column = metric.partition("/")[2]
    higher: bool | None = True
    if column:
        from leapalign_fast.toy.evaluator import METRICS
        from leapalign_fast.toy.scenes import CATEGORIES

        known = {k: v for k, v in METRICS.items() if k != "overall"}
        known.update({c: True for c in CATEGORIES} | {f"strict/{c}": True for c in CATEGORIES})
        if column not in known:
            raise UserError(
                f"best_metric '{metric}': the evaluator has no column '{column}'; one of "
                + ", ".join(f"'evaluator/{k}'" for k in known)
            )
        higher = known[column]
    if cfg.best_mode:
        return metric, 1.0 if cfg.best_mode == "max" else -1.0
    if higher is None:
        raise UserError(
            f"best_metric '{metric}' has no better direction of its own (more objects is neither better nor worse); "
            "set best_mode = 'max' or 'min'"
        )
    return metric, 1.0 if higher else -1.0


def build_scorers(
    cfg: Config, prompts: list[str], trained_reward: torch.nn.Module, device
) -> dict[str, torch.nn.Module]:
    from leapalign_fast.rewards import build_reward, check_reward_name
    from leapalign_fast.rewards.video import video_reward

    scorers = {}
    for label in cfg.eval_rewards:
        if label == "reward":
            if hasattr(
                trained_reward, "check_prompts"
            ):  # a bad validation prompt fails now, not at the first validation
                trained_reward.check_prompts(prompts)
            scorers[label] = trained_reward
        elif label == "evaluator":
            scorers[label] = EvaluatorScore(prompts)
        else:
            opts = dict(cfg.eval_reward_options.get(label, {}))
            name = opts.pop("name", label)
            check_reward_name(name)
            scorers[label] = video_reward(build_reward(name, **opts)).to(device)  # per frame on a video
    return scorers


def _since_best(rows: list[dict], metric: str, sign: float = 1.0) -> tuple[float, int]:
    """(best signed value (sign x score: higher is better), validations since it) from earlier validation rows (a
    resumed run)."""
    best, since = -math.inf, 0
    for row in rows:
        v = row.get(f"val/{metric}")
        if v is None:  # a failed validation (a non-finite score, logged as null) decides nothing
            continue
        if sign * v > best:
            best, since = sign * v, 0
        else:
            since += 1
    return best, since


class Validator:
    """Owns the validation prompts, noise, scorers and best-so-far state of one run."""

    def __init__(self, run: Trainer, start_step: int):
        cfg = run.cfg
        self.cfg, self.out = cfg, run.out
        self.metric, self.sign = best_direction(cfg)
        self.prompts = read_prompt_file(cfg.eval_prompt_file)
        main = run.accelerator.is_main_process  # verified by rank 0 when the trainer embedded it
        self.embeds = prompt_embeddings(cfg, run.backbone, run.components, self.prompts, verify=main)
        self.scorers = build_scorers(cfg, self.prompts, run.reward, run.accelerator.device)
        n = cfg.eval_num_steps or cfg.num_steps
        self.sigmas = run.backbone.schedule(run.components, n, run.geometry, device=run.accelerator.device)
        # The same noise at every validation (and for every method with this seed): curves compare weights only.
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, 7919]).generate_state(1)[0]))
        self.noise = torch.randn(*run.geometry.noise_shape(len(self.prompts)), generator=gen)  # (P, L, C)
        self.path = run.out / "validation.jsonl"
        self.digest = prompts_digest(self.prompts)
        self.main = run.accelerator.is_main_process
        rows, fresh = [], False
        if self.main:
            if start_step == 0:
                self.path.unlink(missing_ok=True)
                shutil.rmtree(run.out / "best", ignore_errors=True)
            else:  # drop rows after the resumed step, so a replayed validation is not counted twice
                rows = [r for r in _read_rows(self.path) if r["step"] <= start_step]
                write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))
                fresh = self._check_best_dir(start_step)
        self.best, self.since_best = _since_best(rows, self.metric, self.sign)  # best: sign x score
        if fresh == "damaged":  # the next validation writes a new best/ (the patience count goes on)
            self.best = -math.inf
        elif fresh == "prompts":  # scores on other prompts do not compare: best and patience start over
            self.best, self.since_best = -math.inf, 0

    @property
    def stopped_early(self) -> bool:
        """The resumed run had already stopped early: `early_stop_patience` validations without a better score."""
        patience = self.cfg.early_stop_patience
        return bool(patience) and self.since_best >= patience

    def _check_best_dir(self, step: int) -> str | None:
        """Resume: put back a best/ a crash left aside, verify it (a damaged one is moved to `damaged-best*`) and
        compare its validation prompts with these. Returns None, "damaged" or "prompts"; one line each."""
        out = self.out
        _restore_best_dir(out)
        best = out / "best"
        if not best.is_dir():
            return None
        problem = ckpt.verify_checkpoint(best)
        if problem is not None:
            moved = ckpt.set_aside(best)
            _say(f"best/ is damaged ({problem}); moved to {moved.name}, the next validation writes a new best/")
            return "damaged"
        try:
            saved = json.loads((best / "state.json").read_text()).get("prompts_sha256")
        except (OSError, ValueError, AttributeError):
            saved = None
        if saved is not None and saved != self.digest:
            moved = _aside(best, "best-old-prompts")
            _say(
                f"best/ was chosen on other validation prompts (eval_prompt_file changed); moved to {moved.name}; "
                f"the best and early-stop patience start over at step {step}"
            )
            return "prompts"
        return None

    @torch.no_grad()
    def scores(self, run: Trainer) -> dict[str, list[float]]:
        """Per-image scores of every scorer on the validation prompts, with the current weights."""
        from leapalign_fast.models.backbone import DTYPES

        dev, dtype = run.accelerator.device, run.backbone.noise_dtype(DTYPES[self.cfg.model.dtype])
        out = {label: [] for label in self.scorers}
        B = self.cfg.batch_size
        for start in range(0, len(self.prompts), B):
            idx = list(range(start, min(start + B, len(self.prompts))))
            velocity = run.velocity(idx, self.embeds)
            x0 = sample_trajectory(velocity, self.noise[idx].to(dev, dtype), self.sigmas).x0
            images = run.decode(x0)
            if start == 0:
                self.images = grid_array(images)  # the first batch, for the trackers
            prompts = [self.prompts[i] for i in idx]
            for label, scorer in self.scorers.items():
                if isinstance(scorer, EvaluatorScore):  # every column of the evaluator, from one detection
                    for column, values in scorer.columns(images, prompts).items():
                        out.setdefault(column, []).extend(values)
                else:
                    out[label] += scorer(images, prompts).float().cpu().tolist()  # host sync, once per batch
        return out

    def row(self, step: int, scores: dict[str, list[float]], seconds: float) -> dict:
        row: dict = {"step": step}
        for label, values in scores.items():
            if label in ("evaluator", "evaluator/strict"):  # as GenEval's overall: the mean of the categories
                from leapalign_fast.toy.scenes import parse_caption

                per: dict[str, list[float]] = {}
                for p, v in zip(self.prompts, values):
                    per.setdefault(parse_caption(p).category, []).append(v)
                row.update({f"val/{label}/{c}": float(np.mean(v)) for c, v in per.items()})
                row[f"val/{label}"] = float(np.mean([np.mean(v) for v in per.values()]))
            else:
                row[f"val/{label}"] = float(np.mean(values))
        row["eval_seconds"] = seconds
        return row

    def __call__(self, run: Trainer, step: int) -> bool:
        """Validate at `step` if due; returns True when training should stop early (on every rank)."""
        if step % self.cfg.eval_every != 0 and step != self.cfg.max_steps:
            return False
        acc = run.accelerator
        verdict = torch.zeros(3, device=acc.device)  # (improved, stop, a score not finite)
        failure = None
        if acc.is_main_process:
            t0 = time.perf_counter()
            scores = self.scores(run)
            row = self.row(step, scores, 0.0)
            row["eval_seconds"] = time.perf_counter() - t0
            failure = self._nonfinite(step, scores, row)
        if failure is not None:  # logged (as null), then an error on every rank below
            with open(self.path, "a") as f:
                f.write(json.dumps({**row, "best": False, "since_best": self.since_best}) + "\n")
            verdict[2] = 1.0
        elif acc.is_main_process:
            value = row[f"val/{self.metric}"]
            improved = self.sign * value > self.best
            if improved:
                self.best, self.since_best = self.sign * value, 0
                self._write_best(run, step, value)
            else:
                self.since_best += 1
            row.update(best=improved, since_best=self.since_best)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            acc.log({k: v for k, v in row.items() if k.startswith("val/")}, step=step)
            log_image(acc, "val/images", self.images, step)
            patience = self.cfg.early_stop_patience
            verdict[0], verdict[1] = float(improved), float(bool(patience) and self.since_best >= patience)
        verdict = acc.reduce(verdict, "sum")  # only rank 0 contributes: its verdict, on every rank
        if verdict[2] > 0:
            raise TrainingDiverged(failure or f"a validation score at step {step} is not finite (see rank 0)")
        return bool(verdict[1] > 0)  # host sync

    def _nonfinite(self, step: int, scores: dict[str, list[float]], row: dict) -> str | None:
        """The error for a validation whose scores are not all finite (the row's non-finite means set to null,
        JSON having no NaN), or None."""
        bad = {label: sum(not math.isfinite(v) for v in values) for label, values in scores.items()}
        bad = {label: n for label, n in bad.items() if n}
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                row[k] = None
        if not bad:
            return None
        label, n = next(iter(bad.items()))
        return (
            f"validation at step {step}: scorer '{label}' gave {n} non-finite score(s) of {len(self.prompts)} "
            f"(val/{label} is not a number); no best/ or early stop is decided on it. Last checkpoint: "
            f"{ckpt.newest(self.out)}. Check the scorer's inputs and weights, or lower lr if the model diverged, then "
            "rerun with resume=true"
        )

    def _write_best(self, run: Trainer, step: int, value: float) -> None:
        """best/ as a checkpoint is written: staged in a new folder, manifest last, swapped in by renames."""
        staged = new_staging_dir(self.out / "best")
        try:
            save_tensors_atomic(trained_state(run.transformer), staged / "trained.safetensors")
            if run.ema is not None:
                save_tensors_atomic(run.ema.shadow, staged / "ema.safetensors")
            state = {"step": step, "metric": self.metric, "value": value, "prompts_sha256": self.digest}
            write_json_atomic(staged / "state.json", {**state, "checksummed": True})
            ckpt.write_manifest(staged, step)
            left = swap_in(staged, self.out / "best")  # a crash between its two renames leaves .old-best.*
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        if left is not None:
            _say(f"the previous best/ (now {left}) could not be removed; delete it by hand, the new best/ is in place")


def _say(text: str) -> None:
    print(f"leapalign-fast: {text}", flush=True)


def _aside(path: Path, name: str) -> Path:
    target, n = path.with_name(name), 1
    while target.exists():
        target, n = path.with_name(f"{name}.{n}"), n + 1
    os.replace(path, target)
    return target


def _restore_best_dir(out: Path) -> None:
    """After a crash between the two renames of a best/ swap: put the previous best (an intact `.old-best*`) back;
    remove staging leftovers (`.tmp-best*`)."""
    olds = sorted(out.glob(".old-best*"), key=lambda p: p.stat().st_mtime)
    if not (out / "best").exists():
        for old in reversed(olds):
            if ckpt.verify_checkpoint(old) is None and (old / "state.json").is_file():
                os.replace(old, out / "best")
                break
    for leftover in [*out.glob(".tmp-best*"), *out.glob(".old-best*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _read_rows(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash mid-write
    return rows


def build_validator(run: Trainer, start_step: int) -> Validator | None:
    return Validator(run, start_step) if run.cfg.eval_every else None
