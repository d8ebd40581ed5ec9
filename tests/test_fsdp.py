"""FSDP2 full fine-tunes and sharded (DCP) checkpoints on CPU (gloo): the build order (trainable state and EMA
after sharding), bit-exact resume, asynchronous and synchronous saves, resharding 2 -> 1 and 1 -> 2 processes,
SIGTERM to one rank, SIGKILL of one rank mid-save, and the consolidated export that diffusers loads.

In-process runs are one-rank FSDP (a process group of one, made by the trainer); the multi-process tests start
both ranks themselves (RANK/WORLD_SIZE/MASTER_PORT, as torchrun would), so each rank's pid and exit status is
known. Each process spends ~10 s importing torch + diffusers on this project's shared 2-core machine: those are
marked slow.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from leapalign_fast.checkpoint import list_checkpoints, verify_checkpoint
from leapalign_fast.config import load_config
from leapalign_fast.dist_checkpoint import SHARDS, consolidate, export_transformer
from leapalign_fast.errors import UserError
from leapalign_fast.train import EXIT_PREEMPTED, train

ROOT = Path(__file__).resolve().parent.parent
BASE = [
    "batch_size=2",
    "num_steps=4",
    "report_to=none",
    "deterministic=true",
    "ema_decay=0.9",
    "fsdp=true",
    "checkpoint_every=2",
    "keep_checkpoints=3",
]


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _ckpt(out, step):
    return Path(out) / "checkpoints" / f"step_{step:08d}"


def _assert_same_checkpoint(a: Path, b: Path):
    for which in ("trained", "ema", "optimizer"):
        ta, tb = consolidate(a, which), consolidate(b, which)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (which, k)


def _assert_same_run(a, b, step):
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in rb] == list(range(1, step + 1))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    _assert_same_checkpoint(_ckpt(a, step), _ckpt(b, step))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out, args, world=2, env=None, worker=None):
    """Start `world` ranks of `leapalign-fast train` (or tests/ddp_worker.py `worker` args) on CPU; stderr to
    <out>.rank<r>.err."""
    port, procs = _free_port(), []
    for r in range(world):
        e = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        cmd = (
            [str(ROOT / "tests" / "ddp_worker.py"), *worker]
            if worker is not None
            else ["-m", "leapalign_fast.cli", "train", "--config", str(ROOT / "configs" / "defaults.toml")]
        )
        err = open(f"{out}.rank{r}.err", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, *cmd, f"output_dir={out}", *args],
                cwd=ROOT,
                env=e,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        )
    return procs


def _wait(procs, timeout=300):
    return [p.wait(timeout=timeout) for p in procs]


def _err(out, rank=0):
    return Path(f"{out}.rank{rank}.err").read_text()[-3000:]


# ---- in-process: one-rank FSDP -------------------------------------------------------------------------------


def test_trainable_state_and_ema_are_built_from_the_shards(tmp_path):
    res = train(load_config(None, [f"output_dir={tmp_path}", "max_steps=1", *BASE]))
    run = res.trainer
    named = dict(run.transformer.named_parameters())
    assert named and all(
        isinstance(p, DTensor) and p.dtype == torch.float32 and p.requires_grad for p in named.values()
    )
    assert [id(p) for p in run.params] == [id(p) for p in named.values()]  # the optimizer holds the sharded ones
    for n, shadow in run.ema.shadow.items():  # the EMA is sharded like its parameter
        assert isinstance(shadow, DTensor) and shadow.placements == named[n].placements, n
        assert shadow.to_local().shape == named[n].to_local().shape
    state = next(iter(run.optimizer.state.values()))
    assert isinstance(state["exp_avg"], DTensor)
    ckpt = _ckpt(tmp_path, 1)
    assert (ckpt / SHARDS / ".metadata").is_file() and verify_checkpoint(ckpt) is None
    assert json.loads((ckpt / "state.json").read_text())["format"] == "dcp"


def test_sharding_keeps_the_frozen_base_in_its_storage_dtype_and_upcasts_the_trainable_per_block():
    from leapalign_fast.build import add_trainable
    from leapalign_fast.config import TinyFluxConfig
    from leapalign_fast.fsdp import shard_transformer
    from leapalign_fast.models.backbone import get_backbone
    from leapalign_fast.models.flux import build_tiny_flux

    cfg = load_config(None, ["lora.enabled=true", "lora.rank=4", "fsdp=true", "model.dtype=bfloat16"])
    transformer = build_tiny_flux(TinyFluxConfig(), 0).transformer.to(torch.bfloat16)
    add_trainable(transformer, cfg, get_backbone("flux"), upcast=False)
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16}  # nothing upcast before sharding
    shard_transformer(transformer, torch.device("cpu"), torch.bfloat16)
    for n, p in transformer.named_parameters():
        assert isinstance(p, DTensor) and p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n


@pytest.mark.parametrize(
    "bad, why",
    [("model.cuda_graph=true", "cuda_graph"), ("mixed_precision=fp16", "fp16"), ("eval_every=2", "eval_every")],
)
def test_what_cannot_run_sharded_is_one_user_error(bad, why):
    with pytest.raises(UserError, match=why):
        load_config(None, ["fsdp=true", bad])


def test_resume_is_bit_exact_sync_and_async_saves_agree_and_the_export_loads_in_diffusers(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from leapalign_fast.models.text import build_tiny_text_stack

    straight, split = tmp_path / "straight", tmp_path / "split"
    train(load_config(None, [f"output_dir={straight}", "max_steps=4", "async_checkpoint=false", *BASE]))
    res = train(load_config(None, [f"output_dir={split}", "max_steps=2", *BASE]))
    assert len(res.trainer.checkpointer.saver.blocking_seconds) == 1
    train(load_config(None, [f"output_dir={split}", "max_steps=4", "resume=true", *BASE]))
    _assert_same_run(straight, split, 4)

    last = _ckpt(split, 4)
    for name, which in (("transformer", "trained"), ("transformer_ema", "ema")):
        model = FluxTransformer2DModel.from_pretrained(split / name)
        want = consolidate(last, which)
        got = dict(model.named_parameters())
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
    text = build_tiny_text_stack(32, 32, seed=1)
    comps = res.trainer.components
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=comps.vae,
        text_encoder=text.clip,
        tokenizer=text.clip_tokenizer,
        text_encoder_2=text.t5,
        tokenizer_2=text.t5_tokenizer,
        transformer=model,
    )
    image = pipe(
        "a red square", height=64, width=64, num_inference_steps=2, max_sequence_length=32, output_type="pt"
    ).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    export_transformer(last, tmp_path / "again")  # the offline export (`leapalign-fast export`): same file
    assert (tmp_path / "again" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        split / "transformer" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()


def test_export_command_writes_a_diffusers_directory(tmp_path):
    from leapalign_fast.cli import main

    train(load_config(None, [f"output_dir={tmp_path}", "max_steps=1", *BASE]))
    assert main(["export", "--checkpoint", str(_ckpt(tmp_path, 1)), "--out", str(tmp_path / "x"), "--ema"]) == 0
    want = consolidate(_ckpt(tmp_path, 1), "ema")
    got = load_file(str(tmp_path / "x" / "diffusion_pytorch_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert main(["export", "--checkpoint", str(tmp_path / "nope")]) == 2


# ---- several processes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_two(tmp_path_factory):
    """2 ranks, 6 steps, checkpoints at 2, 4, 6: the reference run."""
    out = tmp_path_factory.mktemp("fsdp") / "straight"
    assert _wait(_launch(out, ["max_steps=6", *BASE])) == [0, 0], _err(out)
    return out


@pytest.mark.slow
def test_sigkill_of_one_rank_mid_save_keeps_the_previous_checkpoint_then_resume_is_bit_exact(tmp_path, straight_two):
    out = tmp_path / "killed"
    # Rank 1 dies (SIGKILL) when step 4's save starts writing shards; rank 0 has staged its files by then.
    procs = _launch(out, ["max_steps=6", *BASE], env={"LEAPALIGN_FAULT": "checkpoint_shards_rank1:4"})
    assert procs[1].wait(timeout=300) == -signal.SIGKILL
    try:
        procs[0].wait(timeout=60)  # its collectives fail once the peer is gone
    except subprocess.TimeoutExpired:
        procs[0].kill()
        procs[0].wait()
    assert procs[0].returncode != 0
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002"]
    assert (out / "checkpoints" / ".tmp-step_00000004").is_dir() and verify_checkpoint(_ckpt(out, 2)) is None
    assert _wait(_launch(out, ["max_steps=6", "resume=true", *BASE])) == [0, 0], _err(out)
    assert not (out / "checkpoints" / ".tmp-step_00000004").exists()
    _assert_same_run(straight_two, out, 6)  # same world size: bit for bit
    assert sorted(p.name for p in _ckpt(out, 6).glob("rng_rank*.safetensors")) == [
        "rng_rank0.safetensors",
        "rng_rank1.safetensors",
    ]


@pytest.mark.slow
def test_two_rank_fsdp_trains_like_two_rank_ddp(tmp_path, straight_two):
    """Same samples, same math: losses, gradient norms and EMA within float tolerance of DDP's."""
    ddp = tmp_path / "ddp"
    assert _wait(_launch(ddp, ["max_steps=6", *[a for a in BASE if a != "fsdp=true"]])) == [0, 0], _err(ddp)
    for a, b in zip(_rows(ddp), _rows(straight_two), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    want = load_file(str(_ckpt(ddp, 6) / "ema.safetensors"))
    got = consolidate(_ckpt(straight_two, 6), "ema")
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


def _assert_loaded_equals(dump: Path, ckpt: Path):
    got = load_file(str(dump))
    for which in ("trained", "ema", "optimizer"):
        want = {f"{which}.{k}": v for k, v in consolidate(ckpt, which).items()}
        assert want and all(k in got for k in want), which
        for k, v in want.items():
            assert torch.equal(got[k].reshape(v.shape), v), k


@pytest.mark.slow
def test_reshard_two_processes_to_one_and_one_to_two(tmp_path, straight_two):
    # 2 -> 1: the checkpoint of step 2 written by 2 ranks, resumed by this process alone.
    from ddp_worker import dump_resumed

    two_to_one = tmp_path / "two_to_one"
    (two_to_one / "checkpoints").mkdir(parents=True)
    shutil.copytree(_ckpt(straight_two, 2), _ckpt(two_to_one, 2))
    cfg = [f"output_dir={two_to_one}", "resume=true", *BASE]
    dump_resumed(load_config(None, [*cfg, "max_steps=6"]), tmp_path / "loaded_1.safetensors")
    _assert_loaded_equals(tmp_path / "loaded_1.safetensors", _ckpt(straight_two, 2))
    train(load_config(None, [*cfg, "max_steps=4"]))  # and it trains on, at world size 1
    assert json.loads((_ckpt(two_to_one, 4) / "state.json").read_text())["world_size"] == 1
    rows, ref = _rows(two_to_one), _rows(straight_two)
    assert [r["loss"] for r in rows[:2]] == [r["loss"] for r in ref[:2]]  # the log up to the checkpoint, kept
    assert all(r["loss"] is not None for r in rows)

    # 1 -> 2: a checkpoint written by this process alone, resumed by 2 ranks.
    one_to_two = tmp_path / "one_to_two"
    train(load_config(None, [f"output_dir={one_to_two}", "max_steps=2", *BASE]))
    dump = tmp_path / "loaded_2.safetensors"
    procs = _launch(one_to_two, ["resume=true", "max_steps=4", *BASE], worker=["--dump-resumed", str(dump)])
    assert _wait(procs) == [0, 0], _err(one_to_two)
    _assert_loaded_equals(dump, _ckpt(one_to_two, 2))


@pytest.mark.slow
def test_sigterm_to_one_rank_checkpoints_every_rank_at_the_same_step_and_exits_75(tmp_path):
    out = tmp_path / "term"
    procs = _launch(out, ["max_steps=100000", "checkpoint_every=100000", *BASE[:-2]])
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 2) and time.time() < deadline:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # one rank only: the per-step max-reduce of the stop flag stops both
    assert _wait(procs, timeout=120) == [EXIT_PREEMPTED, EXIT_PREEMPTED], _err(out, 1)
    last = _rows(out)[-1]["step"]
    assert [p.name for p in list_checkpoints(out)] == [f"step_{last:08d}"]
    ckpt = _ckpt(out, last)
    assert verify_checkpoint(ckpt) is None and json.loads((ckpt / "state.json").read_text())["step"] == last
    assert sorted(p.name for p in (ckpt / SHARDS).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert "rerun with resume=true" in _err(out, 0) and "Traceback" not in _err(out, 0) + _err(out, 1)


def test_one_rank_fsdp_trains_like_the_unsharded_trainer(tmp_path):
    """Same losses and weights (float tolerance) as fsdp=false: the sharded forward/backward, clipping, optimizer
    and EMA compute the same thing."""
    common = ["max_steps=3", "checkpoint_every=3", *BASE[:5]]
    train(load_config(None, [f"output_dir={tmp_path / 'plain'}", *common]))
    train(load_config(None, [f"output_dir={tmp_path / 'fsdp'}", "fsdp=true", *common]))
    plain, sharded = _rows(tmp_path / "plain"), _rows(tmp_path / "fsdp")
    for a, b in zip(plain, sharded):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    want = load_file(str(_ckpt(tmp_path / "plain", 3) / "ema.safetensors"))
    got = consolidate(_ckpt(tmp_path / "fsdp", 3), "ema")
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


def test_lora_under_fsdp_trains_and_exports_like_the_unsharded_trainer(tmp_path):
    common = ["max_steps=2", "checkpoint_every=2", *BASE[:5], "lora.enabled=true", "lora.rank=4", "lr=1e-2"]
    train(load_config(None, [f"output_dir={tmp_path / 'plain'}", *common]))
    train(load_config(None, [f"output_dir={tmp_path / 'fsdp'}", "fsdp=true", *common]))
    for name in ("lora", "lora_ema"):
        want = load_file(str(tmp_path / "plain" / name / "pytorch_lora_weights.safetensors"))
        got = load_file(str(tmp_path / "fsdp" / name / "pytorch_lora_weights.safetensors"))
        assert want.keys() == got.keys() and want
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(UserError, match="LoRA run"):
        export_transformer(_ckpt(tmp_path / "fsdp", 2), tmp_path / "x")


def test_an_async_save_writes_the_state_of_its_step_while_training_changes_it(tmp_path):
    """dcp.async_save copies the shards to host memory before it returns: an optimizer step that changes the
    weights in place while the write runs does not reach the checkpoint."""
    from leapalign_fast.dist_checkpoint import ShardedSaver
    from leapalign_fast.fsdp import ensure_process_group

    ensure_process_group(torch.device("cpu"))
    want = torch.arange(8_000_000, dtype=torch.float32)  # 32 MB: still being written when the step below runs
    weights = want.clone()
    saver, committed = ShardedSaver(asynchronous=True, log=tmp_path / "log.jsonl"), []
    saver.save(tmp_path, 1, {"trained": {"w": weights}}, lambda: committed.append(True), lambda error: None)
    weights.add_(1.0)  # the next optimizer step
    saver.close()
    assert committed == [True] and torch.equal(consolidate(tmp_path, "trained")["w"], want)
    row = json.loads((tmp_path / "log.jsonl").read_text())
    assert row["asynchronous"] and row["committed_after_s"] >= row["blocking_s"]


def test_eval_scores_a_sharded_checkpoint(tmp_path):
    from leapalign_fast.evaluate import evaluate

    cfg = load_config(None, [f"output_dir={tmp_path}", "max_steps=1", *BASE])
    train(cfg)
    result = evaluate(cfg, None, ["colour"], "latest", ema=True, num_steps=2, batch_size=4, out=tmp_path / "eval")
    assert result["scores"]["colour"]["n"] == len(cfg.eval_prompts)


@pytest.mark.parametrize("asynchronous", [True, False], ids=["async", "sync"])
def test_a_failed_sharded_save_is_one_line_keeps_the_older_checkpoint_and_resume_works(
    tmp_path, monkeypatch, asynchronous
):
    import errno

    from leapalign_fast import dist_checkpoint

    real = dist_checkpoint.check_shards

    def disk_full_at_step_4(tmp, world):
        if tmp.name.endswith("04"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tmp, world)

    monkeypatch.setattr(dist_checkpoint, "check_shards", disk_full_at_step_4)
    args = [f"output_dir={tmp_path}", "max_steps=4", f"async_checkpoint={str(asynchronous).lower()}", *BASE]
    with pytest.raises(UserError, match="cannot write checkpoint step 4.*disk is full.*newest: step_00000002"):
        train(load_config(None, args))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]
    assert not (tmp_path / "checkpoints" / ".tmp-step_00000004").exists()
    monkeypatch.undo()
    res = train(load_config(None, [*args, "resume=true"]))
    assert res.start_step == 2 and res.steps == 4 and verify_checkpoint(_ckpt(tmp_path, 4)) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_bf16_compute_float32_master_shards_resume_bit_exact_and_bf16_export(tmp_path):
    """The GPU path (`pytest -m gpu`): MixedPrecisionPolicy(bf16, reduce float32) over NCCL, bf16 storage."""
    gpu = ["mixed_precision=bf16", "model.dtype=bfloat16", "model.gradient_checkpointing=true", *BASE]
    straight, split = tmp_path / "straight", tmp_path / "split"
    res = train(load_config(None, [f"output_dir={straight}", "max_steps=4", *gpu]))
    named = dict(res.trainer.transformer.named_parameters())
    assert all(isinstance(p, DTensor) and p.device.type == "cuda" and p.dtype == torch.float32 for p in named.values())
    train(load_config(None, [f"output_dir={split}", "max_steps=2", *gpu]))
    train(load_config(None, [f"output_dir={split}", "max_steps=4", "resume=true", *gpu]))
    _assert_same_run(straight, split, 4)
    exported = load_file(str(split / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
