"""Every GPU path in one command, `pytest -m gpu`: inductor compile (regional and full) against eager, each
attention backend against SDPA with gradients, bf16 autocast + LoRA + compile + CUDA graph in a training run,
CUDA-graph and compile runs against the eager run, deterministic CUDA runs, the on-device schedule, the prompt
cache encoded on the GPU, and the compile count with inductor. The Triton kernels and the CUDA-graph replay test
live beside their CPU tests (tests/test_kernels.py, tests/test_fast_path.py).

Skipped without CUDA. `LEAPALIGN_GPU_TESTS_ON_CPU=1` runs the device-agnostic parts on CPU, to check the tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leapalign_fast.config import load_config
from leapalign_fast.errors import UserError
from leapalign_fast.flow import flux_schedule
from leapalign_fast.models.fast import compile_transformer, resolve_attention
from leapalign_fast.models.flux import FluxVelocity, TinyFluxConfig, build_tiny_flux, latent_image_ids
from leapalign_fast.sampler import sample_trajectory
from leapalign_fast.train import train, trained_state

CUDA = torch.cuda.is_available()
ON_CPU = os.environ.get("LEAPALIGN_GPU_TESTS_ON_CPU") == "1"
DEV = torch.device("cuda" if CUDA else "cpu")
BACKEND = "inductor" if CUDA else "aot_eager"  # inductor on CPU compiles C++: minutes
ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (CUDA or ON_CPU), reason="needs CUDA")]
cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA itself")
RUN = ["batch_size=2", "num_steps=4", "report_to=none", "ema_decay=0"]
# Head dim 64, as the attention kernels meet at FLUX size (128); the rope axes sum to it.
WIDE = TinyFluxConfig(heads=4, head_dim=64, text_dim=64)


def _inputs(cfg: TinyFluxConfig, dtype, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    t5 = torch.randn(batch, 8, cfg.text_dim, generator=g).to(DEV, dtype)
    pooled = torch.randn(batch, cfg.text_dim, generator=g).to(DEV, dtype)
    x = torch.randn(batch, 16, 64, generator=g).to(DEV, dtype)
    return t5, pooled, x, torch.tensor([0.7, 0.2], device=DEV)


def _forward_and_grads(transformer, cfg, dtype):
    t5, pooled, x, t = _inputs(cfg, dtype)
    v = FluxVelocity(transformer, t5, pooled, latent_image_ids(8, 8, DEV), 3.5)
    with torch.no_grad():
        out = v(x, t).float()
    x = x.clone().requires_grad_(True)
    params = [p for p in transformer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(v(x, t).float().square().mean(), [x, *params])
    return out, [g.float() for g in grads]


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_inductor_compile_equals_eager(mode):
    torch._dynamo.reset()
    eager = build_tiny_flux(WIDE, seed=0).transformer.to(DEV)
    compiled = build_tiny_flux(WIDE, seed=0).transformer.to(DEV)
    compile_transformer(compiled, mode, backend=BACKEND)
    (oe, ge), (oc, gc) = (
        _forward_and_grads(eager, WIDE, torch.float32),
        _forward_and_grads(compiled, WIDE, torch.float32),
    )
    torch.testing.assert_close(oc, oe, rtol=1e-4, atol=1e-4)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    bf16_eager = build_tiny_flux(WIDE, seed=0).transformer.to(DEV, torch.bfloat16)
    bf16 = build_tiny_flux(WIDE, seed=0).transformer.to(DEV, torch.bfloat16)
    compile_transformer(bf16, mode, backend=BACKEND)
    (oe, _), (oc, _) = (
        _forward_and_grads(bf16_eager, WIDE, torch.bfloat16),
        _forward_and_grads(bf16, WIDE, torch.bfloat16),
    )
    torch.testing.assert_close(oc, oe, rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()


@cuda_only
@pytest.mark.parametrize("backend", ["flash", "_native_flash", "_native_cudnn", "_native_efficient", "flex"])
def test_attention_backend_equals_sdpa_with_gradients(backend):
    try:
        resolve_attention(backend, DEV, torch.bfloat16)
    except UserError as e:
        pytest.skip(str(e))
    reference = build_tiny_flux(WIDE, seed=0).transformer.to(DEV, torch.bfloat16)
    other = build_tiny_flux(WIDE, seed=0).transformer.to(DEV, torch.bfloat16)
    other.set_attention_backend(backend)
    (o_ref, g_ref), (o, g) = (
        _forward_and_grads(reference, WIDE, torch.bfloat16),
        _forward_and_grads(other, WIDE, torch.bfloat16),
    )
    torch.testing.assert_close(o, o_ref, rtol=3e-2, atol=3e-2)
    for a, b in zip(g, g_ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-1, atol=3e-2)


@cuda_only
def test_auto_attention_is_flash_for_bf16_when_diffusers_can_use_it():
    from leapalign_fast.models.fast import _diffusers_problem

    if _diffusers_problem("flash") is not None:
        pytest.skip(f"flash-attn not usable here: {_diffusers_problem('flash')}")
    assert resolve_attention("auto", DEV, torch.bfloat16) == "flash"
    assert resolve_attention("auto", DEV, torch.float32) == "native"


def test_training_run_bf16_autocast_lora_compile_cuda_graph_checkpointing(tmp_path):
    torch._dynamo.reset()
    res = train(
        load_config(
            None,
            [
                f"output_dir={tmp_path}",
                "max_steps=2",
                *RUN,
                "mixed_precision=bf16",
                "model.dtype=bfloat16",
                "lora.enabled=true",
                "lora.rank=4",
                "lr=1e-2",
                "model.compile=regional",
                f"model.compile_backend={BACKEND}",
                "model.cuda_graph=true",
                "model.gradient_checkpointing=true",
            ],
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] is not None and r["grad_norm"] is not None for r in rows)
    trained = trained_state(res.trainer.transformer)
    assert all(v.device.type == DEV.type and v.dtype == torch.float32 for v in trained.values())
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in trained.items())
    if CUDA:
        assert res.trainer.graphed is not None and len(res.trainer.graphed.graphs) >= 1
    torch._dynamo.reset()


def test_leapalign_orders_give_the_same_gradient_on_the_device():
    """LeapAlign's reward-first and in-trajectory orders on the device (CUDA: the Triton connector kernels, whose
    connector value is exactly the real latent) in bf16: the same loss and the same gradient direction."""
    from test_leapalign import _decode, _reward

    from leapalign_fast.methods.base import StepInputs
    from leapalign_fast.methods.leapalign import leapalign_loss

    tr = build_tiny_flux(WIDE, seed=0).transformer.to(DEV, torch.bfloat16)
    t5, pooled, _, _ = _inputs(WIDE, torch.bfloat16)
    velocity = FluxVelocity(tr, t5, pooled, latent_image_ids(8, 8, DEV), 3.5)
    noise = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1)).to(DEV, torch.bfloat16)
    sigmas = flux_schedule(8, 16, device=DEV)
    params = [p for p in tr.parameters() if p.requires_grad]
    out = {}
    for order in (True, False):
        inp = StepInputs(velocity, noise, sigmas, _decode, _reward, ["p", "q"], torch.Generator().manual_seed(3))
        step = leapalign_loss(inp, 0.3, 0.1, 2.0, (0, 8), pair=(2, 5), reward_first=order)
        grads = torch.autograd.grad(step.loss, params, allow_unused=True)
        out[order] = step.loss.float(), torch.cat([g.float().flatten() for g in grads if g is not None])
    (loss_a, g_a), (loss_b, g_b) = out[True], out[False]
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-2, atol=1e-3)
    assert g_a.norm() > 0
    torch.testing.assert_close(g_a, g_b, rtol=2e-2, atol=1e-3 * float(g_b.abs().max()))


def _final_weights(out, *extra):
    res = train(load_config(None, [f"output_dir={out}", "max_steps=2", *RUN, "deterministic=true", "lr=1e-3", *extra]))
    return {k: v.float().cpu() for k, v in trained_state(res.trainer.transformer).items()}


def test_cuda_graph_and_compile_leave_the_run_unchanged(tmp_path):
    """torchtitan's gate for changes that must not change numerics: the same run, eager vs CUDA graph (the same
    kernels: equal to float rounding) and vs regional compile (fused kernels: close)."""
    torch._dynamo.reset()
    eager = _final_weights(tmp_path / "eager")
    graphed = _final_weights(tmp_path / "graph", "model.cuda_graph=true")
    compiled = _final_weights(tmp_path / "compiled", "model.compile=regional", f"model.compile_backend={BACKEND}")
    for k in eager:
        torch.testing.assert_close(graphed[k], eager[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-3, atol=1e-4)
    torch._dynamo.reset()


def test_deterministic_cli_run_without_cublas_env_is_reproducible(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}  # the trainer must set it

    def run(out):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "leapalign_fast.cli",
                "train",
                "--config",
                str(ROOT / "configs" / "defaults.toml"),
                f"output_dir={out}",
                "max_steps=2",
                *RUN,
                "deterministic=true",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert run(tmp_path / "a") == run(tmp_path / "b")


def test_sampler_makes_no_host_copies_on_the_gpu():
    from torch.utils._python_dispatch import TorchDispatchMode

    copies = []

    class HostCopies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" and DEV.type != "cpu":
                copies.append(func)
            return func(*args, **(kwargs or {}))

    sigmas = flux_schedule(25, 16, device=DEV)
    noise = torch.randn(2, 16, 64, device=DEV)
    with HostCopies(), torch.no_grad():
        x0 = sample_trajectory(lambda x, t: x * t[:, None, None], noise, sigmas).x0
    assert x0.device.type == DEV.type and copies == []


def test_prompt_cache_encoded_on_the_gpu_equals_cpu(tmp_path):
    from leapalign_fast.models.text import PromptCache, build_tiny_text_stack, write_prompt_cache

    prompts = ["a red square", "two blue circles", "a green star"]
    text = build_tiny_text_stack(32, 32, seed=1)
    write_prompt_cache(text, prompts, tmp_path / "cpu" / "index.json")
    text.clip.to(DEV)
    text.t5.to(DEV)
    write_prompt_cache(text, prompts, tmp_path / "dev" / "index.json")
    a, b = PromptCache(tmp_path / "cpu" / "index.json"), PromptCache(tmp_path / "dev" / "index.json")
    for x, y in zip(a.select([2, 0, 1]), b.select([2, 0, 1])):
        assert y.device.type == "cpu"
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_inductor_compile_count_is_bounded_over_a_run_with_grids(tmp_path):
    """As tests/test_fast_path.py, with inductor on the GPU: 6 block compiles for the whole run."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    train(
        load_config(
            None,
            [
                f"output_dir={tmp_path}",
                "max_steps=2",
                "batch_size=2",
                "num_steps=3",
                "grid_every=1",
                "report_to=none",
                "ema_decay=0",
                "mixed_precision=bf16",
                "model.dtype=bfloat16",
                "lora.enabled=true",
                "lora.rank=4",
                "model.tiny.layers=2",
                "model.tiny.single_layers=2",
                "model.compile=regional",
                f"model.compile_backend={BACKEND}",
                "model.cuda_graph=true",
            ],
        )
    )
    compiles = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert 0 < compiles <= 6, compiles


@cuda_only
@pytest.mark.xfail(
    raises=RuntimeError,
    strict=False,
    reason="predicted, not fixed here: bicubic/bilinear interpolate "
    "has no deterministic CUDA backward, so deterministic=true with a CLIP-family reward (HPS, PickScore) "
    "would fail at the first backward (rewards/clip_rewards.py clip_preprocess)",
)
def test_clip_preprocess_backward_under_deterministic_mode():
    from leapalign_fast.rewards.clip_rewards import clip_preprocess

    images = torch.rand(2, 3, 64, 64, device=DEV, requires_grad=True)
    torch.use_deterministic_algorithms(True)
    try:
        clip_preprocess(images, 224).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.isfinite(images.grad).all()
