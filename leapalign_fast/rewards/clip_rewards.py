"""CLIP-family rewards on transformers' CLIPModel, loaded from local paths or Hub ids (by default the published
repositories below, through the Hub cache), preprocessed in torch.

- `clip`:      CLIP score, cosine of image and text embeddings, any local CLIP checkpoint (HF format).
- `pickscore`: PickScore_v1 (a CLIP-H), `logit_scale.exp() * cos`, as its authors score.
- `hpsv2.1`:   HPS v2.1: open_clip ViT-H-14 fine-tuned; its open_clip-format checkpoint is mapped key by key
               onto the HF CLIP-H architecture; score = cosine, as the HPSv2 package computes it.
- `aesthetic`: the LAION aesthetic predictor: an MLP on L2-normalised CLIP ViT-L/14 image embeddings.

Images (B, 3, H, W) in [0, 1] are preprocessed as each reward's official code does, in torch, so gradients reach
the pixels: shortest side resized (bicubic, antialiased) then centre-cropped, the crop offset floored as
transformers' processors do (CLIP, PickScore) or rounded as torchvision's CenterCrop does (ImageReward, LAION
aesthetic); HPS v2.1 instead resizes the longest side and pads with black (open_clip's ResizeMaxSize).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from leapalign_fast import hub
from leapalign_fast.dtypes import DTYPES
from leapalign_fast.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD, crop: str = "floor") -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, size, size) normalised: shortest side to `size`, centre crop.
    crop="floor": offset (n - size) // 2, as transformers' CLIP processors; "round": int(round((n - size) / 2)),
    as torchvision's CenterCrop (Python's round: half to even). They differ by one pixel on some aspect ratios."""
    h, w = images.shape[-2:]
    # The long side as the reference processors compute it: int(size * long / short), truncated.
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = F.interpolate(images.float(), size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    if crop == "round":
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    else:
        top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    return _normalise(x, mean, std)


def resize_max_preprocess(images: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, size, size) as open_clip's ResizeMaxSize (HPSv2's inference transform):
    longest side to `size` (the other `round(n * scale)`), then zero (black) padding, split floor-first."""
    h, w = images.shape[-2:]
    x = images.float()
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    if scale != 1.0:
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    # open_clip pads only when it resized; a long side already at `size` would reach the ViT non-square there
    # (an error), so it is padded here too.
    pad_h, pad_w = size - nh, size - nw
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return _normalise(x, mean, std)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def load_weights_file(path: Path, reward: str) -> dict:
    """A reward's .pt/.pth tensor file (weights_only: no pickle code runs); a damaged one is a UserError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, not a pickle, pickled code refused by weights_only, ...
        raise UserError(
            f"reward '{reward}': {path} cannot be read as a weights file ({type(e).__name__}); download it again"
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"reward '{reward}': {path} holds a {type(state).__name__}, not a tensor dict")
    return state


# The published Hugging Face Hub repositories each reward's weights default to (docs/rewards.md).
CLIP_L = "openai/clip-vit-large-patch14"  # `clip`, and the image tower under `aesthetic`
CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # HPS v2.1's architecture and tokenizer; PickScore's tokenizer
PICKSCORE = "yuvalkirstain/PickScore_v1"
HPS_V21 = "hf://xswu/HPSv2/HPS_v2.1_compressed.pt"
AESTHETIC_MLP = "hf://trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"  # LAION's sac+logos+ava1-l14 MLP
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _need_dir(
    path: str | None, reward: str, what: str, source: str, default: str | None = None, weights: bool = True
) -> Path:
    """A CLIP directory in Hugging Face format: `path` (a local directory or a hub id), else the published
    `default` repository, fetched through the Hub cache (config, tokenizer and, when `weights`, the weights file:
    model.safetensors where the repository has one, else pytorch_model.bin)."""
    if not path and not default:
        raise UserError(f"reward '{reward}' needs reward.options.{what}: a local directory ({source})")
    source_id = path or default
    p = resolve_dir(source_id, reward, what, weights)
    missing = [n for n in ("config.json",) if not (p / n).is_file()]
    if weights and not any((p / n).is_file() for n in WEIGHT_FILES):
        missing.append("model.safetensors")
    if not any((p / n).is_file() for n in ("tokenizer.json", "vocab.json")):
        missing.append("tokenizer.json")
    if not p.is_dir() or missing:
        raise UserError(
            f"reward '{reward}': {p} lacks {', '.join(missing) if p.is_dir() else 'everything (not a directory)'}; "
            f"download {source} to a local directory beforehand and pass it as reward.options.{what}"
        )
    return p


def resolve_dir(source_id: str, reward: str, what: str, weights: bool = True) -> Path:
    """A local directory as it is; a hub id as its cache snapshot with the config and tokenizer files (and the
    weights: model.safetensors, or pytorch_model.bin only where the repository has no safetensors)."""
    name = f"reward '{reward}' option {what}"
    if not hub.is_hub(source_id):
        return Path(source_id)
    patterns = ["config.json", *TOKENIZER_FILES]
    p = hub.resolve(source_id, None, patterns + (["model.safetensors*"] if weights else []), name)
    if weights and not any((p / n).is_file() for n in WEIGHT_FILES):
        p = hub.resolve(source_id, None, patterns + ["pytorch_model.bin"], name)
    return p


class ClipReward(torch.nn.Module):
    """Score = scale * cos(image embedding, text embedding); scale = exp(logit_scale) for PickScore, 1 else."""

    def __init__(self, model, tokenizer, use_logit_scale: bool, preprocess: str = "floor"):
        super().__init__()
        self.model, self.tokenizer, self.use_logit_scale = model, tokenizer, use_logit_scale
        self.size = model.config.vision_config.image_size
        self.preprocess = preprocess  # "floor" | "round" (centre-crop offset) | "resize_max" (HPS v2.1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.preprocess == "resize_max":
            pixels = resize_max_preprocess(images, self.size)
        else:
            pixels = clip_preprocess(images, self.size, crop=self.preprocess)
        pixels = pixels.to(self.model.dtype)
        return F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)

    def text_features(self, prompts: list[str], device) -> torch.Tensor:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).input_ids.to(device)
        return F.normalize(self.model.get_text_features(input_ids=ids).pooler_output.float(), dim=-1)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = (self.image_features(images) * self.text_features(prompts, images.device)).sum(-1)
        return cos * self.model.logit_scale.exp().float() if self.use_logit_scale else cos


def _load_clip(path: Path, dtype: str, tokenizer: Path | None = None):
    from transformers import CLIPModel, CLIPTokenizer

    dt = DTYPES[dtype]
    model = CLIPModel.from_pretrained(path, dtype=dt, local_files_only=True)
    return model, CLIPTokenizer.from_pretrained(tokenizer or path)


def build_clip(path: str | None = None, dtype: str = "float32") -> torch.nn.Module:
    p = _need_dir(path, "clip", "path", f"any CLIP checkpoint in Hugging Face format, e.g. {CLIP_L}", CLIP_L)
    return ClipReward(*_load_clip(p, dtype), use_logit_scale=False)


def build_pickscore(path: str | None = None, tokenizer: str | None = None, dtype: str = "float32") -> torch.nn.Module:
    """PickScore_v1's weights (`path`) with the CLIP-H tokenizer its authors score with (`tokenizer`; default: the
    one in `path` when it has one, else laion/CLIP-ViT-H-14-laion2B-s32B-b79K's)."""
    source = f"{PICKSCORE} (model) with the tokenizer of {CLIP_H}"
    if path and not hub.is_hub(path):  # a local directory holds both, as before
        p = _need_dir(path, "pickscore", "path", source)
        tok = _need_dir(tokenizer, "pickscore", "tokenizer", source, weights=False) if tokenizer else None
        return ClipReward(*_load_clip(p, dtype, tok), use_logit_scale=True)
    p = resolve_dir(path or PICKSCORE, "pickscore", "path")
    has_tok = any((p / n).is_file() for n in ("tokenizer.json", "vocab.json"))
    tok = resolve_dir(tokenizer or (str(p) if has_tok else CLIP_H), "pickscore", "tokenizer", weights=False)
    if not (p / "config.json").is_file() or not any((p / n).is_file() for n in WEIGHT_FILES):
        raise UserError(f"reward 'pickscore': {p} lacks config.json or its weights; is it {PICKSCORE}?")
    return ClipReward(*_load_clip(p, dtype, tok), use_logit_scale=True)


# ---- HPS v2.1: open_clip ViT-H-14 state dict -> transformers CLIPModel ------------------------------------

_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def open_clip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split/transpose where the layouts differ) an open_clip CLIP state dict to HF CLIPModel keys."""
    out = {}
    for key, value in state.items():
        k = key.removeprefix("module.")
        tower, rest = ("vision_model", k[len("visual.") :]) if k.startswith("visual.") else ("text_model", k)
        if rest.startswith("transformer.resblocks."):
            i, sub = rest[len("transformer.resblocks.") :].split(".", 1)
            base = f"{tower}.encoder.layers.{i}."
            if sub.startswith("attn.in_proj_"):
                kind = sub.rsplit("_", 1)[1]  # weight | bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{kind}"] = part
                continue
            mod, kind = sub.rsplit(".", 1)
            out[f"{base}{_BLOCK[mod]}.{kind}"] = value
            continue
        simple = {
            "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
            "class_embedding": "vision_model.embeddings.class_embedding",
            "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
            "logit_scale": "logit_scale",
        }
        if rest in simple:
            out[simple[rest]] = value
        elif rest == "positional_embedding":
            out[f"{tower}.embeddings.position_embedding.weight"] = value
        elif rest.startswith(("ln_pre.", "ln_post.", "ln_final.")):
            name, kind = rest.split(".")
            hf = {
                "ln_pre": "vision_model.pre_layrnorm",
                "ln_post": "vision_model.post_layernorm",
                "ln_final": "text_model.final_layer_norm",
            }[name]
            out[f"{hf}.{kind}"] = value
        elif rest == "proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif rest == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif rest == "attn_mask":
            continue  # open_clip's causal mask buffer; HF builds its own
        else:
            raise UserError(f"HPS checkpoint has an unexpected key '{key}'; is it an open_clip ViT-H-14 state dict?")
    return out


def build_hpsv21(clip: str | None = None, checkpoint: str | None = None, dtype: str = "float32") -> torch.nn.Module:
    """HPS v2.1. `clip` gives only the architecture (config.json) and the tokenizer: every weight comes from the
    HPS checkpoint, so the CLIP-H weights (3.9 GB) are neither downloaded nor read."""
    from accelerate import init_empty_weights
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    p = _need_dir(clip, "hpsv2.1", "clip", f"the CLIP-H architecture and tokenizer: {CLIP_H}", CLIP_H, weights=False)
    ck = hub.resolve_file(checkpoint or HPS_V21, "reward 'hpsv2.1' option checkpoint")
    if not ck.is_file():
        raise UserError(
            f"reward 'hpsv2.1' needs reward.options.checkpoint: the file HPS_v2.1_compressed.pt "
            f"(from the xswu/HPSv2 repository on the Hugging Face Hub); {ck} not found"
        )
    with init_empty_weights(include_buffers=False):  # parameters on the meta device until the checkpoint's land
        model = CLIPModel(CLIPConfig.from_pretrained(p))
    tokenizer = CLIPTokenizer.from_pretrained(p)
    state = load_weights_file(ck, "hpsv2.1")
    state = state.get("state_dict", state)
    converted = open_clip_to_hf(state)
    own = model.state_dict()
    missing = [k for k in own if k not in converted and not k.endswith("position_ids")]
    wrong = [k for k, v in converted.items() if k in own and own[k].shape != v.shape]
    if missing or wrong:
        raise UserError(f"HPS checkpoint {ck} does not fit {p}: missing {missing[:4]}, wrong shapes {wrong[:4]}")
    dt = DTYPES[dtype]
    model.load_state_dict({k: v.to(dt) for k, v in converted.items() if k in own}, strict=False, assign=True)
    return ClipReward(model.eval(), tokenizer, use_logit_scale=False, preprocess="resize_max")


# ---- LAION aesthetic predictor -------------------------------------------------------------------------------


class AestheticReward(torch.nn.Module):
    """LAION aesthetic MLP (768-1024-128-64-16-1, dropout in training) on normalised CLIP ViT-L/14 embeddings."""

    def __init__(self, clip_reward: ClipReward, width: int):
        super().__init__()
        self.clip = clip_reward
        dims = [width, 1024, 128, 64, 16, 1]
        layers = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            layers.append(torch.nn.Linear(a, b))
            if i < 3:
                layers.append(torch.nn.Dropout(0.2 if i < 2 else 0.1))
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.layers(self.clip.image_features(images)).squeeze(-1)


def build_aesthetic(clip: str | None = None, mlp: str | None = None, dtype: str = "float32") -> torch.nn.Module:
    p = _need_dir(clip, "aesthetic", "clip", CLIP_L, CLIP_L)
    mlp_path = hub.resolve_file(mlp or AESTHETIC_MLP, "reward 'aesthetic' option mlp")
    if not mlp_path.is_file():
        raise UserError(
            "reward 'aesthetic' needs reward.options.mlp: the file sac+logos+ava1-l14-linearMSE.pth "
            f"(LAION improved-aesthetic-predictor); {mlp!r} not found"
        )
    mlp = str(mlp_path)
    clip_reward = ClipReward(
        *_load_clip(p, dtype), use_logit_scale=False, preprocess="round"
    )  # OpenAI CLIP's torchvision
    model = AestheticReward(clip_reward, clip_reward.model.config.projection_dim)
    state = load_weights_file(Path(mlp), "aesthetic")
    try:
        model.layers.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    except RuntimeError as e:  # missing/unexpected keys or wrong shapes: not the LAION ViT-L/14 MLP
        raise UserError(
            f"reward 'aesthetic': {mlp} does not fit the aesthetic MLP on {p}: {str(e).splitlines()[0]}"
        ) from None
    return model
