"""The attention half of one CogVideoX block (norm1 + attn1 + gates + residual), three ways, with its pieces.

    PYTHONPATH=$PWD python3 benchmarks/bench_attention_half.py --out DIR [--preset 5b|2b|1.5-5b]
    TRITON_INTERPRET=1 python3 benchmarks/bench_attention_half.py --out DIR --smoke   # CPU check of the script

Variants (each returns the residual stream [text ; video] after the attention half, bf16):
  diffusers          norm1 + attn1 with diffusers' processor (SDPA) + gates, as the block writes it
  ours (current)     the same with our processor (``rope3d_attention``): what ``apply()`` runs by default
  ours (fused half)  ``fused_attention_half``: adaln_linear + rope3d_attention + gated_linear
Then the pieces of the fused half alone, and the whole block with the switch off / on. Errors are
||out - ref|| / ||ref|| against the float32 block (TF32 off) on the same inputs. Rows go to DIR as
attention_half.json / .md as they are measured.
"""
from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import torch

from cogvideox_kernels.bench.common import environment, time_ms
from cogvideox_kernels.bench.presets import MODELS


def build(preset: str, device: str, smoke: bool):
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    m = MODELS[preset]
    cfg = m.diffusers_config(num_layers=1)
    t, h, w = m.latents
    text_len = m.text_len
    if smoke:  # a tiny block of the same structure
        cfg.update(num_attention_heads=2, attention_head_dim=16, time_embed_dim=32, text_embed_dim=32,
                   sample_height=8, sample_width=8, sample_frames=5, max_text_seq_length=5)
        t, h, w, text_len = 2, 8, 8, 5
    torch.manual_seed(0)
    with torch.device(device):
        model = CogVideoXTransformer3DModel(**cfg).eval().requires_grad_(False)
    block = model.transformer_blocks[0]
    hidden = block.norm1.norm.normalized_shape[0]
    g = torch.Generator(device=device).manual_seed(1)
    pt = cfg.get("patch_size_t") or 1
    video = ((t + pt - 1) // pt) * (h // 2) * (w // 2)
    inputs = [torch.randn(2, video, hidden, generator=g, device=device),
              torch.randn(2, text_len, hidden, generator=g, device=device),
              torch.randn(2, cfg["time_embed_dim"], generator=g, device=device), None]
    if cfg["use_rotary_positional_embeddings"]:
        grid = (h // 2, w // 2)
        if pt == 1:
            inputs[3] = get_3d_rotary_pos_embed(embed_dim=cfg["attention_head_dim"], crops_coords=((0, 0), grid),
                                                grid_size=grid, temporal_size=t, device=device)
        else:
            inputs[3] = get_3d_rotary_pos_embed(embed_dim=cfg["attention_head_dim"], crops_coords=None, grid_size=grid,
                                                temporal_size=(t + pt - 1) // pt, grid_type="slice",
                                                max_size=grid, device=device)
    return model, block, inputs


def diffusers_half(block, hidden, encoder, temb, rope):
    nh, ne, gate, egate = block.norm1(hidden, encoder, temb)
    ah, ae = block.attn1(hidden_states=nh, encoder_hidden_states=ne, image_rotary_emb=rope)
    return torch.cat([encoder + egate * ae, hidden + gate * ah], dim=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="5b", choices=("5b", "2b", "1.5-5b"))
    parser.add_argument("--smoke", action="store_true", help="tiny block on the CPU (Triton interpreter)")
    args = parser.parse_args(argv)
    from cogvideox_kernels.integrations import diffusers as integration
    from cogvideox_kernels.integrations.diffusers import attention, state

    device = "cpu" if args.smoke else "cuda"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, block, inputs = build(args.preset, device, args.smoke)
    env = environment(device)
    rows = []

    def add(**row):
        rows.append(row)
        print("ROW", json.dumps(row), flush=True)
        (out_dir / "attention_half.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        lines = [f"# Attention half of one {args.preset} block", "", f"GPU {env.get('gpu')}, torch {env.get('torch')}, "
                 f"triton {env.get('triton')}, commit {env.get('commit')}, {env.get('date')}", "",
                 "| variant | ms | rel err vs fp32 | note |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['variant']} | {r.get('ms', '')} | {r.get('rel_err', '')} | {r.get('note', '')} |" for r in rows]
        (out_dir / "attention_half.md").write_text("\n".join(lines) + "\n")

    def rel(out, ref):
        out, ref = out.double(), ref.double()
        return f"{((out - ref).norm() / ref.norm()).item():.3e}" if torch.isfinite(out).all() else "nan"

    def timed(fn):
        return round(time_ms(fn, device, reps=2 if args.smoke else None, warmup=1), 3)

    with torch.no_grad():
        ref_half = diffusers_half(block, *inputs)
        ref_block = torch.cat(block(*inputs)[::-1], dim=1)
        dtype = torch.float32 if args.smoke else torch.bfloat16
        model.to(dtype)
        x = [t.to(dtype) if i < 3 else t for i, t in enumerate(inputs)]
        backend = "triton" if args.smoke else "auto"

        def run(variant, fn, ref, note=""):
            try:
                out = fn()
                add(variant=variant, ms=timed(fn), rel_err=rel(out.float(), ref), note=note)
            except Exception as exc:
                traceback.print_exc()
                add(variant=variant, note=f"error {type(exc).__name__}: {str(exc)[:200]}")

        run("diffusers", lambda: diffusers_half(block, *x), ref_half)
        integration.apply(model, backend=backend)
        run("ours (current)", lambda: diffusers_half(block, *x), ref_half, "our processor; norm1, splits, gates: torch")
        half = lambda: attention.fused_attention_half(block, *x, None)  # noqa: E731
        assert half() is not None, "the fused half did not take this block"
        run("ours (fused half)", half, ref_half, f"QKV concatenations so far {attention.QKV.concatenations}")

        # the fused half's pieces, alone, on the same tensors
        tokens = torch.cat([x[1], x[0]], dim=1)
        text_len, (B, S, _) = x[1].shape[1], tokens.shape
        attn = block.attn1
        mod = block.norm1.linear(block.norm1.silu(x[2])).unflatten(1, (6, -1))
        wqkv = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
        bqkv = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
        norm = block.norm1.norm
        pre = lambda: integration.adaln_linear(tokens, mod, wqkv, bqkv, text_len=text_len, norm_weight=norm.weight,  # noqa: E731
                                               norm_bias=norm.bias, eps=norm.eps, backend=backend)
        add(variant="piece: adaln_linear (pre-pass + QKV GEMM)", ms=timed(pre))
        qkv = pre()
        q, k, v = qkv.view(B, S, 3, attn.heads, -1).unbind(2)
        cos, sin = (t.float() for t in x[3]) if x[3] is not None else (None, None)
        core = lambda: integration.rope3d_attention(  # noqa: E731
            q, k, v, text_len=text_len, cos=cos, sin=sin, q_norm=(attn.norm_q.weight, attn.norm_q.bias),
            k_norm=(attn.norm_k.weight, attn.norm_k.bias), eps=attn.norm_q.eps, backend=backend)
        add(variant="piece: rope3d_attention (QK-LN + RoPE + attention)", ms=timed(core))
        o = core().reshape(B, S, -1)
        post = lambda: integration.gated_linear(tokens, o, attn.to_out[0].weight, attn.to_out[0].bias, mod,  # noqa: E731
                                                text_len=text_len, backend=backend)
        add(variant="piece: gated_linear (to_out GEMM + bias + gate + residual)", ms=timed(post))
        add(variant="piece: QKV GEMM alone (torch F.linear)",
            ms=timed(lambda: torch.nn.functional.linear(tokens, wqkv, bqkv)))
        # the alternative without the concatenated weight copy (2.4 GB at 5B): three GEMMs into the three
        # contiguous [B*S, inner] blocks of one buffer (q, k, v stay strided views of it)
        h2d, parts = tokens.reshape(B * S, -1), (attn.to_q, attn.to_k, attn.to_v)
        buf = torch.empty(3, B * S, attn.inner_dim, dtype=tokens.dtype, device=tokens.device)

        def three():
            for i, p in enumerate(parts):
                torch.addmm(p.bias, h2d, p.weight.t(), out=buf[i])
            return buf

        add(variant="piece: QKV as 3 addmm into one buffer (no weight copy)", ms=timed(three))
        add(variant="piece: norm1 (diffusers)", ms=timed(lambda: block.norm1(*x[:3])))

        # the whole block (attention half + expert_ffn FFN half), switch off / on
        whole = lambda: torch.cat(block(*x)[::-1], dim=1)  # noqa: E731
        for on in (False, True):
            state.FUSED_ATTENTION_HALF = on
            run(f"block, ours ({'fused' if on else 'current'} attention half)", whole, ref_block)
        state.FUSED_ATTENTION_HALF = False
        integration.remove(model)
        run("block, diffusers", whole, ref_block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
