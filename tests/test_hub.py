"""Hub ids (`model.source = "org/name"`) from a Hugging Face cache laid out exactly as huggingface_hub lays it out
(tests/hub_cache.py), under HF_HUB_OFFLINE=1: a run trains from the cache reading only the parts it needs; a wrong
revision, a missing repository, a missing file, a gated repository and the disk and network failures each end in
one line. The gated and wrong-revision answers come from a local HTTP server standing in for the Hub (every request
answered with the Hub's error headers), so huggingface_hub's own code raises the exceptions that are mapped."""

from __future__ import annotations

import errno
import http.server
import sys
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from leapalign_fast import hub
from leapalign_fast.cli import main
from leapalign_fast.config import load_config
from leapalign_fast.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from hub_cache import add_folder  # noqa: E402

REPO = "tiny-org/tiny-flux"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache in use for this test (HF_HUB_CACHE), offline; memoised resolutions forgotten."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_RESOLVED", {})
    (tmp_path / "hub").mkdir()
    return tmp_path / "hub"


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from leapalign_fast.models.flux import TinyFluxConfig, build_tiny_flux, save_flux

    d = tmp_path_factory.mktemp("flux") / "flux"
    save_flux(build_tiny_flux(TinyFluxConfig(), seed=0), d)
    return d


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


OPENED: list[str] | None = None


def _audit(event, args):
    if event == "open" and OPENED is not None and isinstance(args[0], (str, bytes, Path)):
        OPENED.append(str(args[0]))


sys.addaudithook(_audit)  # records only while a test sets OPENED to a list


def test_a_hub_id_trains_from_the_cache_and_reads_only_the_parts_it_needs(cache, flux_dir, tmp_path, capsys):
    """encode-prompts reads the text encoders; the training run after it (prompts cached) opens nothing of them."""
    global OPENED
    snapshot = add_folder(cache, REPO, flux_dir)
    args = [f"model.source={REPO}", "max_steps=1", f"output_dir={tmp_path / 'run'}", "report_to=none"]
    OPENED = []
    try:
        assert main(["encode-prompts", *args]) == 0
        assert any("text_encoder_2/config.json" in p for p in OPENED)  # the hook sees the loaders' reads
        OPENED = []
        assert main(["train", *args]) == 0
        opened = [p for p in OPENED if str(snapshot) in p]
    finally:
        OPENED = None
    assert any(p.endswith("transformer/config.json") for p in opened), opened
    assert any(p.endswith("vae/config.json") for p in opened), opened
    assert not [p for p in opened if "text_encoder" in p or "tokenizer" in p]
    saved = load_config(tmp_path / "run" / "config.toml")
    assert saved.model.source == REPO  # the run records the id, not the cache folder


def test_only_the_denoiser_files_of_flux1_dev_are_fetched_when_prompts_are_cached():
    """The patterns a training run passes to snapshot_download, applied by huggingface_hub's own filter to
    black-forest-labs/FLUX.1-dev's file names (as published; not listed from the Hub here)."""
    from huggingface_hub.utils import filter_repo_objects

    files = " ".join(
        [
            "README.md LICENSE.md dev_grid.jpg flux1-dev.safetensors ae.safetensors model_index.json",
            "scheduler/scheduler_config.json text_encoder/config.json text_encoder/model.safetensors",
            "text_encoder_2/config.json text_encoder_2/model-00001-of-00002.safetensors",
            "text_encoder_2/model.safetensors.index.json tokenizer/vocab.json tokenizer_2/spiece.model",
            "transformer/config.json transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ]
    ).split()
    train = set(filter_repo_objects(files, allow_patterns=hub.model_patterns(need_text=False)))
    assert train == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    }
    encode = set(filter_repo_objects(files, allow_patterns=hub.model_patterns(need_text=True)))
    assert encode - train == {f for f in files if f.startswith(("text_encoder", "tokenizer"))}


@pytest.mark.parametrize("tree", [True, False], ids=["with-file-listing", "without"])
def test_offline_a_wrong_revision_a_missing_repository_and_a_missing_file_are_one_line_each(
    cache, flux_dir, tmp_path, capsys, tree
):
    """A missing file: found by huggingface_hub against the commit's cached file listing, or (a cache without one)
    by the model loader; one line either way."""
    snapshot = add_folder(cache, REPO, flux_dir, tree=tree)
    base = ["train", "max_steps=1", f"output_dir={tmp_path / 'run'}"]
    code, err = run_cli(capsys, *base, f"model.source={REPO}", "model.revision=v9")
    assert code == 2 and len(err.splitlines()) == 1
    assert "revision 'v9'" in err and "HF_HUB_OFFLINE=1" in err and "--revision v9" in err
    code, err = run_cli(capsys, *base, "model.source=tiny-org/nowhere")
    assert code == 2 and len(err.splitlines()) == 1 and "hf download tiny-org/nowhere" in err
    (snapshot / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    code, err = run_cli(capsys, *base, f"model.source={REPO}")
    assert code == 2 and len(err.splitlines()) == 1
    assert "transformer/diffusion_pytorch_model.safetensors" in err and REPO in err and "HF_HUB_OFFLINE=1" in err


class _HubStandIn(http.server.BaseHTTPRequestHandler):
    """Answers every request as the Hub answers a refused one: status and X-Error-Code from the server's `answer`."""

    def do_GET(self):
        status, code = self.server.answer
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", f"{code} (stand-in)")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_server(cache, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubStandIn)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache / "no-token"))
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "answer, expected",
    [
        ((403, "GatedRepo"), ["is gated", "no Hugging Face token is set", "hf auth login", "huggingface.co/org/gated"]),
        ((404, "RevisionNotFound"), ["revision 'v9' does not exist", "model.revision"]),
        ((404, "RepoNotFound"), ["no such repository", "check the id"]),
    ],
)
def test_the_hubs_refusals_are_one_line_each(hub_server, answer, expected):
    hub_server.answer = answer
    with pytest.raises(UserError) as e:
        hub.resolve("org/gated", "v9" if "Revision" in answer[1] else None, hub.model_patterns(False))
    message = str(e.value)
    assert "\n" not in message and message.startswith("model.source org/gated")
    for part in expected:
        assert part in message, message
    assert hub.status("org/gated").state == ("not-found" if answer[0] == 404 else "gated")


def test_a_full_disk_and_an_interrupted_download_are_one_line_each():
    import httpx2

    ref = hub.parse("org/name")
    full = hub.hub_error(OSError(errno.ENOSPC, "No space left on device"), ref, "model.source")
    assert isinstance(full, UserError) and "disk is full" in str(full) and "HF_HOME" in str(full)
    cut = hub.hub_error(httpx2.RemoteProtocolError("peer closed connection"), ref, "model.source")
    assert isinstance(cut, UserError) and "interrupted" in str(cut) and "rerun" in str(cut)
    bug = ValueError("a bug")
    assert hub.hub_error(bug, ref, "model.source") is bug  # anything unknown keeps its traceback


def test_status_says_present_or_missing_without_downloading(cache, flux_dir):
    assert hub.status(REPO).state == "missing"
    snapshot = add_folder(cache, REPO, flux_dir)
    from huggingface_hub import scan_cache_dir

    (repo,) = scan_cache_dir(cache).repos  # huggingface_hub reads the layout as its own: one repo, one revision
    assert (repo.repo_id, set(repo.refs), repo.nb_files) == (REPO, {"main"}, len(list(flux_dir.rglob("*.*"))))
    found = hub.status(REPO, allow_patterns=hub.model_patterns(False))
    assert (found.state, found.path) == ("present", snapshot)
    assert hub.status(str(snapshot)).state == "local"
    assert hub.status("/nowhere/at/all").state == "missing"


def test_one_process_downloads_while_the_others_wait(cache, monkeypatch):
    """Four callers at once: the downloads (a stand-in for the network, 0.2 s each) never overlap."""
    import huggingface_hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online: the lock is taken (offline nothing downloads)
    active, overlaps = [], []

    def download(repo_id, **kw):
        active.append(1)
        overlaps.append(len(active))
        time.sleep(0.2)
        active.pop()
        return str(cache / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    threads = [threading.Thread(target=hub.resolve, args=(REPO, f"r{i}")) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1, 1, 1]


def test_hub_ids_in_a_config_file_stay_ids_and_local_paths_keep_working(tmp_path):
    (tmp_path / "models" / "flux").mkdir(parents=True)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nsource = "black-forest-labs/FLUX.1-dev"\nrevision = "main"\n')
    assert load_config(cfg).model.source == "black-forest-labs/FLUX.1-dev"
    cfg.write_text('[model]\nsource = "models/flux"\n')  # exists beside the file: a local path
    assert load_config(cfg).model.source == str(tmp_path / "models" / "flux")
    assert hub.parse("hf://datasets/zhwang/HPDv2@main/benchmark/anime.json") == hub.HubRef(
        "zhwang/HPDv2", "dataset", "main", "benchmark/anime.json"
    )
    assert hub.parse("/abs/path") is None and hub.parse("./rel") is None and hub.parse("tiny") is None
