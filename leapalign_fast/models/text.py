"""FLUX's text side: CLIP (pooled) + T5 (sequence) encoders and tokenizers, and the prompt-embedding cache.

Real transformers classes only. Tiny tokenizers are built offline from an in-memory vocabulary
(no hub): a CLIP byte-level BPE and a T5 unigram over the words of the tiny prompt language, and the Qwen2
byte-level BPE the tiny FLUX.2-Klein and Qwen-Image encoders share.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from leapalign_fast.errors import UserError
from leapalign_fast.io import digests, new_staging_dir, save_tensors_atomic, swap_in, write_json_atomic

# Words the tiny tokenizers know as whole tokens; anything else falls back to characters.
TINY_WORDS = (
    "a an the of and with on in to at left right above below top bottom next one two three four five six "
    "red green blue yellow orange purple pink white black gray grey brown cyan magenta "
    "square circle triangle cross star ring ball cube box photo image picture painting small big large"
).split()
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()"


@dataclass
class TextStack:
    clip_tokenizer: CLIPTokenizer
    clip: CLIPTextModel
    t5_tokenizer: T5Tokenizer
    t5: T5EncoderModel
    max_sequence_length: int


@dataclass
class PromptEmbeds:
    """Per-prompt conditioning: T5 sequence (P, S, D) and CLIP pooled (P, Dp), in the encoders' dtype."""

    prompts: list[str]
    t5: torch.Tensor
    pooled: torch.Tensor
    lengths: torch.Tensor | None = None  # (P,) int32 T5 tokens before padding (incl. </s>)

    def select(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(idx, dtype=torch.long)
        return self.t5.index_select(0, index), self.pooled.index_select(0, index)

    def tensors(self, idx: list[int], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """As `PromptCache.tensors`: the named rows `idx`."""
        index = torch.as_tensor(idx, dtype=torch.long)
        return {name: getattr(self, name).index_select(0, index) for name in names}


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tiny_clip_tokenizer(words=TINY_WORDS) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges spell out each word of `words` (byte fallback for the rest)."""
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            merge = (cur, nxt)
            if merge not in merges:
                merges.append(merge)
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_t5_tokenizer(words=TINY_WORDS) -> T5Tokenizer:
    """A T5 unigram tokenizer: specials at T5's ids (pad 0, eos 1, unk 2), whole words, then characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in words]
    pieces += [(c, -5.0) for c in _CHARS] + [("▁" + c, -4.0) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


# The chat template of the tiny Qwen tokenizer (the real ones ship their own).
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen_tokenizer():
    """A Qwen2 byte-level BPE over the tiny prompt words, with the chat specials and a chat template (the tiny
    FLUX.2-Klein and Qwen-Image encoders' tokenizer)."""
    from transformers import Qwen2Tokenizer

    vocab: dict[str, int] = {}
    for tok in _bytes_to_unicode().values():
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    # Whole-word tokens: the tiny prompt words and those of the chat / Qwen-Image templates after a space ("Ġ"),
    # the template's line-initial words bare (so its system prefix is 34 tokens, as with the real tokenizer).
    spaced = (
        list(TINY_WORDS)
        + "by detailing color shape size texture quantity text spatial relationships objects background".split()
    )
    for word in [("Ġ" + w) for w in spaced] + ["system", "user", "assistant", "Describe"]:
        cur = word[0]
        for nxt in word[1:]:
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab.setdefault(special, len(vocab))
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def build_tiny_text_stack(hidden: int, max_sequence_length: int, seed: int) -> TextStack:
    """Random-init CLIP and T5 encoders of the real classes, sized `hidden`, with the tiny tokenizers."""
    clip_tok, t5_tok = build_tiny_clip_tokenizer(), build_tiny_t5_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=hidden,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=hidden,
            d_kv=hidden // 4,
            d_ff=2 * hidden,
            num_layers=1,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
        )
    )
    return TextStack(clip_tok, clip.eval(), t5_tok, t5.eval(), max_sequence_length)


@torch.no_grad()
def encode_prompts(text: TextStack, prompts: list[str], batch_size: int = 32) -> PromptEmbeds:
    """Encode prompts as FluxPipeline does: T5 last hidden state (padded to max length, no attention mask: FLUX
    reads the padding's states too), CLIP pooler output. On the encoders' device; results on CPU in their dtype
    (FluxPipeline casts to it as well, so a bf16 T5 loses nothing)."""
    t5_out, pooled_out, lengths = [], [], []
    device = next(text.t5.parameters()).device
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        tok = text.t5_tokenizer(
            chunk, padding="max_length", max_length=text.max_sequence_length, truncation=True, return_tensors="pt"
        )
        lengths.append(tok.attention_mask.sum(1).to(torch.int32))
        t5_out.append(text.t5(tok.input_ids.to(device), output_hidden_states=False)[0].cpu())
        ids_clip = text.clip_tokenizer(
            chunk,
            padding="max_length",
            max_length=text.clip_tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled_out.append(text.clip(ids_clip.to(device), output_hidden_states=False).pooler_output.cpu())
    return PromptEmbeds(list(prompts), torch.cat(t5_out), torch.cat(pooled_out), torch.cat(lengths))


def prompt_cache_key(model_id: str, prompts: list[str], max_sequence_length: int) -> str:
    h = hashlib.sha256(json.dumps([model_id, max_sequence_length, prompts]).encode()).hexdigest()
    return h[:16]


def save_prompt_embeds(embeds: PromptEmbeds, path: Path) -> None:
    save_tensors_atomic(
        {"t5": embeds.t5.contiguous(), "pooled": embeds.pooled.contiguous()},
        path,
        metadata={"prompts": json.dumps(embeds.prompts)},
    )


def load_prompt_embeds(path: Path) -> PromptEmbeds:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
    tensors = load_file(str(path))
    return PromptEmbeds(prompts, tensors["t5"], tensors["pooled"])


# Prompts per cache file: 2 GiB of bf16 T5 states at FLUX.1-dev's 512 x 4096, the most a writer holds in memory.
CACHE_CHUNK = 512


def write_prompt_cache(encode, prompts: list[str], index: Path, chunk: int = CACHE_CHUNK) -> None:
    """Encode `prompts` into chunk files and `index` (a JSON list of the prompts, the files and each file's sha256),
    built in a new staging folder beside `index`'s folder and renamed into place (replacing a damaged or stale
    cache there), so the folder is complete whenever it exists. `encode(prompts)` gives the named (P, ...) tensors
    to store (a backbone's `encode_prompts`); a FLUX `TextStack` stands for FLUX's. A failure (a full disk: an
    OSError) removes the staging folder."""
    meta = {}
    if isinstance(encode, TextStack):
        text, meta = encode, {"max_sequence_length": encode.max_sequence_length}

        def encode(p):
            e = encode_prompts(text, p)
            return {"t5": e.t5, "pooled": e.pooled, "t5_lengths": e.lengths}

    root = Path(index).parent
    staged = new_staging_dir(root)
    try:
        files = []
        for n, start in enumerate(range(0, len(prompts), chunk)):
            tensors = {k: v.contiguous() for k, v in encode(prompts[start : start + chunk]).items()}
            files.append(f"chunk_{n:05d}.safetensors")
            save_tensors_atomic(tensors, staged / files[-1])
        sums = digests([staged / f for f in files])
        bad = next((e for e in sums if isinstance(e, OSError)), None)
        if bad is not None:
            raise bad
        index_meta = {"prompts": list(prompts), "chunk": chunk, "files": files, "sha256": dict(zip(files, sums))}
        write_json_atomic(staged / Path(index).name, {**index_meta, **meta})  # last
        swap_in(staged, root)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    for f, digest in zip(files, sums):
        _remember(root / f, digest)


_CHUNK_NAME = re.compile(r"^chunk_\d{5}\.safetensors$")
# Chunk files verified by this process: path -> (inode, size, mtime, sha256). Each file is hashed once per process
# (a large cache is hundreds of GB), not once per open.
_VERIFIED: dict[str, tuple[int, int, int, str]] = {}


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _remember(path: Path, digest: str) -> None:
    try:
        _VERIFIED[str(path)] = (*_stamp(path), digest)
    except OSError:
        pass


def _known(path: Path, digest: str) -> bool:
    try:
        return _VERIFIED.get(str(path)) == (*_stamp(path), digest)
    except OSError:
        return False


def check_prompt_cache(index: Path, prompts: list[str] | None = None) -> str | None:
    """None when the cache of `index` is complete and every chunk file matches its sha256 (hashed once per process,
    the whole file: a flipped byte in a row no batch draws is found too); else what is wrong, in a few words: a
    missing, unreadable or incomplete index, one written before checksums, another prompt set than `prompts`, a
    missing or changed chunk."""
    index = Path(index)
    try:
        meta = json.loads(index.read_text())
    except FileNotFoundError:
        return f"{index.name} is missing"
    except (OSError, ValueError) as e:
        return f"{index.name} is unreadable ({type(e).__name__})"
    if isinstance(meta, dict) and "files" in meta and "sha256" not in meta:
        return "it was written before the cache had checksums"
    try:
        listed, chunk, files, sums = meta["prompts"], meta["chunk"], meta["files"], meta["sha256"]
        assert isinstance(listed, list) and isinstance(chunk, int) and chunk > 0 and isinstance(sums, dict)
        assert isinstance(files, list) and len(files) == math.ceil(len(listed) / chunk)
        assert all(isinstance(f, str) and _CHUNK_NAME.match(f) and isinstance(sums.get(f), str) for f in files)
    except (TypeError, KeyError, AssertionError):
        return f"{index.name} is incomplete"
    if prompts is not None and listed != list(prompts):
        return "it holds another prompt set"
    root = index.parent
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        return f"{missing[0]} is missing"
    todo = [f for f in files if not _known(root / f, sums[f])]
    for f, got in zip(todo, digests([root / f for f in todo])):
        if isinstance(got, OSError):
            return f"{f} cannot be read ({got.strerror})"
        if got != sums[f]:
            return f"{f} does not match its checksum"
        _remember(root / f, got)
    return None


class PromptCache:
    """Prompt embeddings read per batch from the chunk files of `write_prompt_cache` (memory-mapped
    safetensors): a rank holds only the rows it asks for, never the whole cache. Opened, it is verified
    (`check_prompt_cache`) unless `verify=False` (its caller has just verified or written it)."""

    def __init__(self, index: Path, prompts: list[str] | None = None, verify: bool = True):
        self.root = Path(index).parent
        problem = check_prompt_cache(index, prompts) if verify else None
        try:
            if problem is not None:
                raise ValueError(problem)
            meta = json.loads(Path(index).read_text())
            self.prompts: list[str] = meta["prompts"]
            self.chunk, self.files = meta["chunk"], meta["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"prompt cache {self.root} is damaged ({e}); delete that folder and rerun: the prompts are encoded "
                "again"
            ) from None
        self._open: dict[int, object] = {}

    def _rows(self, name: str, idx: list[int]) -> torch.Tensor:
        rows = []
        for i in idx:
            n, r = divmod(i, self.chunk)
            try:
                if n not in self._open:
                    from safetensors import safe_open

                    self._open[n] = safe_open(str(self.root / self.files[n]), framework="pt")
                rows.append(self._open[n].get_slice(name)[r : r + 1])
            except Exception as e:  # noqa: BLE001 - the file changed under the run: safetensors' own error, ...
                raise UserError(
                    f"prompt cache {self.root} cannot be read ({type(e).__name__}: {str(e)[:120]}); delete that "
                    "folder and rerun with resume=true: the prompts are encoded again"
                ) from None
        return torch.cat(rows)

    def tensors(self, idx: list[int], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The named tensors (a backbone's `conditioning`) of prompts `idx`, on CPU in the stored dtype."""
        return {name: self._rows(name, idx) for name in names}

    def select(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 (b, S, D), pooled (b, Dp)) of prompts `idx` of a FLUX cache, on CPU in the stored dtype."""
        return self._rows("t5", idx), self._rows("pooled", idx)

    def lengths(self, idx: list[int]) -> torch.Tensor:
        return self._rows("t5_lengths", idx)
