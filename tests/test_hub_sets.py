"""Every reward by name and the published prompt sets from a Hugging Face cache laid out as huggingface_hub lays it
out (tests/hub_cache.py), offline: tiny weights of the real architectures under the published repository ids and
files, and prompt-set files with the published structure and counts (made here: the real files were never
downloaded on this machine). A run with `reward.name = "hpsv2.1"` and `prompts = "hpdv2-train"` and no other
option trains and records the set in config.toml; `eval --benchmark` writes its per-style table, the same digits
twice."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from leapalign_fast import hub
from leapalign_fast.cli import main
from leapalign_fast.errors import UserError
from leapalign_fast.prompts import HPS_STYLES, resolve_prompt_set

sys.path.insert(0, str(Path(__file__).parent))
from hub_cache import add_folder, add_repo  # noqa: E402
from test_rewards import _blip_checkpoint, _to_open_clip, make_tiny_clip  # noqa: E402

DEFAULTS = str(Path(__file__).resolve().parent.parent / "configs" / "defaults.toml")
TEST_PROMPTS = [f"a red square number {i}" for i in range(400)]  # HPD v2's test split: 400 prompts
STYLE_PROMPTS = {s: [f"a {s} picture of a blue circle {i}" for i in range(800)] for s in HPS_STYLES}
TRAIN_PROMPTS = ["a green star", "a red square", "a green star", "a blue ball"]  # pairs repeat their prompt


@pytest.fixture(scope="module")
def _clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def weights(_clip_dir, tmp_path_factory):
    """The files of each published repository, made from tiny random models (test_rewards' builders)."""
    from transformers import CLIPModel

    d = tmp_path_factory.mktemp("weights")
    hps = CLIPModel.from_pretrained(_clip_dir)
    with torch.no_grad():
        for p in hps.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=None))
    torch.save({"state_dict": _to_open_clip(hps.state_dict())}, d / "HPS_v2.1_compressed.pt")
    dims, state = [16, 1024, 128, 64, 16, 1], {}
    for i, (a, b) in zip([0, 2, 4, 6, 7], zip(dims, dims[1:])):
        state[f"layers.{i}.weight"], state[f"layers.{i}.bias"] = torch.randn(b, a) * 0.1, torch.randn(b) * 0.1
    torch.save(state, d / "aesthetic-model.pth")
    _blip_checkpoint(d)  # d/ImageReward.pt and d/bert/vocab.txt
    return d


@pytest.fixture
def cache(tmp_path, monkeypatch, _clip_dir, weights):
    """An offline cache holding every reward's published repository and the HPD v2 dataset's prompt files."""
    root = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_RESOLVED", {})
    add_folder(root, "openai/clip-vit-large-patch14", _clip_dir)
    add_folder(root, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", _clip_dir)
    add_repo(  # PickScore_v1 holds no tokenizer: its authors score with CLIP-H's
        root, "yuvalkirstain/PickScore_v1", {n: _clip_dir / n for n in ("config.json", "model.safetensors")}
    )
    add_repo(root, "xswu/HPSv2", {"HPS_v2.1_compressed.pt": weights / "HPS_v2.1_compressed.pt"})
    add_repo(root, "trl-lib/ddpo-aesthetic-predictor", {"aesthetic-model.pth": weights / "aesthetic-model.pth"})
    add_repo(root, "THUDM/ImageReward", {"ImageReward.pt": weights / "ImageReward.pt"})
    add_repo(root, "google-bert/bert-base-uncased", {"vocab.txt": weights / "bert" / "vocab.txt"})
    test = [{"prompt": p, "image_path": [f"{i}_0.jpg"], "rank": [1]} for i, p in enumerate(TEST_PROMPTS)]
    files = {
        "test.json": json.dumps(test).encode(),
        "train.json": json.dumps([{"prompt": p, "human_preference": [1, 0]} for p in TRAIN_PROMPTS]).encode(),
        **{f"benchmark/{s}.json": json.dumps(ps).encode() for s, ps in STYLE_PROMPTS.items()},
    }
    add_repo(root, "zhwang/HPDv2", files, repo_type="dataset")
    return root


def _sha256(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def test_prompt_sets_by_name_count_and_checksum(cache, tmp_path, capsys):
    test = resolve_prompt_set("hpdv2-test")
    assert (len(test.prompts), test.sha256) == (400, _sha256(TEST_PROMPTS))
    assert test.source.startswith("hf://datasets/zhwang/HPDv2@") and test.source.endswith("/test.json")
    (kept,) = (cache / ".leapalign-fast" / "prompt_sets").glob("hpdv2-test-*.json")  # the extracted list, kept
    assert json.loads(kept.read_text())["sha256"] == test.sha256
    kept.write_text("{ damaged")
    assert resolve_prompt_set("hpdv2-test").sha256 == test.sha256  # extracted again from the dataset's file
    assert json.loads(kept.read_text())["prompts"] == TEST_PROMPTS  # and kept again
    bench = resolve_prompt_set("hpdv2-benchmark")
    assert len(bench.prompts) == 3200 and [bench.styles.count(s) for s in HPS_STYLES] == [800] * 4
    assert bench.sha256 == _sha256([p for s in HPS_STYLES for p in STYLE_PROMPTS[s]])
    assert resolve_prompt_set("hpdv2-train").prompts == ["a green star", "a red square", "a blue ball"]
    assert capsys.readouterr().err == ""  # the published counts: nothing to say
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "test.json").write_text(json.dumps([{"prompt": p} for p in TEST_PROMPTS[:399]]))
    short = resolve_prompt_set(f"hpdv2-test:{tmp_path / 'copy'}")  # a local copy, one prompt short
    assert len(short.prompts) == 399 and "has 399 prompts where 400 are published" in capsys.readouterr().err
    with pytest.raises(UserError, match="not on the Hugging Face Hub.*geneval:/path/to/evaluation_metadata.jsonl"):
        resolve_prompt_set("geneval")
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text('{"tag": "single_object", "prompt": "a photo of a cat"}\n{"tag": "colors", "prompt": "a red x"}\n')
    gen = resolve_prompt_set(f"geneval:{meta}")
    assert gen.prompts == ["a photo of a cat", "a red x"] and gen.styles == ["single_object", "colors"]
    with pytest.raises(UserError, match="neither a prompt set"):
        resolve_prompt_set("hpdv3-test")


def test_rewards_and_prompts_by_name_train_and_benchmark_from_the_cache(cache, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--config", DEFAULTS, f"output_dir={out}", "batch_size=2", "num_steps=2", "report_to=none"]
    assert main(["train", *base, "reward.name=hpsv2.1", "prompts=hpdv2-train", "max_steps=1"]) == 0
    header = (out / "config.toml").read_text().splitlines()[:2]
    assert (
        header[0]
        == f"# prompts: hpdv2-train, 3 prompts, sha256 {_sha256(['a green star', 'a red square', 'a blue ball'])}"
    )
    assert header[1].startswith("# prompts source: hf://datasets/zhwang/HPDv2@") and header[1].endswith("/train.json")
    capsys.readouterr()
    tables = []
    for _ in range(2):  # same images, same seeds: the same digits
        args = ["eval", *base, "--checkpoint", "latest", "--benchmark", "hpsv2", "--limit", "1", "--steps", "2"]
        assert main(args) == 0
        tables.append(json.loads((out / "eval" / "step_00000001_hpsv2" / "benchmark.json").read_text()))
    printed = capsys.readouterr().out
    assert tables[0]["rows"] == tables[1]["rows"] and tables[0]["per_prompt"] == tables[1]["per_prompt"]
    rows = tables[0]["rows"]
    assert tables[0]["styles"] == [*HPS_STYLES, "mean"] and sorted(rows) == sorted(tables[0]["styles"])
    assert set(rows["anime"]) == set(hub_metrics())
    assert all(rows[s][m]["n"] == 1 for s in HPS_STYLES for m in hub_metrics())
    for m in hub_metrics():  # the mean row is the mean of the styles (HPS v2's "Averaged")
        assert rows["mean"][m]["mean"] == pytest.approx(sum(rows[s][m]["mean"] for s in HPS_STYLES) / 4)
    md = (out / "eval" / "step_00000001_hpsv2" / "benchmark.md").read_text()
    assert md.startswith("| style | HPSv2.1 | PickScore | ImageReward | CLIP | Aesthetic |") and "| photo |" in md
    assert "4 of 3200 prompts (--limit 1 per style: a smoke run)" in md and md.splitlines()[0] in printed
    assert main(["eval", *base, "--checkpoint", "base", "--benchmark", "hpdv2", "--limit", "2", "--steps", "2"]) == 0
    one = json.loads((out / "eval" / "base_hpdv2" / "benchmark.json").read_text())
    assert list(one["rows"]) == ["all"] and one["prompt_set"]["count"] == 400 and one["prompts_scored"] == 2


def hub_metrics() -> list[str]:
    from leapalign_fast.evaluate import BENCHMARK_REWARDS

    return BENCHMARK_REWARDS
