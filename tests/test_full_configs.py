"""Every shipped config runs as its header says, and every full fine-tune exports a diffusers model directory.

The header is the comment block a config starts with; what it claims (FSDP, LoRA or full fine-tune, gradient
checkpointing, bf16) is compared with the resolved settings. The `_full` configs then train two steps on their
family's tiny build, sharded over two CPU processes, and the exported `transformer/` loads with `from_pretrained`
holding exactly the trained weights.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_backbones import TINY_RUN as BACKBONES_TINY_RUN
from test_fsdp import _free_port

from leapalign_fast.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.toml"))
FULL = [
    "flux_leapalign_full",
    "sd35_medium_leapalign_full",
    "flux2_klein_leapalign_full",
    "qwen_image_leapalign_full",
    "zimage_leapalign_full",
]


def header_claims(text: str) -> dict[str, bool]:
    """What a config's leading comment block says of the run (pointer lines to a sibling config excluded)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if not re.match(r"#\s*(Full fine-tune|LoRA variant):\s*configs/", line):
            lines.append(line)
    head = " ".join(lines)
    claims = {}
    if "FSDP" in head or "accelerate_fsdp.yaml" in head:
        claims["fsdp"] = True
    if re.search(r"\bLoRA\b", head):
        claims["lora"] = True
    if re.search(r"full fine-tune", head, re.IGNORECASE):
        claims["lora"] = False
    if "gradient checkpointing" in head:
        claims["gradient_checkpointing"] = True
    if re.search(r"\bbf16\b", head):
        claims["bf16"] = True
    return claims


def resolved(cfg) -> dict[str, bool]:
    return {
        "fsdp": cfg.fsdp and not cfg.model.cuda_graph,  # FSDP as it runs: cuda_graph is refused with it
        "lora": cfg.lora.enabled,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "bf16": cfg.mixed_precision == "bf16",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_runs_as_its_header_says(path):
    claims = header_claims(path.read_text())
    have = resolved(load_config(path))
    assert {k: have[k] for k in claims} == claims


def test_the_header_check_notices_a_config_that_says_fsdp_and_runs_without():
    text = (ROOT / "configs" / "flux_refl.toml").read_text()
    assert header_claims(text)["fsdp"] and header_claims(text)["lora"] is False
    broken = ROOT / "configs" / "flux_refl.toml"
    cfg = load_config(broken, ["fsdp=false"])
    assert resolved(cfg)["fsdp"] != header_claims(text)["fsdp"]


# test_backbones' CPU-sized run of a shipped config on its family's tiny build, with the config's own fsdp setting
# (that list pins fsdp=false), one prompt a rank and a checkpoint at step 2.
TINY_RUN = [o for o in BACKBONES_TINY_RUN if o != "fsdp=false"] + ["batch_size=1", "checkpoint_every=2"]


def _model_class(name: str):
    import diffusers

    return getattr(diffusers, json.loads((Path(name) / "config.json").read_text())["_class_name"])


def _assert_export_holds(directory: Path, want: dict[str, torch.Tensor]):
    model = _model_class(directory).from_pretrained(directory)
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_full_config_trains_sharded_on_two_processes_and_exports(name, tmp_path):
    """Two CPU ranks (gloo), FSDP2 as the config says: `transformer/` and `transformer_ema/` at the end hold the
    last checkpoint's consolidated weights and load with `from_pretrained`; they differ from the initial model."""
    from leapalign_fast.dist_checkpoint import consolidate
    from leapalign_fast.models.backbone import backbone_for

    out = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / f"{name}.toml", [f"output_dir={out}", *TINY_RUN])
    assert cfg.fsdp and not cfg.lora.enabled
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "leapalign_fast.cli",
        "train",
        "--config",
        str(ROOT / "configs" / f"{name}.toml"),
        f"output_dir={out}",
        *TINY_RUN,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = out / "checkpoints" / "step_00000002"
    buffers = load_file(str(last / "buffers.safetensors")) if (last / "buffers.safetensors").is_file() else {}
    trained = _assert_export_holds(out / "transformer", {**consolidate(last, "trained"), **buffers})
    _assert_export_holds(out / "transformer_ema", {**consolidate(last, "ema"), **buffers})
    base = backbone_for(cfg.model).build_tiny(cfg.model.tiny, cfg.seed).transformer.state_dict()
    changed = sum(not torch.equal(trained.state_dict()[k], base[k]) for k in base)
    assert changed > len(base) // 2  # a full fine-tune: most tensors moved


@pytest.mark.parametrize("name", FULL)
def test_full_config_without_fsdp_exports_the_same_directory(name, tmp_path):
    """One process, fsdp=false: the end of the run writes transformer/ and transformer_ema/ too (before, only
    FSDP runs did), holding the live weights and the EMA."""
    from leapalign_fast.build import unwrap
    from leapalign_fast.train import train

    res = train(load_config(ROOT / "configs" / f"{name}.toml", [f"output_dir={tmp_path}", "fsdp=false", *TINY_RUN]))
    model = unwrap(res.trainer.transformer)
    _assert_export_holds(tmp_path / "transformer", {k: v.detach() for k, v in model.state_dict().items()})
    ema = {**{k: v.detach() for k, v in model.state_dict().items()}, **res.trainer.ema.shadow}
    _assert_export_holds(tmp_path / "transformer_ema", ema)


def test_regional_compile_and_fsdp_find_sd3_blocks():
    """SD3Transformer2DModel names no `_repeated_blocks`: its transformer_blocks are the unit of regional compile
    (the SD3.5 configs set compile = "regional") and of FSDP sharding."""
    from leapalign_fast.blocks import repeated_blocks
    from leapalign_fast.config import TinyFluxConfig
    from leapalign_fast.models.backbone import get_backbone
    from leapalign_fast.models.fast import compile_transformer

    tr = get_backbone("sd3").build_tiny(TinyFluxConfig(), 0).transformer
    assert not getattr(tr, "_repeated_blocks", None)
    blocks = repeated_blocks(tr)
    assert blocks and blocks == list(tr.transformer_blocks)
    compile_transformer(tr, "regional", backend="eager")  # raised "names no repeated blocks" before
    assert all(isinstance(b.forward, functools.partial) for b in blocks)


def test_zimage_blocks_are_the_fsdp_and_regional_compile_unit():
    """ZImageTransformer2DModel's repeated blocks (diffusers' `_repeated_blocks`) are its noise refiner, context
    refiner and main layers, in that order: the units FSDP shards and regional compile compiles (fullgraph; the
    compiled velocity equals eager, values and gradients, for prompts of different lengths)."""
    import torch

    from leapalign_fast.blocks import repeated_blocks
    from leapalign_fast.config import TinyFluxConfig
    from leapalign_fast.models.backbone import get_backbone
    from leapalign_fast.models.fast import compile_transformer

    backbone = get_backbone("zimage")
    comps = backbone.build_tiny(TinyFluxConfig(), 0)
    tr = comps.transformer
    blocks = repeated_blocks(tr)
    assert blocks == [*tr.noise_refiner, *tr.context_refiner, *tr.layers] and len(blocks) == 4
    geom = backbone.geometry(comps, 32)
    cond = backbone.encode_prompts(comps.text, ["a red square", "two blue circles"])
    v = backbone.velocity(tr, cond, geom, 3.5)
    x, t = torch.randn(*geom.noise_shape(2), generator=torch.Generator().manual_seed(0)), torch.tensor([0.9, 0.4])

    def run():
        tr.zero_grad()
        out = v(x, t)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in tr.parameters()]

    want = run()
    compile_transformer(tr, "regional", backend="eager")
    assert all(isinstance(b.forward, functools.partial) for b in blocks)
    got = run()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
