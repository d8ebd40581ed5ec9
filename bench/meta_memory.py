"""Full-size memory of a training step counted on the meta device: no weights, no compute, exact shapes.

    python bench/meta_memory.py --model wan2.1-1.3b wan2.2-5b   # 480x832 x 33 and 81 frames, LoRA and full,
                                                                 # with and without activation checkpointing
    (also: python bench/memory.py --model wan2.1-1.3b --estimate)

The random-weight full-size models of bench/random_models.py are built on the meta device and run forward with
meta tensors under saved-tensor hooks, which see every tensor autograd keeps for the backward (distinct storages,
the parameters' excluded): one grad-enabled velocity call (true CFG: both branches, `uncond_grad = true` as the
configs) and one grad-enabled VAE decode of every frame, in bf16 (the configs' dtype). Attention is counted as a
fused kernel (flash / memory-efficient SDPA) keeps it: q, k, v, the output and a float32 logsumexp, never the
(L x L) probabilities (on the meta device SDPA would take the math path that stores them).

What is counted and what is not (so a GPU measurement, `bench/memory.py --model ...` on CUDA, can replace it):
- fixed: bf16 transformer weights; trainable state at 20 B per trained parameter (float32 weight, grad, two Adam
  moments, EMA); LoRA rank 64 on the backbone's targets; the VAE's bf16 weights. Not the CUDA context, allocator
  fragmentation or the sampler's no-grad working set (a few GiB on a real GPU), not FSDP sharding (the full
  fine-tune's state divides by the world size under `fsdp = true`).
- LeapAlign (reward-first, the default): the larger of the decode + reward graph and its two grad forwards; full
  backprop: N grad forwards plus the decode + reward graph. With checkpointing: only each block's input per
  forward, plus one block's activations recomputed at a time.
- the reward: HPSv2.1's ViT-H/14 graph, 0.4 GiB per scored frame (the FLUX section's estimate, docs/gpu.md), times
  `reward.frames`.
- "checkpointing on" is both switches of the configs: `gradient_checkpointing` (per block) and `checkpoint_decode`,
  which for Wan recomputes the decode one latent frame at a time (models/wan.decode_per_frame): the caches each
  frame's recompute needs, plus the largest frame's graph (`per_frame_decode_bytes`). Off: the whole decode graph.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import torch  # noqa: E402

from bench.random_models import RANDOM_MODELS  # noqa: E402

GIB = 2**30
REWARD_GIB_PER_FRAME = 0.4  # HPSv2.1 ViT-H/14 at 224², docs/gpu.md's FLUX estimate


class _FusedAttention(torch.autograd.Function):
    """On meta tensors: the output of SDPA, saving what a fused kernel saves (q, k, v, out, logsumexp)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: meta counting only
        raise NotImplementedError


@contextlib.contextmanager
def fused_attention():
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _FusedAttention.apply(query, key, value)

    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def saved_bytes(fn, modules) -> int:
    """Bytes of the distinct storages autograd saves while `fn()` runs, the modules' parameters and buffers
    excluded (they exist without the step)."""
    excluded = {t.untyped_storage()._cdata for m in modules for t in [*m.parameters(), *m.buffers()]}
    seen: dict[int, tuple[int, torch.Tensor]] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in excluded:
            seen[st._cdata] = (st.nbytes(), t)  # the tensor is held: its storage id is not reused meanwhile
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fused_attention():
        fn()
    return sum(n for n, _ in seen.values())


def per_frame_decode_bytes(vae, z) -> int:
    """What a grad-enabled Wan decode with `model.checkpoint_decode` (models/wan.decode_per_frame) keeps at its
    peak: every latent frame's checkpoint inputs (the decoder's causal cache going in, its slice of the
    post-quant-conv latents) until that frame's backward, the video tail's saved tensors, and one frame's graph
    recomputed at a time (the largest). Counted by running the same loop without the checkpoints."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    from leapalign_fast.models.wan import _frame

    x = vae.post_quant_conv(z)
    kept = x.untyped_storage().nbytes()
    cache = [None] * vae._cached_conv_counts["decoder"]
    outs, graphs = [], []
    for i in range(x.shape[2]):
        kept += sum(c.untyped_storage().nbytes() for c in {id(c): c for c in cache if torch.is_tensor(c)}.values())
        result = {}

        def run(i=i, cache=cache, result=result):
            result["out"] = _frame(vae.decoder, x[:, :, i : i + 1], i == 0, *cache)

        graphs.append(saved_bytes(run, [vae]))
        out, *cache = result["out"]
        outs.append(out.detach().requires_grad_(True))

    def tail():
        out = torch.cat(outs, 2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        (torch.clamp(out, min=-1.0, max=1.0).float() * 0.5 + 0.5).clamp(0.0, 1.0).transpose(1, 2)

    return kept + saved_bytes(tail, [vae]) + max(graphs)


def build_meta(kind: str):
    """The random-weight components of `kind` on the meta device, in bf16."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            return RANDOM_MODELS[kind][2]()
    finally:
        torch.set_default_dtype(previous)


def add_lora(transformer, targets, rank: int) -> int:
    """LoRA adapters (bf16, as autocast computes them) on meta; returns the adapter's parameter count."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
    lora = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in lora:
        p.data = p.data.to(torch.bfloat16)
        p.requires_grad_(True)
    return sum(p.numel() for p in lora)


def estimate(kind: str, size: tuple[int, int], frames_list: list[int], rank: int, num_steps: int, scored: int):
    from leapalign_fast.models.backbone import get_backbone

    family = RANDOM_MODELS[kind][0]
    backbone = get_backbone(family)
    rows = []
    for mode in ("lora", "full"):
        comps = build_meta(kind)
        tr = comps.transformer
        params = sum(p.numel() for p in tr.parameters())
        vae_params = sum(p.numel() for p in comps.vae.parameters())
        if mode == "lora":
            trained = add_lora(tr, backbone.lora_targets, rank)
        else:
            tr.requires_grad_(True)
            trained = params
        # LoRA: bf16 base + the adapter's float32 state; full: every weight float32 with its state (20 B)
        fixed = (params * 2 + trained * 20 if mode == "lora" else params * 20) + vae_params * 2
        d = tr.config.text_dim
        for num_frames in frames_list:
            geom = backbone.layout(comps, size, num_frames)
            cond = {
                "embeds": torch.empty(1, 512, d, device="meta", dtype=torch.bfloat16),
                "neg_embeds": torch.empty(1, 512, d, device="meta", dtype=torch.bfloat16),
            }
            x = torch.empty(*geom.noise_shape(1), device="meta", dtype=torch.bfloat16)
            t = torch.full((1,), 0.5, device="meta")
            velocity = backbone.velocity(tr, cond, geom, 5.0)
            per = {}
            for ck in (False, True):
                if ck:
                    tr.enable_gradient_checkpointing()
                else:
                    tr.disable_gradient_checkpointing()
                per[ck] = saved_bytes(lambda: velocity(x.requires_grad_(True), t), [tr])
            block = (per[False] - per[True]) / tr.config.num_layers  # one block recomputed at a time
            z = torch.empty(*geom.noise_shape(1), device="meta", dtype=torch.bfloat16, requires_grad=True)
            decode = saved_bytes(lambda: backbone.decode(comps.vae, z, geom), [comps.vae])
            from leapalign_fast.models.wan import vae_latents

            decode_ck = per_frame_decode_bytes(comps.vae, vae_latents(comps.vae, z, geom))
            reward = REWARD_GIB_PER_FRAME * GIB * min(scored, num_frames)
            for ck in (False, True):  # block checkpointing and the per-frame decode recompute together
                fwd = per[ck] + (block if ck else 0.0)
                dec = decode_ck if ck else decode
                leap = fixed + max(dec + reward, 2 * per[ck] + (block if ck else 0.0))
                full_bp = fixed + dec + reward + num_steps * per[ck] + (block if ck else 0.0)
                rows.append(
                    {
                        "model": kind,
                        "mode": mode,
                        "height": size[0],
                        "width": size[1],
                        "num_frames": num_frames,
                        "latent_frames": geom.frames,
                        "tokens": geom.tokens,
                        "checkpointing": ck,
                        "transformer_parameters": params,
                        "trained_parameters": trained,
                        "fixed_gib": fixed / GIB,
                        "grad_forward_gib": fwd / GIB,
                        "decode_gib": dec / GIB,
                        "reward_gib": reward / GIB,
                        "leapalign_gib": leap / GIB,
                        f"full_backprop_n{num_steps}_gib": full_bp / GIB,
                    }
                )
    return rows


def table(rows: list[dict], num_steps: int) -> str:
    md = [
        "| model | fine-tune | frames (tokens) | checkpointing (blocks, decode per frame) | fixed | "
        "one grad forward (CFG) | decode | "
        f"LeapAlign step | full backprop N={num_steps} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['model']} | {r['mode']} | {r['num_frames']} ({r['tokens']}) | "
            f"{'on' if r['checkpointing'] else 'off'} | {r['fixed_gib']:.1f} | {r['grad_forward_gib']:.1f} | "
            f"{r['decode_gib']:.1f} | "
            f"**{r['leapalign_gib']:.1f}** | {r[f'full_backprop_n{num_steps}_gib']:.0f} |"
        )
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["wan2.1-1.3b", "wan2.2-5b"], choices=list(RANDOM_MODELS))
    p.add_argument("--size", default="480x832", help="HxW pixels")
    p.add_argument("--frames", type=int, nargs="+", default=[33, 81])
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (the configs')")
    p.add_argument("--steps", type=int, default=20, help="N of the full-backprop column (the configs')")
    p.add_argument("--scored", type=int, default=4, help="frames the reward scores (reward.frames of the configs)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    from bench.common import write_result

    size = tuple(int(s) for s in args.size.split("x"))
    t0 = time.perf_counter()
    rows = [r for kind in args.model for r in estimate(kind, size, args.frames, args.rank, args.steps, args.scored)]
    name = "memory_estimate_" + "_".join(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_result(
        args.out / f"{name}.json",
        {
            "rows": rows,
            "reward_gib_per_frame": REWARD_GIB_PER_FRAME,
            "wall_seconds": time.perf_counter() - t0,
            "note": "counted on the meta device (saved-tensor hooks, fused-attention accounting), batch 1, bf16, "
            "per GPU without FSDP sharding; GiB",
        },
    )
    md = args.out / f"{name}.md"
    md.write_text(table(rows, args.steps))
    print(table(rows, args.steps))
    print("wrote", path, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
