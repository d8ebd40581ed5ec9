"""What a resume compares and re-applies beyond the config keys: the prompts' content, and the optimizer settings
a `resume_force=true` run changes (the optimizer's state_dict would otherwise bring the checkpoint's back)."""

from __future__ import annotations

import hashlib


def prompts_digest(prompts: list[str]) -> str:
    """sha256 of the training prompts: an edited prompt file changes the run even when its path does not."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def apply_optimizer_settings(cfg, optimizer, sched) -> list[str]:
    """Make the resumed optimizer and lr schedule use this config's lr, betas, eps and weight decay (they differ
    from the checkpoint's only under resume_force). Returns what changed, as `key old -> new`."""
    groups, changed = optimizer.param_groups, []
    want = {"weight_decay": cfg.weight_decay, "betas": tuple(cfg.adam_betas), "eps": cfg.adam_eps}
    for key, value in want.items():
        old = tuple(groups[0][key]) if key == "betas" else groups[0][key]
        if old != value:
            changed.append(f"{key} {old} -> {value}")
            for g in groups:
                g[key] = value
    if any(b != cfg.lr for b in sched.base_lrs):
        changed.append(f"lr {sched.base_lrs[0]} -> {cfg.lr}")
        sched.base_lrs = [cfg.lr] * len(groups)
    # The current lr from this config's schedule (a changed warmup_steps too): unchanged settings give the very
    # same float, so a plain resume stays bit-exact.
    lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    if [g["lr"] for g in groups] != lrs:
        if not any(c.startswith("lr ") for c in changed):
            changed.append(f"lr {groups[0]['lr']} -> {lrs[0]} (the warm-up schedule)")
        for g, lr in zip(groups, lrs):
            g["lr"] = lr
        sched._last_lr = lrs
    return changed
