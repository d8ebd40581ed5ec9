"""The FLUX fast path on CPU: FluxPipeline equivalence, compile without graph breaks, LoRA export that
diffusers loads, the prompt cache that frees training from the text encoders, the CUDA-graph velocity."""

import gc
import shutil
import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from leapalign_fast.cli import main
from leapalign_fast.config import load_config
from leapalign_fast.errors import UserError
from leapalign_fast.flow import flux_schedule
from leapalign_fast.models.fast import GraphedVelocity, compile_transformer, resolve_attention
from leapalign_fast.models.flux import (
    FluxVelocity,
    TinyFluxConfig,
    build_tiny_flux,
    latent_image_ids,
    save_flux,
)
from leapalign_fast.models.text import encode_prompts
from leapalign_fast.sampler import sample_trajectory
from leapalign_fast.train import train, unwrap

RES, N = 64, 6


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux")
    comps = build_tiny_flux(TinyFluxConfig(), seed=0)
    save_flux(comps, d)
    return d, comps


def _pipeline(path):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(path, torch_dtype=torch.float32, local_files_only=True)


def _ours(transformer, embeds, noise):
    ids = latent_image_ids(8, 8)
    velocity = FluxVelocity(transformer, embeds.t5, embeds.pooled, ids, 3.5)
    with torch.no_grad():
        return sample_trajectory(velocity, noise, flux_schedule(N, noise.shape[1])).x0


def _theirs(pipe, embeds, noise):
    with torch.no_grad():
        return pipe(
            prompt_embeds=embeds.t5,
            pooled_prompt_embeds=embeds.pooled,
            latents=noise,
            height=RES,
            width=RES,
            num_inference_steps=N,
            guidance_scale=3.5,
            output_type="latent",
            return_dict=False,
        )[0]


def test_sampler_reproduces_flux_pipeline(flux_dir):
    path, comps = flux_dir
    embeds = encode_prompts(comps.text, ["a red square", "two blue circles"])
    noise = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    ours, theirs = _ours(comps.transformer, embeds, noise), _theirs(_pipeline(path), embeds, noise)
    assert theirs.shape == ours.shape == (2, 16, 64)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_lora_export_loads_in_flux_pipeline(flux_dir, tmp_path):
    path, comps = flux_dir
    res = train(
        load_config(
            None,
            [
                f"output_dir={tmp_path}",
                f"model.source={path}",
                "lora.enabled=true",
                "lora.rank=4",
                "lr=5e-2",
                "max_steps=2",
                "batch_size=2",
                "num_steps=4",
                "report_to=none",
            ],
        )
    )
    trained = unwrap(res.trainer.transformer).cpu()  # on a GPU host the run trained on CUDA; the pipeline is on CPU
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in trained.named_parameters())
    pipe = _pipeline(path)
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="leap")
    embeds = encode_prompts(comps.text, ["a red square"])
    noise = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(1))
    ours, theirs = _ours(trained, embeds, noise), _theirs(pipe, embeds, noise)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    base = _ours(comps.transformer, embeds, noise)
    assert (ours - base).abs().max() > 1e-4  # the adapter changed the samples


@pytest.mark.parametrize("mode", ["full", "regional"])
def test_compiled_transformer_has_no_graph_breaks_and_equals_eager(mode):
    torch._dynamo.reset()
    eager = build_tiny_flux(TinyFluxConfig(), seed=0).transformer
    compiled = build_tiny_flux(TinyFluxConfig(), seed=0).transformer
    compile_transformer(compiled, mode, backend="aot_eager")  # fullgraph=True: a graph break raises
    t5, pooled = torch.randn(2, 8, 32), torch.randn(2, 32)
    x, t, ids = torch.randn(2, 16, 64), torch.tensor([0.7, 0.2]), latent_image_ids(8, 8)
    ve, vc = FluxVelocity(eager, t5, pooled, ids, 3.5), FluxVelocity(compiled, t5, pooled, ids, 3.5)
    with torch.no_grad():
        torch.testing.assert_close(vc(x, t), ve(x, t), rtol=1e-5, atol=1e-5)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ge = torch.autograd.grad(ve(xe, t).square().sum(), [xe, *eager.parameters()])
    gc = torch.autograd.grad(vc(xc, t).square().sum(), [xc, *compiled.parameters()])
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_regional_compile_count_is_bounded_over_a_run_with_grids(tmp_path):
    """Each FLUX block compile takes about a minute on an H100. A LoRA + bf16 LeapAlign run whose grids (4 eval
    prompts) differ from the train batch (2) compiled 12 graphs before (per block kind: grad mode, batch size,
    requires-grad, contiguity and view-ness of the first block's inputs vs the rest); now 3 per kind: no-grad,
    no-grad with a dynamic batch (after the second size), grad."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    train(
        load_config(
            None,
            [
                f"output_dir={tmp_path}",
                "max_steps=1",
                "batch_size=2",
                "num_steps=3",
                "grid_every=0",
                "report_to=none",
                "ema_decay=0",
                "mixed_precision=bf16",
                "model.dtype=bfloat16",
                "lora.enabled=true",
                "lora.rank=4",
                "model.tiny.layers=2",
                "model.tiny.single_layers=2",
                "model.compile=regional",
                "model.compile_backend=eager",
            ],
        )
    )
    compiles = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert 0 < compiles <= 6, compiles


def test_sampler_makes_no_host_copies_per_step():
    """The schedule moves to the latents' device once per trajectory; before, each Euler step copied CPU times to
    the device three times (75 blocking copies per 25-step trajectory). On the meta device any host read
    (.item(), float()) raises, and a CPU -> device copy shows as an aten._to_copy from CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostCopies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
                src = args[0] if func is torch.ops.aten._to_copy.default else args[1]
                if isinstance(src, torch.Tensor) and src.device.type == "cpu":
                    HostCopies.count += 1
            return func(*args, **kwargs)

    noise = torch.empty(2, 16, 64, device="meta")
    velocity = lambda x, t: x * t[:, None, None]  # noqa: E731
    for sigmas, copies in ((flux_schedule(25, 16), 1), (flux_schedule(25, 16, device="meta"), 0)):
        HostCopies.count = 0
        with HostCopies(), torch.no_grad():
            traj = sample_trajectory(velocity, noise, sigmas)
        assert traj.x0.device.type == "meta" and HostCopies.count == copies, HostCopies.count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_cache_equals_flux_pipeline_encoding_read_per_batch(tmp_path, dtype):
    """The cache holds what FluxPipeline.encode_prompt gives (full padded T5 sequence: FLUX attends over the
    padding without a mask), in the encoders' dtype (bf16 for FLUX.1-dev: half the fp32 bytes, nothing lost),
    in chunk files read row by row."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from leapalign_fast.models.text import PromptCache, build_tiny_text_stack, write_prompt_cache

    text = build_tiny_text_stack(32, 32, seed=1)
    text.clip.to(dtype)
    text.t5.to(dtype)
    prompts = ["a red square", "two blue circles", "a green star", "a cube", "a small yellow ring left of a box"]
    write_prompt_cache(text, prompts, tmp_path / "cache" / "index.json", chunk=2)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "chunk_00000.safetensors",
        "chunk_00001.safetensors",
        "chunk_00002.safetensors",
        "index.json",
    ]
    cache = PromptCache(tmp_path / "cache" / "index.json")
    assert cache.prompts == prompts
    comps = build_tiny_flux(TinyFluxConfig(), seed=0)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=comps.vae,
        text_encoder=text.clip,
        tokenizer=text.clip_tokenizer,
        text_encoder_2=text.t5,
        tokenizer_2=text.t5_tokenizer,
        transformer=comps.transformer,
    )
    idx = [4, 0, 3]
    with torch.no_grad():
        want_t5, want_pooled, _ = pipe.encode_prompt([prompts[i] for i in idx], None, max_sequence_length=32)
    t5, pooled = cache.select(idx)
    assert t5.dtype == pooled.dtype == dtype and t5.shape == (3, 32, 32)
    torch.testing.assert_close(t5, want_t5, rtol=0, atol=0)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=0)
    lengths = cache.lengths(idx).tolist()
    assert lengths[1] < lengths[0] and all(0 < n <= 32 for n in lengths)


def test_encode_prompts_then_train_without_text_encoders(flux_dir, tmp_path, capsys):
    path, _ = flux_dir
    model = tmp_path / "flux-no-text"
    shutil.copytree(path, model)
    args = [
        f"output_dir={tmp_path / 'run'}",
        f"model.source={model}",
        "max_steps=1",
        "batch_size=2",
        "num_steps=4",
        "report_to=none",
    ]
    assert main(["encode-prompts", *args]) == 0
    assert capsys.readouterr().out.count("wrote ") == 2
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.rmtree(model / sub)
    assert main(["train", *args]) == 0  # the cache stands in for the encoders
    code = main(["train", *args[1:], f"output_dir={tmp_path / 'other'}"])  # no cache there: encoders needed
    assert code == 2 and "text_encoder/config.json" in capsys.readouterr().err


def test_attention_backend_resolution():
    assert resolve_attention("auto", torch.device("cpu")) == "native"
    with pytest.raises(UserError, match="not one of"):
        resolve_attention("xformers2", torch.device("cpu"))
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(UserError, match="needs the flash-attn package"):
            resolve_attention("flash", torch.device("cuda"), torch.bfloat16)


def test_auto_attention_picks_flash_only_where_it_runs_and_refuses_forward_only_backends(monkeypatch):
    from leapalign_fast.models import fast

    cuda, cpu, bf16, f32 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16, torch.float32
    monkeypatch.setattr(fast, "_diffusers_problem", lambda name: None)  # as if flash-attn were installed
    monkeypatch.setattr(fast, "_flash_attn_version", lambda: (2, 8))
    assert resolve_attention("auto", cuda, bf16) == "flash"
    assert resolve_attention("auto", cuda, torch.float16, compile="regional") == "flash"
    assert resolve_attention("auto", cuda, f32) == "native"  # the tiny default: flash needs bf16/fp16
    assert resolve_attention("auto", cpu, bf16) == "native"
    with pytest.raises(UserError, match="bfloat16 or float16"):
        resolve_attention("flash", cuda, f32)
    with pytest.raises(UserError, match="no backward"):
        resolve_attention("_flash_3", cuda, bf16)
    assert resolve_attention("_flash_3", cuda, bf16, training=False) == "_flash_3"  # fine for sampling only
    monkeypatch.setattr(fast, "_flash_attn_version", lambda: (2, 6))  # too old for a fullgraph compile
    assert resolve_attention("auto", cuda, bf16, compile="regional") == "native"
    assert resolve_attention("auto", cuda, bf16) == "flash"
    with pytest.raises(UserError, match=">= 2.7"):
        resolve_attention("flash", cuda, bf16, compile="full")
    monkeypatch.setattr(fast, "_diffusers_problem", lambda name: "the version is too old")  # diffusers says no
    assert resolve_attention("auto", cuda, bf16) == "native"
    with pytest.raises(UserError, match="too old"):
        resolve_attention("flash", cuda, bf16)


def test_graphed_velocity_is_eager_on_cpu():
    comps = build_tiny_flux(TinyFluxConfig(), seed=0)
    v = FluxVelocity(comps.transformer, torch.randn(2, 8, 32), torch.randn(2, 32), latent_image_ids(8, 8), 3.5)
    g = GraphedVelocity(comps.transformer).bind(v)
    x, t = torch.randn(2, 16, 64), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        torch.testing.assert_close(g(x, t), v(x, t), rtol=0, atol=0)
    assert g.graphs == {}


class _ExternalReads(TorchFunctionMode):
    """Records every tensor an op reads that was made outside this mode and is no weight: a graph's inputs."""

    def __init__(self, weights):
        super().__init__()
        self.weights, self.made, self.read = {id(w) for w in weights}, [], {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        made = {id(m) for m in self.made}
        for a in tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor) and id(a) not in made and id(a) not in self.weights:
                self.read[id(a)] = weakref.ref(a)
        out = func(*args, **kwargs)
        self.made += [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]  # kept: ids stay unique
        return out


def cpu_graph(transformer):
    """A CPU stand-in for a CUDA graph: capture records what the forward reads from outside (weak references
    only, as a graph holds raw addresses); replay fails if any of it was freed, then recomputes."""
    weights = [*transformer.parameters(), *transformer.buffers()]
    log = {}

    def capture(forward, warmup):
        with _ExternalReads(weights) as mode:
            out = forward()
        log["reads"] = list(mode.read.values())

        def replay():
            alive = [r() for r in log["reads"]]
            assert all(a is not None for a in alive), "a graph input was freed after capture"
            out.copy_(forward())

        return replay, out

    return capture, log


def test_graphed_velocity_binds_every_input_to_static_buffers():
    """The issue-18 bug: img_ids and guidance were read by reference and txt_ids made inside the capture, so a
    replay on a GPU read freed memory. The shipped binding fails this test (wrong values on the 2nd bind)."""
    comps = build_tiny_flux(TinyFluxConfig(), seed=0)
    tr = comps.transformer
    capture, log = cpu_graph(tr)
    g = GraphedVelocity(tr, capture=capture, device_types=("cpu",))
    for seed in range(3):  # new conditioning, guidance and positions each time: one capture, three replays
        gen = torch.Generator().manual_seed(seed)
        t5, pooled = torch.randn(2, 8, 32, generator=gen), torch.randn(2, 32, generator=gen)
        ids = latent_image_ids(8, 8)
        x, t = torch.randn(2, 16, 64, generator=gen), torch.rand(2, generator=gen)
        g.bind(FluxVelocity(tr, t5.clone(), pooled.clone(), ids + seed, 3.5 + seed))  # the caller drops its refs
        gc.collect()
        garbage = [torch.full((4096,), float(i)) for i in range(64)]  # allocations between binds and replays
        fresh = FluxVelocity(tr, t5, pooled, ids + seed, 3.5 + seed)
        with torch.no_grad():
            out = g(x, t)
            torch.testing.assert_close(out, fresh(x, t), rtol=0, atol=0)
        del garbage
    assert len(g.graphs) == 1
    ((_, static),) = g.graphs.values()
    buffers = {id(b) for b in static.values() if b is not None}
    reads = [r() for r in log["reads"]]
    assert all(r is not None and id(r) in buffers for r in reads), "the graph reads a tensor it does not own"
    assert {n for n, b in static.items() if b is not None and any(r is b for r in reads)} >= {
        "x",
        "t",
        "t5",
        "pooled",
        "img_ids",
        "txt_ids",
        "guidance",
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_velocity_replays_equal_eager_on_gpu():
    comps = build_tiny_flux(TinyFluxConfig(), seed=0)
    tr = comps.transformer.cuda()
    g = GraphedVelocity(tr)
    for seed in range(4):  # new conditioning, guidance, positions and inputs each time: one capture, four replays
        gen = torch.Generator().manual_seed(seed)
        t5, pooled = torch.randn(2, 8, 32, generator=gen).cuda(), torch.randn(2, 32, generator=gen).cuda()
        ids = latent_image_ids(8, 8, "cuda") + seed
        x, t = torch.randn(2, 16, 64, generator=gen).cuda(), torch.rand(2, generator=gen).cuda()
        g.bind(FluxVelocity(tr, t5.clone(), pooled.clone(), ids.clone(), 3.5 + seed))  # caller's tensors die
        gc.collect()
        garbage = [torch.full((1 << 16,), float(i), device="cuda") for i in range(64)]  # reuse freed blocks
        with torch.no_grad():
            got = g(x, t)
            del garbage
            garbage = [torch.full((1 << 16,), -1.0, device="cuda") for _ in range(64)]  # noqa: F841  (held while the graph replays)
            torch.testing.assert_close(got, FluxVelocity(tr, t5, pooled, ids, 3.5 + seed)(x, t), rtol=1e-5, atol=1e-5)
    assert len(g.graphs) == 1
    x.requires_grad_(True)
    assert g(x, t).requires_grad  # grad-enabled calls run eagerly, outside the graph


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphs_of_two_signatures_share_one_pool_and_replay_in_any_order():
    """Batch 2 and batch 3 captured into one memory pool, then replayed interleaved in an order other than the
    capture's: each replay still equals eager (each result is cloned before the other graph replays)."""
    comps = build_tiny_flux(TinyFluxConfig(), seed=0)
    tr = comps.transformer.cuda()
    g = GraphedVelocity(tr)
    gen = torch.Generator().manual_seed(0)
    cases = {}
    for b in (2, 3):
        t5, pooled = torch.randn(b, 8, 32, generator=gen).cuda(), torch.randn(b, 32, generator=gen).cuda()
        x, t = torch.randn(b, 16, 64, generator=gen).cuda(), torch.rand(b, generator=gen).cuda()
        cases[b] = (FluxVelocity(tr, t5, pooled, latent_image_ids(8, 8, "cuda"), 3.5), x, t)
    with torch.no_grad():
        want = {b: v(x, t) for b, (v, x, t) in cases.items()}
        for b in (2, 3, 3, 2, 3, 2, 2):
            v, x, t = cases[b]
            torch.testing.assert_close(g.bind(v)(x, t), want[b], rtol=1e-5, atol=1e-5)
    assert len(g.graphs) == 2 and g.pool is not None


@pytest.mark.parametrize("family", ["flux", "sd3", "flux2", "qwenimage", "zimage"])
def test_bench_sampler_quick(family, tmp_path):
    """bench/sampler.py's path for every backbone at toy size (random weights and embeddings, in this process):
    our sampler and the family's diffusers pipeline, timed, the same latents."""
    import json
    import sys
    from pathlib import Path

    sys.path.append(str(Path(__file__).resolve().parent.parent))
    from bench import sampler

    assert sampler.main(["--quick", "--backbone", family, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("sampler_random-tiny*_cpu.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["pipeline_eager", "ours_eager"] and {r["backbone"] for r in rows} == {
        family
    }
    assert all(r["images_per_second"] > 0 and r["max_abs_diff_vs_pipeline"] < 1e-5 for r in rows)


@pytest.mark.parametrize("name", ["flux_leapalign.toml", "flux_leapalign_512.toml", "flux_leapalign_full.toml"])
def test_flux_configs_checkpoint_blocks_to_fit_80gb(name):
    """README "FLUX.1-dev memory (estimated)": without per-block checkpointing none of them fits an 80 GB GPU
    (720² batch 4: 187 GiB; 512² batch 8: 217 GiB); with it 63 and 66 GiB."""
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / name)
    assert cfg.model.gradient_checkpointing and cfg.model.attention == "auto"
    assert (cfg.resolution, cfg.batch_size) in {(720, 4), (512, 8)}
    assert (cfg.num_steps, cfg.lr, cfg.method.alpha, cfg.method.tau, cfg.method.lam, cfg.mixed_precision) == (
        25,
        1e-5,
        0.3,
        0.1,
        0.55,
        "bf16",
    )


def test_other_ranks_wait_for_the_prompt_cache_on_the_file_system(tmp_path):
    """Not a barrier: a collective would time out while rank 0 encodes a large prompt set."""
    import threading

    from leapalign_fast.build import wait_for_files

    index = tmp_path / "cache" / "index.json"
    timer = threading.Timer(0.2, lambda: (index.parent.mkdir(), index.write_text("{}")))
    timer.start()
    wait_for_files([index], timeout_s=10, poll_s=0.05)
    timer.join()
    with pytest.raises(UserError, match="encode-prompts"):
        wait_for_files([tmp_path / "never.json"], timeout_s=0.1, poll_s=0.05)
