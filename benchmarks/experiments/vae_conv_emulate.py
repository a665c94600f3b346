"""Lane-level NumPy emulation of csrc/vae_conv/cuda_conv.cuh and cuda_prep.cuh, to check its index maths without a
GPU: the statistics split, the activation pass (channels-last + new cache), and the conv kernel's
cp.async chunk addressing, the ldmatrix lane addresses and fragment layouts (PTX ISA: ldmatrix
non-transposed, mma.m16n8k16 A/B/C fragments) and the epilogue mapping. Every formula below is
transcribed from the .cu file; values are float64 so the result must equal the reference to ~1e-15.

    python benchmarks/experiments/vae_conv_emulate.py
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from cogvideox_kernels.ops.vae_conv.native import pack_weight
from cogvideox_kernels.ops.vae_conv.reference import vae_conv3d_reference

# constants of the .cu file
kBM, kTH, kTW, kCK = 128, 16, 16, 16
kHaloW, kHaloH = kTW + 2, kTH + 2
kHaloPx = kHaloW * kHaloH
kTaps2d = 9
kLdA = kTaps2d * kCK + 8
kLdH = kCK + 8
kStageA = kBM * kLdA
kStageH = kHaloPx * kLdH
kStage = kStageA + kStageH
kThreads = 256
kAChunksPerRow = kTaps2d * kCK // 8
kAChunks = kBM * kAChunksPerRow // kThreads
kHChunks = (kHaloPx * 2 + kThreads - 1) // kThreads
REPLICATE, ZEROS = 0, 1


def padded_source(P, kt, pad_mode, has_cache):
    front = kt - 1
    if P >= front:
        return ("input", P - front)
    if has_cache:
        return ("cache", P)
    if pad_mode == REPLICATE:
        return ("input", 0)
    return ("zero", 0)


def stats(x, groups, eps, gamma, beta, splits_ws):
    B, C = x.shape[:2]
    xf = x.reshape(-1)
    span = x.numel() // (B * groups)
    chunk = -(-span // splits_ws)
    chunk = (chunk + 7) // 8 * 8
    splits = -(-span // chunk)
    assert splits <= splits_ws
    partial = np.zeros((B * groups, splits, 2))
    for bg in range(B * groups):
        base = bg * span
        pivot = float(xf[base])
        for s in range(splits):
            lo, hi = s * chunk, min(span, s * chunk + chunk)
            v = xf[base + lo: base + hi].double().numpy() - pivot
            partial[bg, s] = v.sum(), (v * v).sum()
    coef = np.zeros((B, C, 2))
    cpg = C // groups
    for bg in range(B * groups):
        b, g = divmod(bg, groups)
        s, ss = partial[bg, :, 0].sum(), partial[bg, :, 1].sum()
        m = s / span
        var = max(ss / span - m * m, 0.0)
        mean = float(xf[bg * span]) + m
        rstd = 1.0 / np.sqrt(var + eps)
        for c in range(g * cpg, (g + 1) * cpg):
            a = rstd * (1.0 if gamma is None else float(gamma[c]))
            coef[b, c] = a, (0.0 if beta is None else float(beta[c])) - mean * a
    return coef


def prep(x, cache, coef, scale, shift, silu, kt, pad_mode):
    """_vae_prep_kernel: blocks of 64 pixels x 32 channels, the same element loops."""
    B, C, T, H, W = x.shape
    HW = H * W
    nc = kt - 1
    has_cache = cache is not None
    frames_total = T + (nc if has_cache else 0)
    act = np.full(B * T * HW * C, np.nan)
    cache_cl = np.full(B * max(nc, 1) * HW * C, np.nan)
    new_cache = np.full(B * C * nc * HW, np.nan)
    xf = x.reshape(-1).numpy()
    cf = cache.reshape(-1).numpy() if has_cache else None
    sf = scale.reshape(-1).numpy() if scale is not None else None
    hf = shift.reshape(-1).numpy() if shift is not None else None
    e = np.arange(64 * 32)
    for z in range(B * frames_total):
        b, f = divmod(z, frames_total)
        is_cache = f >= T
        fs = f - T if is_cache else f
        nf = nc if is_cache else T
        src = cf if is_cache else xf
        for bx in range(-(-HW // 64)):
            for by in range(-(-C // 32)):
                p0, c0 = bx * 64, by * 32
                tile = np.full((64, 32), np.nan)
                ch, px = e // 64, e % 64
                c, pix = c0 + ch, p0 + px
                ok = (c < C) & (pix < HW)
                ch, px, c, pix = ch[ok], px[ok], c[ok], pix[ok]
                off = ((b * C + c) * nf + fs) * HW + pix
                v = src[off].astype(np.float64)
                if not is_cache:
                    if coef is not None:
                        v = v * coef[b, c, 0] + coef[b, c, 1]
                    if sf is not None:
                        v = v * sf[off] + hf[off]
                    if silu:
                        v = v / (1 + np.exp(-v))
                tile[px, ch] = v
                for i in range(nc):
                    kind, frame = padded_source(T + i, kt, pad_mode, has_cache)
                    mine = (kind == "cache" and frame == fs) if is_cache else \
                        ((kind == "input" and frame == f) or (kind == "zero" and f == 0))
                    if mine:
                        new_cache[((b * C + c) * nc + i) * HW + pix] = 0.0 if kind == "zero" else v
                px, ch = e // 32, e % 32
                c, pix = c0 + ch, p0 + px
                ok = (c < C) & (pix < HW)
                dst = cache_cl if is_cache else act
                dst[((b * nf + fs) * HW + pix[ok]) * C + c[ok]] = tile[px[ok], ch[ok]]
    return act, cache_cl, new_cache


def ldmatrix_x4(smem, lane_addr):
    """lane_addr[l]: row address given by lane l (lanes 8m..8m+7 -> rows of matrix m).
    Returns regs[l][m] = (row l//4, cols 2*(l%4), +1) of matrix m."""
    regs = np.zeros((32, 4, 2))
    for m in range(4):
        rows = np.stack([smem[lane_addr[8 * m + r]: lane_addr[8 * m + r] + 8] for r in range(8)])
        for l in range(32):
            regs[l, m] = rows[l // 4, 2 * (l % 4): 2 * (l % 4) + 2]
    return regs


def mma(acc, a, b0, b1):
    """acc[l][4] += A(16x16) B(16x8) with the PTX m16n8k16 fragment layouts; a[l][4][2], b0/b1[l][2]."""
    A = np.zeros((16, 16))
    Bm = np.zeros((16, 8))
    for l in range(32):
        g, q = l // 4, l % 4
        A[g, 2 * q: 2 * q + 2] = a[l, 0]
        A[g + 8, 2 * q: 2 * q + 2] = a[l, 1]
        A[g, 2 * q + 8: 2 * q + 10] = a[l, 2]
        A[g + 8, 2 * q + 8: 2 * q + 10] = a[l, 3]
        Bm[2 * q: 2 * q + 2, g] = b0[l]
        Bm[2 * q + 8: 2 * q + 10, g] = b1[l]
    D = A @ Bm
    for l in range(32):
        g, q = l // 4, l % 4
        acc[l, 0:2] += D[g, 2 * q: 2 * q + 2]
        acc[l, 2:4] += D[g + 8, 2 * q: 2 * q + 2]


def conv(act, cache_cl, wp, bias, residual, B, C, Co, T, H, W, kt, pad_mode, has_cache, stages):
    HW = H * W
    y = np.full(B * Co * T * HW, np.nan)
    ci_chunks = C // kCK
    nk = kt * ci_chunks
    k_total = nk * kTaps2d * kCK
    tiles_w = -(-W // kTW)
    tiles = -(-H // kTH) * tiles_w
    for bz in range(B * T):
        b, t = divmod(bz, T)
        for by in range(tiles):
            h0, w0 = by // tiles_w * kTH, by % tiles_w * kTW
            for bx in range(-(-Co // kBM)):
                co0 = bx * kBM
                smem = np.full(stages * kStage, np.nan)
                h_off = np.full((kThreads, kHChunks), -1, dtype=np.int64)
                for tid in range(kThreads):
                    for i in range(kHChunks):
                        c = tid + i * kThreads
                        if c < kHaloPx * 2:
                            px, half = c >> 1, c & 1
                            h, w = h0 + px // kHaloW - 1, w0 + px % kHaloW - 1
                            if 0 <= h < H and 0 <= w < W:
                                h_off[tid, i] = (h * W + w) * C + half * 8

                def load_stage(slot, kc):
                    sA = slot * kStage
                    sH = sA + kStageA
                    dt, cc = divmod(kc, ci_chunks)
                    for tid in range(kThreads):
                        for i in range(kAChunks):
                            c = tid + i * kThreads
                            row, col = c // kAChunksPerRow, (c % kAChunksPerRow) * 8
                            co = co0 + row
                            d = sA + row * kLdA + col
                            if co < Co:
                                s0 = co * k_total + kc * kTaps2d * kCK + col
                                smem[d: d + 8] = wp[s0: s0 + 8]
                            else:
                                smem[d: d + 8] = 0
                    kind, frame = padded_source(t + dt, kt, pad_mode, has_cache)
                    if kind == "cache":
                        src, base = cache_cl, ((b * (kt - 1) + frame) * HW) * C
                    else:
                        src, base = act, ((b * T + frame) * HW) * C
                    base += cc * kCK
                    for tid in range(kThreads):
                        for i in range(kHChunks):
                            c = tid + i * kThreads
                            if c < kHaloPx * 2:
                                d = sH + (c >> 1) * kLdH + (c & 1) * 8
                                if kind != "zero" and h_off[tid, i] >= 0:
                                    s0 = base + h_off[tid, i]
                                    smem[d: d + 8] = src[s0: s0 + 8]
                                else:
                                    smem[d: d + 8] = 0

                for s in range(stages - 1):
                    if s < nk:
                        load_stage(s, s)
                acc = np.zeros((8, 4, 8, 32, 4))  # warp, i, j, lane, r
                lanes = np.arange(32)
                for kc in range(nk):
                    nxt = kc + stages - 1
                    if nxt < nk:
                        load_stage(nxt % stages, nxt)
                    sA = (kc % stages) * kStage
                    sH = sA + kStageA
                    for warp in range(8):
                        wm, wn = warp // 4, warp % 4
                        a_lane = (wm * 64 + (lanes & 15)) * kLdA + (lanes >> 4) * 8
                        ow = (lanes & 7) + ((lanes >> 4) << 3)
                        b_lane = ((wn * 4) * kHaloW + ow) * kLdH + ((lanes >> 3) & 1) * 8
                        for tap in range(kTaps2d):
                            dh, dw = divmod(tap, 3)
                            af = [ldmatrix_x4(smem, sA + a_lane + i * 16 * kLdA + tap * kCK) for i in range(4)]
                            bf = [ldmatrix_x4(smem, sH + b_lane + ((jj + dh) * kHaloW + dw) * kLdH)
                                  for jj in range(4)]
                            for i in range(4):
                                for j in range(8):
                                    mma(acc[warp, i, j], af[i], bf[j // 2][:, (j % 2) * 2],
                                        bf[j // 2][:, (j % 2) * 2 + 1])
                for warp in range(8):
                    wm, wn = warp // 4, warp % 4
                    for lane in range(32):
                        g8, q4 = lane >> 2, lane & 3
                        for i in range(4):
                            for hr in range(2):
                                co = co0 + wm * 64 + i * 16 + g8 + hr * 8
                                if co >= Co:
                                    continue
                                bv = 0.0 if bias is None else bias[co]
                                plane = ((b * Co + co) * T + t) * HW
                                for j in range(8):
                                    h = h0 + wn * 4 + j // 2
                                    w = w0 + (j % 2) * 8 + q4 * 2
                                    if h >= H or w >= W:
                                        continue
                                    o = plane + h * W + w
                                    for e in range(2):
                                        if w + e < W:
                                            v = acc[warp, i, j, lane, hr * 2 + e] + bv
                                            if residual is not None:
                                                v += residual[o + e]
                                            y[o + e] = v
    return y


def run_case(B, C, Co, T, H, W, kt, pad_mode, *, groups, cache, modulation, residual, silu, stages, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = r(B, C, T, H, W) + 3.0
    w = r(Co, C, kt, 3, 3) / (C * kt * 9) ** 0.5
    bias = r(Co)
    kw = dict(num_groups=groups, silu=silu, pad_mode="replicate" if pad_mode == REPLICATE else "zeros")
    if groups:
        kw.update(norm_weight=r(C), norm_bias=r(C))
    if modulation:
        kw.update(scale=r(B, C, T, H, W), shift=r(B, C, T, H, W))
    if cache:
        kw["cache"] = r(B, C, kt - 1, H, W)
    if residual:
        kw["residual"] = r(B, Co, T, H, W)
    ref, ref_cache = vae_conv3d_reference(x, w, bias, compute_dtype=torch.float64, **kw)
    coef = stats(x, groups, 1e-6, kw.get("norm_weight"), kw.get("norm_bias"), 3) if groups else None
    act, cache_cl, new_cache = prep(x, kw.get("cache"), coef, kw.get("scale"), kw.get("shift"), silu, kt, pad_mode)
    wp = pack_weight(w).reshape(-1).numpy()
    res = kw["residual"].reshape(-1).numpy() if residual else None
    y = conv(act, cache_cl, wp, bias.numpy(), res, B, C, Co, T, H, W, kt, pad_mode, cache, stages)
    y = torch.from_numpy(y).reshape(ref.shape)
    err = ((y - ref).norm() / ref.norm()).item()
    cerr = 0.0 if kt == 1 else ((torch.from_numpy(new_cache).reshape(ref_cache.shape) - ref_cache).norm()
                                / ref_cache.norm()).item()
    ok = err < 1e-12 and cerr < 1e-12 and np.isfinite(y.numpy()).all()
    print(f"B{B} C{C}->{Co} T{T} {H}x{W} kt{kt} pad{pad_mode} groups{groups} cache{cache} mod{modulation} "
          f"res{residual} silu{silu} stages{stages}: rel err y {err:.1e}, cache {cerr:.1e} {'OK' if ok else 'FAIL'}")
    return ok


if __name__ == "__main__":
    cases = [
        dict(B=1, C=32, Co=136, T=2, H=18, W=20, kt=3, pad_mode=REPLICATE, groups=4, cache=False,
             modulation=False, residual=True, silu=True, stages=4, seed=1),
        dict(B=2, C=16, Co=8, T=1, H=5, W=17, kt=3, pad_mode=ZEROS, groups=2, cache=True,
             modulation=True, residual=False, silu=True, stages=3, seed=2),
        dict(B=1, C=16, Co=16, T=3, H=17, W=7, kt=2, pad_mode=ZEROS, groups=0, cache=False,
             modulation=False, residual=True, silu=False, stages=4, seed=3),
        dict(B=1, C=16, Co=4, T=1, H=3, W=3, kt=3, pad_mode=ZEROS, groups=0, cache=False,
             modulation=False, residual=False, silu=True, stages=4, seed=4),
        dict(B=1, C=16, Co=4, T=2, H=4, W=6, kt=1, pad_mode=REPLICATE, groups=1, cache=False,
             modulation=False, residual=False, silu=False, stages=3, seed=5),
    ]
    sys.exit(0 if all([run_case(**c) for c in cases]) else 1)
