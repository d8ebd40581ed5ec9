"""FSDP2 from a model directory: the transformer built on the meta device, each rank reading only its rows of the
safetensors file(s), is the very model that loading it whole then sharding gave: every parameter (gathered), its
dtype, every buffer, LoRA's initial values, and the loss and gradients of a step; at one rank in-process and at
two ranks (gloo, slow: each process imports torch + diffusers). A rank reads about 1/world of the weights:
counted by the loader, and seen in the peak RSS of two ranks loading a 271 MiB model."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_load_worker import TINY, build_sharded, snapshot
from safetensors.torch import load_file
from test_fsdp import BASE, _assert_same_run, _free_port
from torch.distributed.tensor import DTensor

from leapalign_fast.config import TinyFluxConfig, load_config
from leapalign_fast.fsdp import shard_rows
from leapalign_fast.models.flux import FluxComponents, build_tiny_flux, save_flux
from leapalign_fast.train import train

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "lora-bf16": ["lora.enabled=true", "lora.rank=4", "model.dtype=bfloat16", "mixed_precision=bf16"],
    "full-bf16": ["model.dtype=bfloat16", "mixed_precision=bf16"],
    "full-fp32": [],
}


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux_meta")
    save_flux(build_tiny_flux(TINY, seed=0), d)  # a float32 file: bf16 runs cast it as from_pretrained does
    return d


def assert_identical(want: dict, got: dict):
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k


def read_counts(line: str) -> tuple[int, int]:
    m = re.search(r"this rank read (\d+) of (\d+) weight elements", line)
    assert m, line
    return int(m[1]), int(m[2])


def own_rows(root: Path, world: int, rank: int) -> int:
    """Elements of the file's tensors in `rank`'s dim-0 chunks: what reading only its shards reads."""
    n = 0
    for t in load_file(str(root / "transformer" / "diffusion_pytorch_model.safetensors")).values():
        start, stop = shard_rows(t.shape[0], world, rank)
        n += (stop - start) * (t[0].numel() if t.dim() else 1)
    return n


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_one_rank_built_by_shard_is_the_model_loaded_whole_then_sharded(flux_dir, overrides):
    old, old_line = build_sharded(flux_dir, overrides, by_shard=False)
    new, new_line = build_sharded(flux_dir, overrides, by_shard=True)
    assert "loaded whole" in old_line
    assert read_counts(new_line)[0] == own_rows(flux_dir, 1, 0)  # every file tensor once, nothing else (LoRA)
    for n, p in new.named_parameters():
        assert isinstance(p, DTensor) and p.device.type == "cpu" and p.dtype == dict(old.named_parameters())[n].dtype
    assert_identical(snapshot(old), snapshot(new))


def test_a_directory_of_several_safetensors_files_loads_by_shard_the_same(tmp_path):
    """diffusers writes large models as several files named by an index.json (FLUX.1-dev: 3)."""
    d = tmp_path / "sharded"
    comps = build_tiny_flux(TINY, seed=0)
    save_flux(comps, d)
    (d / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    comps.transformer.save_pretrained(d / "transformer", max_shard_size="100KB")
    assert len(list((d / "transformer").glob("*.safetensors"))) > 2
    overrides = CASES["lora-bf16"]
    old, _ = build_sharded(d, overrides, by_shard=False)
    new, line = build_sharded(d, overrides, by_shard=True)
    assert read_counts(line)[0] == sum(p.numel() for p in comps.transformer.parameters())
    assert_identical(snapshot(old), snapshot(new))


def test_shard_rows_is_torch_chunk():
    for rows in (1, 2, 5, 7, 64, 65):
        for world in (1, 2, 3, 8):
            got = [shard_rows(rows, world, r) for r in range(world)]
            chunks = [c for c in torch.arange(rows).chunk(world)]
            assert [(int(c[0]), int(c[-1]) + 1) for c in chunks] == got[: len(chunks)]
            assert all(a == b for a, b in got[len(chunks) :])  # ranks past the last chunk: empty shards


def test_a_run_from_a_directory_trains_like_the_same_model_built_whole(tmp_path, flux_dir, capsys):
    """The trainer end to end: fsdp from the saved directory (meta, by shard) and from model.source=tiny (the same
    random model built whole, then sharded): same losses, same checkpoint (weights, EMA, optimizer)."""
    tiny = [f"model.tiny.{k}={v}" for k, v in vars(TINY).items()]
    common = ["max_steps=2", "checkpoint_every=2", *BASE, "lora.enabled=true", "lora.rank=4", "lr=1e-2", *tiny]
    train(load_config(None, [f"output_dir={tmp_path / 'whole'}", *common]))
    assert "loaded whole on every rank" in capsys.readouterr().out
    res = train(load_config(None, [f"output_dir={tmp_path / 'by_shard'}", f"model.source={flux_dir}", *common]))
    assert "built on meta and loaded by shard" in capsys.readouterr().out
    assert all(isinstance(p, DTensor) for p in res.trainer.params)
    _assert_same_run(tmp_path / "whole", tmp_path / "by_shard", 2)


def test_weights_that_do_not_fit_the_config_are_one_user_error(tmp_path, flux_dir):
    import shutil

    from leapalign_fast.errors import UserError

    bad = tmp_path / "bad"
    shutil.copytree(flux_dir, bad)
    config = json.loads((bad / "transformer" / "config.json").read_text())
    (bad / "transformer" / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4}))
    with pytest.raises(
        UserError, match=r"transformer weight \S+ has shape \(24, 256\) in .*its config.json gives \(32, 256\)"
    ):
        build_sharded(bad, [], by_shard=True)


# ---- two processes ------------------------------------------------------------------------------------------


def _two_ranks(root: Path, out: Path, how: str, overrides: list[str], *flags: str) -> list[dict]:
    """Both ranks of tests/fsdp_load_worker.py building from `root` (`how`: whole | by_shard); their reports."""
    port, procs = _free_port(), []
    for r in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(r),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(r),
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1",
        }
        cmd = [
            sys.executable,
            str(ROOT / "tests" / "fsdp_load_worker.py"),
            str(root),
            str(out),
            how,
            *flags,
            *overrides,
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(f"{out}.rank{r}.err", "w"))
        )
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], Path(f"{out}.rank0.err").read_text()[-3000:] + Path(f"{out}.rank1.err").read_text()[-3000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [CASES["lora-bf16"], CASES["full-bf16"]], ids=["lora-bf16", "full-bf16"])
def test_two_ranks_built_by_shard_are_the_model_loaded_whole_then_sharded_and_each_reads_its_half(
    tmp_path, flux_dir, overrides
):
    _two_ranks(flux_dir, tmp_path / "whole", "whole", overrides)
    reports = _two_ranks(flux_dir, tmp_path / "by_shard", "by_shard", overrides)
    assert_identical(load_file(str(tmp_path / "whole.safetensors")), load_file(str(tmp_path / "by_shard.safetensors")))
    reads = [read_counts(r["line"])[0] for r in reports]
    assert reads == [own_rows(flux_dir, 2, 0), own_rows(flux_dir, 2, 1)]  # only its own rows; together the file
    whole = own_rows(flux_dir, 1, 0)
    assert sum(reads) == whole and max(reads) <= 0.55 * whole, (reads, whole)


@pytest.mark.slow
def test_two_ranks_loading_by_shard_peak_at_about_half_the_model_in_host_memory(tmp_path):
    """Peak growth of each of 2 ranks' resident memory while building, from a 271 MiB float32 model: loaded whole,
    above the whole model (diffusers maps the file: RssFile, then each block's shard is copied: RssAnon); by
    shard, about half of it (its shard, RssAnon; the rows are read, not mapped)."""
    big = TinyFluxConfig(layers=4, single_layers=8, heads=8, head_dim=64, text_dim=64)
    transformer = build_tiny_flux(big, seed=0).transformer
    model_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())
    root = tmp_path / "big"
    save_flux(FluxComponents(transformer, build_tiny_flux(TINY, seed=0).vae, None), root)
    del transformer
    growth = {
        how: [r["peak_growth"] for r in _two_ranks(root, tmp_path / how, how, [], "--no-snapshot")]
        for how in ("whole", "by_shard")
    }
    print(
        f"\nmodel {model_bytes / 2**20:.0f} MiB; peak growth per rank (MiB): "
        + "; ".join(
            f"{how} anon {[g['RssAnon'] >> 20 for g in v]} file {[g['RssFile'] >> 20 for g in v]}"
            for how, v in growth.items()
        )
    )
    resident = {how: [g["RssAnon"] + g["RssFile"] for g in v] for how, v in growth.items()}
    assert min(resident["whole"]) > 0.9 * model_bytes
    assert max(resident["by_shard"]) < 0.65 * model_bytes
