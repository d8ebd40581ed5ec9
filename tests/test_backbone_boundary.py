"""The backbone boundary (issue 25): a model family is known only to its own module under models/.

Read with `ast` from the source (as test_imports): nothing outside a family module compares a value with a family's
name, no family module imports another, the rewards import nothing from models; build.py takes the backbone its
caller resolved once. Behaviour kept: the prompt-cache keys (FLUX's predate the interface: existing caches stay
valid), the LoRA default targets and the memory preflight's decoder width of every family."""

import ast
import dataclasses
import inspect

import pytest
from test_imports import imports, modules

from leapalign_fast import build, evaluate, preflight
from leapalign_fast.config import FLUX_LORA_TARGETS, TinyFluxConfig, load_config
from leapalign_fast.models.backbone import BACKBONES, get_backbone
from leapalign_fast.models.text import prompt_cache_key

FAMILY_MODULES = set(BACKBONES.values())
PROMPTS = ["a red square", "two blue circles"]


def _literals(node: ast.AST) -> set[str]:
    """The string constants a comparison operand spells out (a name, or a tuple/list/set of names)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_literals(e) for e in node.elts)) if node.elts else set()
    return set()


def family_comparisons(source: str) -> list[tuple[int, str]]:
    """(line, literal) of every comparison (==, !=, in, is, ...) with a family's name or its pipeline's class."""
    names = set(BACKBONES) | {get_backbone(n).pipeline for n in BACKBONES}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                found += [(node.lineno, lit) for lit in sorted(_literals(operand) & names)]
    return found


def test_the_comparison_finder_finds_family_names():
    src = (
        'if backbone.name != "flux":\n    pass\nx = name in ("sd3", "other")\ny = p == "FluxPipeline"\nz = a == "fluxy"'
    )
    assert family_comparisons(src) == [(1, "flux"), (3, "sd3"), (4, "FluxPipeline")]


def test_no_module_but_the_family_modules_compares_a_family_name():
    known = modules()
    assert "leapalign_fast.build" in known and FAMILY_MODULES <= set(known)
    leaks = {
        name: hits
        for name, path in known.items()
        if name not in FAMILY_MODULES
        for hits in [family_comparisons(path.read_text())]
        if hits
    }
    assert leaks == {}


def test_no_family_module_imports_another():
    known = modules()
    for name in FAMILY_MODULES:
        assert imports(name, known[name], known) & FAMILY_MODULES == set(), name
    # what they share lives beside them
    assert "leapalign_fast.models.common" in imports(
        "leapalign_fast.models.sd3", known["leapalign_fast.models.sd3"], known
    )


def test_the_rewards_import_nothing_from_models_even_lazily():
    """Every module the rewards reach through imports (module level or inside functions), transitively."""
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    reached, todo = (
        set(),
        [n for n in known if n == "leapalign_fast.rewards" or n.startswith("leapalign_fast.rewards.")],
    )
    assert "leapalign_fast.rewards.clip_rewards" in todo
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += graph[name]
    assert {n for n in reached if n.startswith("leapalign_fast.models")} == set()
    assert "leapalign_fast.dtypes" in reached  # the dtype map both sides read


def test_one_dtype_map():
    from leapalign_fast.dtypes import DTYPES
    from leapalign_fast.models import backbone

    assert backbone.DTYPES is DTYPES


def test_build_takes_the_resolved_backbone():
    sig = {
        f: list(inspect.signature(getattr(build, f)).parameters)
        for f in (
            "load_components",
            "prompt_cache_path",
            "prompt_embeddings",
            "add_trainable",
            "lora_targets",
            "encode_prompt_cache",
        )
    }
    assert sig == {
        "load_components": ["cfg", "backbone", "need_text", "empty_transformer"],
        "prompt_cache_path": ["cfg", "backbone", "prompts"],
        "prompt_embeddings": ["cfg", "backbone", "components", "prompts", "device", "verify"],
        "add_trainable": ["transformer", "cfg", "backbone", "upcast"],
        "lora_targets": ["cfg", "backbone"],
        "encode_prompt_cache": ["cfg"],
    }


@pytest.mark.parametrize("module, resolvers", [(build, {"encode_prompt_cache"}), (evaluate, {"sample_images"})])
def test_the_backbone_is_resolved_once_per_entry_point(module, resolvers):
    """`backbone_for` is called only by the entry points (the CLI command, the evaluator's sampler), once each."""
    calls = {}
    for fn in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(fn, ast.FunctionDef):
            n = sum(isinstance(c, ast.Call) and getattr(c.func, "id", None) == "backbone_for" for c in ast.walk(fn))
            if n:
                calls[fn.name] = n
    assert calls == dict.fromkeys(resolvers, 1)


def _cfg(family: str, source: str):
    return load_config(
        None,
        [f"model.family={family}", f"model.source={source}", "seed=3", "output_dir=/o", "model.max_sequence_length=32"],
    )


# The keys the code before this interface gave (recorded from it): a changed key would re-encode every cache.
OLD_KEYS = {
    ("flux", "tiny"): "f2757460211ea09b",
    ("flux", "/models/x"): "a711da41d21b122b",
    ("sd3", "tiny"): "4434d27f53dc2aaa",
    ("sd3", "/models/x"): "c1212829a3e9f0cb",
    ("flux2", "tiny"): "4eb01faf43a6f2f1",
    ("flux2", "/models/x"): "b903639b65fa3633",
    ("qwenimage", "tiny"): "d85e8311aa830456",
    ("qwenimage", "/models/x"): "2afb5d7ca7222dc5",
}


@pytest.mark.parametrize("family, source", sorted(OLD_KEYS))
def test_prompt_cache_paths_are_unchanged(family, source):
    cfg = _cfg(family, source)
    path = build.prompt_cache_path(cfg, get_backbone(family), PROMPTS)
    assert str(path) == f"/o/prompt_cache/{OLD_KEYS[family, source]}/index.json"
    # the old rule: FLUX's model id unprefixed, every other family's "<name>:"
    model_id = f"{source}:{3 if source == 'tiny' else ''}"
    old = prompt_cache_key(model_id if family == "flux" else f"{family}:{model_id}", PROMPTS, 32)
    assert path.parent.name == old
    assert get_backbone(family).cache_prefix == ("" if family == "flux" else f"{family}:")


LORA_DEFAULTS = {
    "flux": FLUX_LORA_TARGETS,
    "sd3": [
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
    ],
    "flux2": [
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_qkv_mlp_proj",
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
    ],
    "qwenimage": [
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    ],
    "wan": [
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
        "ffn.net.0.proj",
        "ffn.net.2",
    ],
    "zimage": [
        "attention.to_q",
        "attention.to_k",
        "attention.to_v",
        "attention.to_out.0",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    ],
}


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_lora_targets_are_unchanged(family):
    """The config's default means the backbone's own names; anything set explicitly is kept as set."""
    backbone = get_backbone(family)
    assert build.lora_targets(load_config(None, [f"model.family={family}"]), backbone) == LORA_DEFAULTS[family]
    cfg = load_config(None, [f"model.family={family}", 'lora.target_modules=["attn.to_q"]'])
    assert build.lora_targets(cfg, backbone) == ["attn.to_q"]
    assert backbone.resolve_lora_targets(list(FLUX_LORA_TARGETS)) == LORA_DEFAULTS[family]


@pytest.fixture(scope="module")
def tiny_vaes():
    return {f: get_backbone(f).build_tiny(TinyFluxConfig(vae_channels=16), 0).vae for f in sorted(BACKBONES)}


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_decoder_width_is_the_old_preflight_width(family, tiny_vaes):
    vae = tiny_vaes[family]
    vc = vae.config
    old = max(vc.block_out_channels) if "block_out_channels" in vc else vc.base_dim * max(vc.dim_mult)
    assert get_backbone(family).decoder_width(vae) == old > 0


def test_the_preflight_reads_the_decoder_width_from_the_backbone():
    from leapalign_fast.models.flux import build_tiny_flux

    comps = build_tiny_flux(TinyFluxConfig(), seed=0)
    backbone = get_backbone("flux")
    cfg = load_config(None, ["resolution=64"])
    geometry = backbone.geometry(comps, cfg.resolution)
    wider = dataclasses.replace(backbone, decoder_width=lambda vae: backbone.decoder_width(vae) + 10**6)
    assert preflight.step_bytes(cfg, wider, comps, geometry) > preflight.step_bytes(cfg, backbone, comps, geometry)
