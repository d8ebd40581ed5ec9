"""`imagereward`: ImageReward (Xu et al., NeurIPS 2023) on transformers' BLIP classes.

BLIP ViT-L image encoder -> BERT text encoder with cross-attention to the image tokens -> [CLS] feature ->
MLP (768-1024-128-64-16-1) -> normalised with the published mean/std. The official checkpoint
(`ImageReward.pt`, BLIP-code key names) is mapped key by key onto BlipVisionModel + BlipTextModel; the
architecture sizes are read from the checkpoint's shapes. Images are preprocessed as the official
`_transform(224)` (bicubic resize of the short side, torchvision centre crop, CLIP mean/std), in torch.
"""

from __future__ import annotations

import re

import torch

from leapalign_fast import hub
from leapalign_fast.dtypes import DTYPES
from leapalign_fast.errors import UserError
from leapalign_fast.rewards.clip_rewards import clip_preprocess, load_weights_file

IMAGEREWARD = "hf://THUDM/ImageReward/ImageReward.pt"  # the published checkpoint (BLIP-code key names)
BERT = "google-bert/bert-base-uncased"  # BLIP's tokenizer (`bert-base-uncased`, now under google-bert/)
BERT_FILES = ["vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's published reward normalisation
_MLP = {"layers.0": "0", "layers.2": "2", "layers.4": "4", "layers.6": "6", "layers.7": "7"}


def blip_to_hf(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Split an ImageReward checkpoint into (vision, text, mlp) state dicts with transformers' key names."""
    vision, text, mlp = {}, {}, {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            k = key[len("blip.visual_encoder.") :]
            k = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}.get(k, k)
            k = k.replace("patch_embed.proj", "embeddings.patch_embedding")
            k = re.sub(r"^blocks\.(\d+)\.", r"encoder.layers.\1.", k)
            k = k.replace(".norm1.", ".layer_norm1.").replace(".norm2.", ".layer_norm2.")
            k = k.replace(".attn.qkv.", ".self_attn.qkv.").replace(".attn.proj.", ".self_attn.projection.")
            k = re.sub(r"^norm\.", "post_layernorm.", k)
            vision[k] = value
        elif key.startswith("blip.text_encoder."):
            text[key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp."):
            layer, kind = key[len("mlp.") :].rsplit(".", 1)
            mlp[f"{_MLP[layer]}.{kind}"] = value
        # anything else (BLIP's projections, momentum encoders, queues) is unused by the reward
    return vision, text, mlp


def _configs(vision: dict, text: dict):
    from transformers import BlipTextConfig, BlipVisionConfig

    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    grid = int(round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5))
    v_layers = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    hidden = text["embeddings.word_embeddings.weight"].shape[1]
    t_layers = 1 + max(int(k.split(".")[2]) for k in text if k.startswith("encoder.layer."))
    vcfg = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=v_layers,
        num_attention_heads=max(1, width // 64),
        image_size=grid * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,
    )
    tcfg = BlipTextConfig(
        vocab_size=text["embeddings.word_embeddings.weight"].shape[0],
        hidden_size=hidden,
        encoder_hidden_size=width,
        intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=t_layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
        is_decoder=True,
    )
    return vcfg, tcfg


class ImageRewardModel(torch.nn.Module):
    def __init__(self, vision, text, mlp: torch.nn.Sequential, tokenizer):
        super().__init__()
        self.vision, self.text, self.mlp, self.tokenizer = vision, text, mlp, tokenizer
        self.size = vision.config.image_size

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images, self.size, crop="round").to(next(self.vision.parameters()).dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=images.device)
        out = self.text(
            input_ids=tok.input_ids.to(images.device),
            attention_mask=tok.attention_mask.to(images.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=atts,
        )
        return ((self.mlp(out.last_hidden_state[:, 0, :].float()) - MEAN) / STD).squeeze(-1)


def make_mlp(width: int) -> torch.nn.Sequential:
    """ImageReward's head: Linear layers at indices 0, 2, 4, 6, 7 with dropouts between, no activations."""
    return torch.nn.Sequential(
        torch.nn.Linear(width, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )


def build_imagereward(checkpoint: str | None = None, tokenizer: str | None = None, dtype: str = "float32"):
    from transformers import BertTokenizer, BlipTextModel, BlipVisionModel

    ck = hub.resolve_file(checkpoint or IMAGEREWARD, "reward 'imagereward' option checkpoint")
    if not ck.is_file():
        raise UserError(
            "reward 'imagereward' needs reward.options.checkpoint: the file ImageReward.pt (from the "
            f"THUDM/ImageReward repository on the Hugging Face Hub); {ck} not found"
        )
    tokenizer = tokenizer or BERT
    tk = hub.resolve(tokenizer, None, BERT_FILES, "reward 'imagereward' option tokenizer")
    if not (tk / "vocab.txt").is_file():
        raise UserError(
            "reward 'imagereward' needs reward.options.tokenizer: a local directory with vocab.txt of "
            f"bert-base-uncased; {tk} has none"
        )
    state = load_weights_file(ck, "imagereward")
    vision_sd, text_sd, mlp_sd = blip_to_hf(state.get("state_dict", state))
    # BLIP's med.py saves `embeddings.position_ids` (a persistent arange buffer); transformers rebuilds it
    # (non-persistent), so the official file's copy is dropped rather than reported as unexpected.
    text_sd = {k: v for k, v in text_sd.items() if not k.endswith("position_ids")}
    if not vision_sd or not text_sd or not mlp_sd:
        raise UserError(
            f"{ck} is not an ImageReward checkpoint (needs blip.visual_encoder.*, blip.text_encoder.*, mlp.*)"
        )
    try:
        vcfg, tcfg = _configs(vision_sd, text_sd)
    except (KeyError, IndexError, ValueError) as e:  # a key the sizes are read from is absent or malformed
        raise UserError(f"{ck} is not a complete ImageReward checkpoint (cannot read the model sizes: {e})") from None
    vision, text = BlipVisionModel(vcfg), BlipTextModel(tcfg, add_pooling_layer=False)
    mlp = make_mlp(tcfg.hidden_size)
    for name, module, sd in (("vision", vision, vision_sd), ("text", text, text_sd), ("mlp", mlp, mlp_sd)):
        try:
            result = module.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # shapes that do not fit
            raise UserError(
                f"ImageReward checkpoint {ck}: {name} weights do not fit ({str(e).splitlines()[-1].strip()})"
            ) from None
        missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
        if missing or result.unexpected_keys:
            raise UserError(
                f"ImageReward checkpoint {ck}: {name} keys do not fit (missing {missing[:3]}, "
                f"unexpected {result.unexpected_keys[:3]})"
            )
    tok = BertTokenizer.from_pretrained(tk)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})  # as BLIP's init_tokenizer
    dt = DTYPES[dtype]
    return ImageRewardModel(vision.to(dt), text.to(dt), mlp, tok)
