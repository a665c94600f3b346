"""Where the peak memory of ``apply(vae)``'s decode comes from, without a GPU (issue 14).

The CogVideoX-5B VAE config is built on the meta device (no values, real sizes) and decoded at full clip
size through ``apply(vae)``. The fused ops are replaced by fakes that allocate exactly what the CUDA path
allocates (``native.cuda_workspace``: contiguous copies, packed weights, the channels-last activation
buffer, statistics; output and cache), so the tracked sizes are those of the GPU run; cuDNN / allocator
workspaces and fragmentation are not modelled. A TorchDispatchMode counts the bytes of every storage
created during the decode until it is freed (weights and latents are not counted: "above the inputs", as
the benchmark reports) and, at the peak, records every live storage with the module and op that made it.

    python benchmarks/experiments/vae_decode_memory.py [--frames 49 --height 480 --width 720] [--diffusers]

The spatial norms' conv_y / conv_b run as on the GPU: fused into the op (the default), or module calls
with COGVIDEOX_KERNELS_VAE_FUSED_MODULATION_CUDA=0. ``--route cudnn`` (default, as ``apply(vae)`` runs the 5B
VAE's ResNet convs on CUDA since a9187e9) allocates what the cuDNN route allocates (the padded channels-last
activation of T + kt - 1 frames, cuDNN's channels-last output before the transpose-add, the new cache);
``--route fused`` what the fused CUDA kernel allocates. ``--vae-cache host`` models ``apply(vae,
vae_cache="host")``: the offloaded caches cost no device memory between their copies (host buffers are not
counted), a prefetched cache costs its size from the start of the stage before the one that reads it.
"""
from __future__ import annotations

import argparse
import collections
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GiB = 1024 ** 3


class LiveBytes(TorchDispatchMode):
    def __init__(self, stack):
        super().__init__()
        self.stack, self.live, self.now, self.peak, self.at_peak = stack, {}, 0, 0, None
        self.per_module = collections.defaultdict(int)  # module -> highest total while it ran
        self.watch, self.at_watch = None, None  # a module whose own peak is reported too

    def _free(self, key):
        self.now -= self.live.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        where = self.stack[-1] if self.stack else "<top>"
        given = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in self.live or key in given or st.nbytes() == 0:  # (views of weights / inputs: not new)
                continue
            self.live[key] = (st.nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", ""), where,
                              func.__name__)
            weakref.finalize(st, self._free, key)
            self.now += st.nbytes()
        for m in self.stack:
            if self.now > self.per_module[m]:
                self.per_module[m] = self.now
                if m == self.watch:
                    self.at_watch = (where, func.__name__, sorted(self.live.values(), key=lambda v: -v[0]))
        if self.now > self.peak:
            self.peak = self.now
            self.at_peak = (where, func.__name__, sorted(self.live.values(), key=lambda v: -v[0]))
        return out


def install_fakes(integration, route="cudnn"):
    """Fakes of the fused ops for meta tensors, allocating what the CUDA launchers (``route="fused"``) or the
    cuDNN route (``"cudnn"``) allocate."""
    from cogvideox_kernels.ops.vae_conv import native

    def vae_conv3d(x, weight, bias=None, *, num_groups=0, norm_weight=None, norm_bias=None, eps=1e-6,
                   scale=None, shift=None, silu=False, cache=None, pad_mode="replicate", residual=None,
                   backend="auto", norm_coef=None, out=None, **modulation):
        if route == "cudnn":  # cudnn_route._run: stats, act (T + kt - 1 frames, channels-last), conv, transpose-add
            B, C, T, H, W = x.shape
            C_out, _, kt = weight.shape[:3]
            coef = None
            if num_groups:
                coef = vae_group_norm_coef(x, num_groups)
            act = x.new_empty((B, T + kt - 1, H, W, C))
            new_cache = x.new_empty((B, C, kt - 1, H, W))
            y_cl = x.new_empty((B, T, H, W, C_out))
            del act, coef
            y = out if out is not None else x.new_empty((B, C_out, T, H, W))
            del y_cl
            return y, new_cache
        x = x if num_groups else native.frame_slice(x)  # what the launcher copies (see native.vae_conv3d_native)
        x = x.contiguous() if num_groups else x
        scale, shift, residual = native.frame_slice(scale), native.frame_slice(shift), native.frame_slice(residual)
        y = None if out is None or native.frames_of(out) < 0 else out
        tensors = native.cuda_tensors(x, weight, bias=bias, norm_weight=norm_weight, norm_bias=norm_bias,
                                      scale=scale, shift=shift, cache=cache, residual=residual,
                                      num_groups=num_groups, norm_coef=norm_coef, y=y,
                                      modulation={k: v for k, v in modulation.items() if v is not None})
        return (out if out is not None else tensors["y"]), tensors["new_cache"]

    def causal_conv3d(x, weight, bias=None, *, stride=1, pad_mode="replicate", cache=None, backend="auto"):
        if weight.shape[3:] != (1, 1):  # not covered by the CUDA kernel: diffusers' cat + cuDNN conv on a GPU
            padded = torch.cat([cache if cache is not None else x[:, :, :1]] * (1 if cache is not None else 2)
                               + [x], dim=2)
            new_cache = padded[:, :, -2:].clone()
            return torch.nn.functional.conv3d(padded, weight, bias, padding=(0, 1, 1)), new_cache
        x = x.contiguous()
        B, C, T, H, W = x.shape
        C_out, _, kt = weight.shape[:3]
        packed = weight.reshape(C_out, C, kt).transpose(1, 2).contiguous()  # noqa: F841 (as the launcher)
        y = x.new_empty((B, C_out, (T - 1) // stride + 1, H, W))
        return y, x.new_empty((B, C, kt - 1, H, W))

    def vae_group_norm_coef(x, num_groups, norm_weight=None, norm_bias=None, eps=1e-6, backend="auto"):
        splits = native._stat_splits(x, num_groups)
        partial = torch.empty(x.shape[0] * num_groups * splits * 2, dtype=torch.float64, device=x.device)  # noqa
        return torch.empty((x.shape[0], x.shape[1], 2), dtype=torch.float32, device=x.device)

    from cogvideox_kernels.integrations.diffusers import resnet

    resnet.vae_group_norm_coef = vae_group_norm_coef
    integration.vae_conv3d = vae_conv3d
    integration.causal_conv3d = causal_conv3d
    from cogvideox_kernels.integrations.diffusers import weights

    weights._plain = lambda t: t is None or (type(t) in (torch.Tensor, torch.nn.Parameter)  # meta is fine here
                                             and t.dtype in weights.FLOAT_DTYPES)


def install_offload_fakes():
    """cache_offload on meta tensors: a stored cache keeps no device storage (its host copy is not counted),
    a loaded one is a new device tensor made when its copy is issued."""
    from cogvideox_kernels.integrations.diffusers import cache_offload, resnet

    class FakeStreams:
        def store(self, t):
            return cache_offload.HostCache(object(), tuple(t.shape), t.dtype, t.device, None)

        def load(self, hc):
            return torch.empty(hc.shape, dtype=hc.dtype, device=hc.device), None

    cache_offload._streams = lambda device: FakeStreams()
    cache_offload.offload_device = lambda device: True  # (the model's tensors are on the meta device)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--diffusers", action="store_true", help="diffusers' own decode (not patched)")
    p.add_argument("--encode", action="store_true")
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--stage", default=None, help="also list what is live at this module's own peak")
    p.add_argument("--chunk-mib", type=int, default=None, help="resnet.CHUNK_BYTES for this run")
    p.add_argument("--route", choices=("cudnn", "fused"), default="cudnn", help="what the ResNet convs allocate")
    p.add_argument("--vae-cache", choices=("device", "host"), default="device", help="apply(vae, vae_cache=...)")
    a = p.parse_args(argv)
    from diffusers import AutoencoderKLCogVideoX

    from cogvideox_kernels.integrations import diffusers as integration

    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX().eval().requires_grad_(False).to(torch.bfloat16)
    if a.chunk_mib:
        from cogvideox_kernels.integrations.diffusers import resnet

        resnet.CHUNK_BYTES = a.chunk_mib << 20
    if not a.diffusers:
        install_fakes(integration, a.route)
        if a.vae_cache == "host":
            install_offload_fakes()
        integration.apply(vae, backend="reference", vae_cache=a.vae_cache)
        from cogvideox_kernels.integrations.diffusers import resnet
        from cogvideox_kernels.ops.vae_conv import native

        if not native.fused_modulation_cuda():  # as on the GPU: conv_y / conv_b as module calls when switched off
            resnet.KernelResnetForward._fused_modulation_index = lambda *args: None
    stack = []
    names = {m: n or "vae" for n, m in vae.named_modules()}
    # the module stack through Module.__call__ itself: hooks (per module or global) would count as
    # unknown hooks and send blocks to diffusers' forward
    call = torch.nn.Module.__call__

    def traced_call(mod, *args, **kwargs):
        stack.append(names.get(mod, "?"))
        try:
            return call(mod, *args, **kwargs)
        finally:
            stack.pop()

    torch.nn.Module.__call__ = traced_call
    if a.encode:
        x = torch.empty(1, 3, a.frames, a.height, a.width, dtype=torch.bfloat16, device="meta")
        run = lambda: vae.encode(x).latent_dist.mode()  # noqa: E731
    else:
        x = torch.empty(1, 16, (a.frames - 1) // 4 + 1, a.height // 8, a.width // 8, dtype=torch.bfloat16,
                        device="meta")
        run = lambda: vae.decode(x).sample  # noqa: E731
    mode = LiveBytes(stack)
    mode.watch = a.stage
    with torch.no_grad(), mode:
        out = run()
    where, op, live = mode.at_watch if a.stage else mode.at_peak
    what = "encode" if a.encode else "decode"
    print(f"{'diffusers' if a.diffusers else 'apply(vae)'} {what} {a.frames}x{a.height}x{a.width}: "
          f"peak {mode.peak / GiB:.2f} GiB above weights and inputs (output {out.untyped_storage().nbytes() / GiB:.2f})")
    print(f"at the peak: in {where}, op {op}; live storages (largest first):")
    for nbytes, shape, dtype, made_in, made_by in live[:a.top]:
        print(f"  {nbytes / GiB:6.3f} GiB {str(list(shape)):28s} {dtype:9s} from {made_by} in {made_in}")
    rest = sum(v[0] for v in live[a.top:])
    print(f"  {rest / GiB:6.3f} GiB in {max(0, len(live) - a.top)} more")
    print("highest total while each stage ran (GiB):")
    for n, v in mode.per_module.items():
        if n.count(".") <= 2 and ("resnets" not in n or n.endswith(("resnets.0", "resnets.3"))):
            print(f"  {v / GiB:6.2f}  {n}")


if __name__ == "__main__":
    main()
