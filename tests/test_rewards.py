"""Reward models on tiny random weights of the real architectures: preprocessing vs the official PIL path,
scores vs transformers' own CLIP, gradients to the pixels, HPS checkpoint mapping, mixtures, missing files."""

import pytest
import torch
from PIL import Image

from leapalign_fast.errors import UserError
from leapalign_fast.models.text import build_tiny_clip_tokenizer
from leapalign_fast.rewards import build_reward, reward_names
from leapalign_fast.rewards.clip_rewards import clip_preprocess

SIZE = 32


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def make_tiny_clip(d):
    """A tiny random CLIP (real classes) with a tiny tokenizer, saved in Hugging Face format in `d`."""
    from transformers import CLIPConfig, CLIPModel

    tok = build_tiny_clip_tokenizer()
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=SIZE,
            patch_size=8,
            hidden_act="gelu",
        ),
        projection_dim=16,
        logit_scale_init_value=2.6592,
    )
    CLIPModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _pil_pixels(images_u8):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images_u8]
    return proc(images=pil, return_tensors="pt").pixel_values


@pytest.mark.parametrize("hw", [(64, 64), (64, 48), (100, 77), (512, 512)])
def test_tensor_preprocessing_matches_the_official_pil_path(hw):
    g = torch.Generator().manual_seed(0)
    u8 = (torch.rand(2, 3, *hw, generator=g) * 255).round().to(torch.uint8)
    diff = (clip_preprocess(u8.float() / 255, SIZE) - _pil_pixels(u8)).abs()
    # Measured on uniform noise (the worst case for resampling): max 0.079, mean 0.0042 in normalised units
    # (~0.3 of one 8-bit level on average): PIL resamples uint8, we resample float.
    assert diff.max() < 0.1 and diff.mean() < 0.006


def _reference_scores(clip_dir, u8, prompts):
    from transformers import CLIPModel, CLIPTokenizer

    model, tok = CLIPModel.from_pretrained(clip_dir), CLIPTokenizer.from_pretrained(clip_dir)
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=_pil_pixels(u8))
    return out.logits_per_image.diag(), model.logit_scale.exp()


@pytest.mark.parametrize("name", ["clip", "pickscore"])
def test_clip_scores_match_transformers_reference(clip_dir, name):
    reward = build_reward(name, path=str(clip_dir))
    prompts = ["a red square", "two blue circles left of a star"]
    u8 = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255).round().to(torch.uint8)
    logits, scale = _reference_scores(clip_dir, u8, prompts)  # logits = logit_scale * cos
    want = logits if name == "pickscore" else logits / scale
    images = (u8.float() / 255).requires_grad_(True)
    got = reward(images, prompts)
    assert got.shape == (2,)
    # The scores differ only through PIL-vs-tensor resampling (measured above).
    torch.testing.assert_close(got.detach(), want, atol=2e-3 * float(scale if name == "pickscore" else 1), rtol=0)
    (grad,) = torch.autograd.grad(got.sum(), images)
    assert grad.abs().sum() > 0  # gradient reaches the pixels
    assert not any(p.requires_grad for p in reward.parameters())  # the reward's own weights are frozen


def _to_open_clip(hf: dict) -> dict:
    """The inverse layout, written independently: HF CLIPModel keys -> open_clip's."""
    oc = {}
    for tower, prefix in (("vision_model", "visual."), ("text_model", "")):
        i = 0
        while f"{tower}.encoder.layers.{i}.layer_norm1.weight" in hf:
            b, o = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                oc[o + f"attn.in_proj_{kind}"] = torch.cat([hf[b + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
                for h, n in (
                    ("layer_norm1", "ln_1"),
                    ("layer_norm2", "ln_2"),
                    ("self_attn.out_proj", "attn.out_proj"),
                    ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"),
                ):
                    oc[o + f"{n}.{kind}"] = hf[b + f"{h}.{kind}"]
            i += 1
        oc[prefix + "positional_embedding"] = hf[f"{tower}.embeddings.position_embedding.weight"]
    for kind in ("weight", "bias"):
        oc[f"visual.ln_pre.{kind}"] = hf[f"vision_model.pre_layrnorm.{kind}"]
        oc[f"visual.ln_post.{kind}"] = hf[f"vision_model.post_layernorm.{kind}"]
        oc[f"ln_final.{kind}"] = hf[f"text_model.final_layer_norm.{kind}"]
    oc["visual.conv1.weight"] = hf["vision_model.embeddings.patch_embedding.weight"]
    oc["visual.class_embedding"] = hf["vision_model.embeddings.class_embedding"]
    oc["visual.proj"] = hf["visual_projection.weight"].t()
    oc["text_projection"] = hf["text_projection.weight"].t()
    oc["token_embedding.weight"] = hf["text_model.embeddings.token_embedding.weight"]
    oc["logit_scale"] = hf["logit_scale"]
    return oc


def test_hps_checkpoint_maps_key_by_key(clip_dir, tmp_path):
    from transformers import CLIPModel

    trained = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():  # "fine-tuned" weights that differ from the architecture directory's
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"state_dict": _to_open_clip(trained.state_dict())}, tmp_path / "HPS_v2.1_compressed.pt")
    reward = build_reward("hpsv2.1", clip=str(clip_dir), checkpoint=str(tmp_path / "HPS_v2.1_compressed.pt"))
    loaded = reward.model.state_dict()
    for k, v in trained.state_dict().items():
        if not k.endswith("position_ids"):
            assert torch.equal(loaded[k], v), k
    u8 = (torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(2)) * 255).round().to(torch.uint8)
    from transformers import CLIPTokenizer

    ids = CLIPTokenizer.from_pretrained(clip_dir)(
        ["a cat", "a dog"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        ref = trained(input_ids=ids, pixel_values=_pil_pixels(u8)).logits_per_image.diag() / trained.logit_scale.exp()
    torch.testing.assert_close(reward(u8.float() / 255, ["a cat", "a dog"]), ref, atol=2e-3, rtol=0)
    with pytest.raises(UserError, match="HPS_v2.1_compressed.pt"):
        build_reward("hpsv2.1", clip=str(clip_dir), checkpoint=str(tmp_path / "nope.pt"))


def test_aesthetic_mlp_in_laion_format(clip_dir, tmp_path):
    torch.manual_seed(3)
    dims = [16, 1024, 128, 64, 16, 1]
    idx = [0, 2, 4, 6, 7]  # LAION's nn.Sequential indices of the Linear layers (dropouts between)
    state = {}
    for i, (a, b) in zip(idx, zip(dims, dims[1:])):
        state[f"layers.{i}.weight"], state[f"layers.{i}.bias"] = torch.randn(b, a) * 0.1, torch.randn(b) * 0.1
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    reward = build_reward("aesthetic", clip=str(clip_dir), mlp=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"))
    images = torch.rand(3, 3, 40, 40, requires_grad=True)
    score = reward(images, ["x"] * 3)
    feats = reward.clip.image_features(images.detach())
    h = feats
    for i in idx:
        h = h @ state[f"layers.{i}.weight"].t() + state[f"layers.{i}.bias"]
    torch.testing.assert_close(score.detach(), h.squeeze(-1), atol=1e-5, rtol=1e-5)
    assert torch.autograd.grad(score.sum(), images)[0].abs().sum() > 0


def test_weighted_mixture(clip_dir):
    mix = build_reward("clip:1.0,pickscore:0.5", clip={"path": str(clip_dir)}, pickscore={"path": str(clip_dir)})
    images, prompts = torch.rand(2, 3, 32, 32), ["a red square", "a blue ball"]
    clip, pick = build_reward("clip", path=str(clip_dir)), build_reward("pickscore", path=str(clip_dir))
    torch.testing.assert_close(mix(images, prompts), clip(images, prompts) + 0.5 * pick(images, prompts))
    with pytest.raises(UserError, match="not a number"):
        build_reward("clip:x")


def test_missing_weights_name_the_file_and_source(tmp_path):
    assert {"clip", "pickscore", "hpsv2.1", "aesthetic", "colour"} <= set(reward_names())
    with pytest.raises(UserError, match="PickScore_v1"):
        build_reward("pickscore", path=str(tmp_path))
    with pytest.raises(UserError, match="openai/clip-vit-large-patch14.*not there and HF_HUB_OFFLINE=1"):
        build_reward("clip")  # no path: the published repository, not in this machine's (offline) cache
    with pytest.raises(UserError, match="bad reward.options"):
        build_reward("colour", weights="x")


def _blip_checkpoint(tmp_path):
    """A tiny ImageReward checkpoint in the official (BLIP-code) key layout, from random HF BLIP modules."""
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from leapalign_fast.rewards.imagereward import make_mlp

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "square", "blue", "ball", "cat", "dog"]
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer.from_pretrained(tmp_path / "bert")
    torch.manual_seed(4)
    vision = BlipVisionModel(
        BlipVisionConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=1,
            image_size=32,
            patch_size=8,
            layer_norm_eps=1e-6,
        )
    )
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=len(tok) + 2,
            hidden_size=64,
            encoder_hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=1,
            max_position_embeddings=40,
            is_decoder=True,
        ),
        add_pooling_layer=False,
    )
    mlp = make_mlp(64)
    state = {}
    for k, v in vision.state_dict().items():
        k = k.replace("embeddings.class_embedding", "cls_token").replace("embeddings.position_embedding", "pos_embed")
        k = k.replace("embeddings.patch_embedding", "patch_embed.proj").replace("encoder.layers.", "blocks.")
        k = k.replace("layer_norm1", "norm1").replace("layer_norm2", "norm2").replace("self_attn.qkv", "attn.qkv")
        k = k.replace("self_attn.projection", "attn.proj").replace("post_layernorm", "norm")
        state["blip.visual_encoder." + k] = v
    state.update({"blip.text_encoder." + k: v for k, v in text.state_dict().items()})
    # BLIP's med.py registers position_ids as a persistent buffer: the official file holds it (transformers does not)
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).expand((1, -1))
    state.update({f"mlp.layers.{k}": v for k, v in mlp.state_dict().items()})
    state["blip.vision_proj.weight"] = torch.randn(8, 64)  # unused by the reward, present in the real file
    torch.save(state, tmp_path / "ImageReward.pt")
    return vision.eval(), text.eval(), mlp.eval(), tok


def test_imagereward_checkpoint_maps_key_by_key_and_scores(tmp_path):
    vision, text, mlp, tok = _blip_checkpoint(tmp_path)
    reward = build_reward("imagereward", checkpoint=str(tmp_path / "ImageReward.pt"), tokenizer=str(tmp_path / "bert"))
    for ours, ref in ((reward.vision, vision), (reward.text, text), (reward.mlp, mlp)):
        own = ours.state_dict()
        for k, v in ref.state_dict().items():
            assert torch.equal(own[k], v), k
    images = torch.rand(2, 3, 48, 40, requires_grad=True)
    prompts = ["a red square", "a blue ball"]
    score = reward(images, prompts)
    # The published computation, step by step, on the original modules.
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    t = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        emb = vision(pixel_values=clip_preprocess(images.detach(), 32, crop="round")).last_hidden_state
        cls = text(
            input_ids=t.input_ids,
            attention_mask=t.attention_mask,
            encoder_hidden_states=emb,
            encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long),
        ).last_hidden_state[:, 0]
    want = ((mlp(cls) - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)
    torch.testing.assert_close(score.detach(), want, atol=1e-5, rtol=1e-5)
    assert score.shape == (2,) and torch.autograd.grad(score.sum(), images)[0].abs().sum() > 0
    with pytest.raises(UserError, match="ImageReward.pt"):
        build_reward("imagereward", checkpoint=str(tmp_path / "missing.pt"), tokenizer=str(tmp_path / "bert"))
