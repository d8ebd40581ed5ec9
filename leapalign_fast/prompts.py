"""Prompts: the built-in tiny prompt set, prompt files, the published prompt sets by name (`prompts = "hpdv2-train"`),
and the deterministic prompt order."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from leapalign_fast import hub
from leapalign_fast.errors import UserError
from leapalign_fast.io import write_json_atomic

_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "gray", "cyan", "brown"]
_SHAPES = ["square", "circle", "triangle", "star", "ring", "cross"]


def builtin_prompts() -> list[str]:
    """72 prompts 'a <colour> <shape>' for the tiny default (the `colour` reward reads the colour)."""
    return [f"a {c} {s}" for c in _COLOURS for s in _SHAPES]


def validation_prompts(cfg) -> list[list[str]]:
    """The prompt sets validation needs embedded (for build_run's prompt cache): [] when validation is off."""
    return [read_prompt_file(cfg.eval_prompt_file)] if cfg.eval_every else []


def read_prompt_file(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt_file {p} not found; give a text file with one prompt per line")
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of the first prompt
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"prompt_file {p} cannot be read as UTF-8 text ({e}); fix its encoding or permissions"
        ) from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"prompt_file {p} has no prompts; write one prompt per line")
    return prompts


HPDV2 = "zhwang/HPDv2"  # the HPD v2 dataset repository on the Hugging Face Hub (its authors' benchmark and test data)
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


@dataclass(frozen=True)
class PromptSetSpec:
    """A published prompt set: its files (style -> path in `repo`, a dataset repository on the Hub, or in a local
    folder given after the name: `hpdv2-test:/data/HPDv2`), how they are read, and the published count per style
    (None where none is published)."""

    repo: str | None  # None: not on the Hub; the file must be given (`geneval:/path/evaluation_metadata.jsonl`)
    files: dict[str, str]  # style ("" for none) -> file
    reader: str  # list (a JSON list of strings) | records (a JSON list of {"prompt": ...}) | jsonl ({"prompt": ...})
    expected: dict[str, int] | None
    about: str
    unique: bool = False  # keep each prompt once, in first-seen order (the training set repeats them per pair)


PROMPT_SETS = {
    "hpdv2-train": PromptSetSpec(HPDV2, {"": "train.json"}, "records", None, "HPD v2's training prompts", True),
    "hpdv2-test": PromptSetSpec(HPDV2, {"": "test.json"}, "records", {"": 400}, "HPD v2's test split"),
    "hpdv2-benchmark": PromptSetSpec(
        HPDV2,
        {s: f"benchmark/{s}.json" for s in HPS_STYLES},
        "list",
        {s: 800 for s in HPS_STYLES},
        "the HPS v2 benchmark: 4 styles",
    ),
    "geneval": PromptSetSpec(
        None, {"": "evaluation_metadata.jsonl"}, "jsonl", {"": 553}, "GenEval's prompts (github.com/djghosh13/geneval)"
    ),
}


@dataclass(frozen=True)
class PromptSet:
    """Prompts with their style ("" where the set has none), where they were read and a checksum of the list."""

    name: str
    prompts: list[str]
    styles: list[str]
    source: str  # hf://datasets/<repo>@<commit>/<file>[, ...], or local paths
    sha256: str  # of the prompts, one per line, UTF-8

    def record(self) -> str:
        """The TOML comment a run writes at the top of its config.toml."""
        return (
            f"# prompts: {self.name}, {len(self.prompts)} prompts, sha256 {self.sha256}\n"
            f"# prompts source: {self.source}\n"
        )


def prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def resolve_prompt_set(spec: str) -> PromptSet:
    """`prompts = "<name>"`, `"<name>:<local folder or file, or hf:// URL>"` (another copy of the set's files), or a
    local prompt file (one prompt per line)."""
    name, _, where = spec.partition(":") if not spec.startswith(("/", ".", "~", "hf://")) else ("", "", spec)
    if name not in PROMPT_SETS:
        if spec in PROMPT_SETS or Path(spec).is_file() or not name:
            path = hub.resolve_file(spec, "prompts") if spec.startswith("hf://") else Path(spec)
            prompts = read_prompt_file(path)
            return PromptSet(str(path), prompts, [""] * len(prompts), str(path), prompts_sha256(prompts))
        raise UserError(
            f"prompts '{spec}' is neither a prompt set ({', '.join(PROMPT_SETS)}) nor a prompt file; name one of "
            "them, or give a text file with one prompt per line"
        )
    set_spec = PROMPT_SETS[name]
    located = {style: _prompt_set_file(name, set_spec, file, where) for style, file in set_spec.files.items()}
    source = ", ".join(src for _, src in located.values())
    # A set read from the Hub (files at a commit) is kept extracted beside the cache, with its checksum: the other
    # processes of a launch, and later runs, read that list instead of parsing the dataset's files again.
    extracted = (
        hub.cache_dir() / ".leapalign-fast" / "prompt_sets" / f"{name}-{_digest(source)}.json" if not where else None
    )
    if extracted is not None and extracted.is_file():
        try:
            kept = json.loads(extracted.read_text(encoding="utf-8"))
            if prompts_sha256(kept["prompts"]) == kept["sha256"] and len(kept["styles"]) == len(kept["prompts"]):
                for style, (path, _) in located.items():
                    _check_count(name, set_spec, style, kept["styles"].count(style), path)
                return PromptSet(name, kept["prompts"], kept["styles"], source, kept["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or damaged: extracted again below, and rewritten
    prompts, styles = [], []
    for style, (path, _) in located.items():
        found = _read_set_file(path, set_spec.reader, name)
        _check_count(name, set_spec, style, len(found), path)
        prompts += [p for p, _ in found]
        styles += [tag or style for _, tag in found]
    if set_spec.unique:
        prompts = list(dict.fromkeys(prompts))
        styles = [""] * len(prompts)
    result = PromptSet(name, prompts, styles, source, prompts_sha256(prompts))
    if extracted is not None and os.access(extracted.parent.parent.parent, os.W_OK):  # a read-only cache: not kept
        write_json_atomic(extracted, {"prompts": prompts, "styles": styles, "sha256": result.sha256, "source": source})
    return result


def _check_count(name: str, spec: PromptSetSpec, style: str, count: int, path: Path) -> None:
    """One line on stderr when a file holds another number of prompts than its authors publish (the run goes on)."""
    if spec.expected is not None and count != spec.expected[style]:
        print(
            f"leapalign-fast: prompt set {name}{' ' + style if style else ''} has {count} prompts where "
            f"{spec.expected[style]} are published; check {path} (a changed or truncated file?)",
            file=sys.stderr,
            flush=True,
        )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _prompt_set_file(name: str, spec: PromptSetSpec, file: str, where: str) -> tuple[Path, str]:
    """(local path, where it came from) of one of a set's files: from `where` (a folder holding the set's files,
    the file itself for a one-file set, or a hf:// URL of either), else from the set's Hub dataset."""
    if where.startswith("hf://"):
        url = where.rstrip("/")
        if len(spec.files) > 1 or not url.endswith(file.rsplit("/", 1)[-1]):
            url = f"{url}/{file}"
        path = hub.resolve_file(url, f"prompts {name}")
        return path, url
    if where:
        base = Path(where)
        path = base if base.is_file() and len(spec.files) == 1 else base / file
        if not path.is_file():
            raise UserError(f"prompts {name}: {path} not found; give the folder holding {file} (or the file)")
        return path, str(path)
    if spec.repo is None:
        raise UserError(
            f"prompts {name}: {spec.about} are not on the Hugging Face Hub; download {file} and give its path as "
            f'prompts = "{name}:/path/to/{file}"'
        )
    ref = hub.parse(f"hf://datasets/{spec.repo}/{file}")
    folder = hub.resolve(f"hf://datasets/{spec.repo}", None, [file], f"prompts {name}", "dataset")
    path = folder / file
    if not path.is_file():
        raise UserError(f"prompts {name}: {ref.repo_id} has no {file} (in {folder}); check the dataset's layout")
    return path, f"hf://datasets/{spec.repo}@{folder.name}/{file}"


def _read_set_file(path: Path, reader: str, name: str) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
        rows = (
            [json.loads(line) for line in text.splitlines() if line.strip()] if reader == "jsonl" else json.loads(text)
        )
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"prompts {name}: {path} cannot be read as JSON ({e}); download it again") from None
    try:  # (prompt, its tag: GenEval's category, else "")
        found = [
            (str(r).strip(), "") if reader == "list" else (str(r["prompt"]).strip(), str(r.get("tag", "")))
            for r in rows
        ]
    except (TypeError, KeyError, AttributeError) as e:
        raise UserError(f"prompts {name}: {path} is not laid out as the published file ({e!r} missing)") from None
    if not found or not all(p for p, _ in found):
        raise UserError(f"prompts {name}: {path} holds {'an empty prompt' if found else 'no prompts'}")
    return found


class PromptOrder:
    """An endless stream of prompt indices: a fresh seeded permutation each epoch.

    Its whole state is `consumed` (indices handed out so far), so a checkpoint stores one integer and
    resume continues the exact same order.
    """

    def __init__(self, num_prompts: int, seed: int, consumed: int = 0):
        self.n, self.seed, self.consumed = num_prompts, seed, consumed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm

    def take(self, count: int) -> list[int]:
        out = []
        for pos in range(self.consumed, self.consumed + count):
            out.append(self._permutation(pos // self.n)[pos % self.n])
        self.consumed += count
        return out
