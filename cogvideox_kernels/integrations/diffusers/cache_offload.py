"""The VAE decoder's conv caches in pinned host memory between frame batches (``apply(vae, vae_cache="host")``).

diffusers decodes a clip in frame batches and carries, from one batch to the next, the last kt-1 = 2 input
frames of every causal (3,3,3) conv (the "conv cache"). For the CogVideoX VAE at full resolution that set is
the largest thing alive on the GPU for the whole decode: ~2.6 GiB at 49x480x720, ~7.9 GiB at 81x768x1360
(memory model, benchmarks/experiments/vae_decode_memory.py). With ``vae_cache="host"`` the patched decoder
(resnet.KernelDecoderForward) copies each large cache tensor to pinned host memory as soon as the module that
made it returns (device -> host on a side stream, overlapped with the decoder's work; the device memory is freed
once the copy has run; a ResNet block's first conv's cache as soon as that conv is queued), and in the next frame
batch copies it back one decoder stage ahead of the stage that reads it (host -> device on a second side stream;
for a ResNet block, issued after the block before it has queued its first conv). The values are the same bytes:
the output is bit for bit the output with the caches on the device.

What it costs: pinned host memory of about one cache set (kept in a pool for the next decode: ``release()``
frees it), ~2 x one cache set of PCIe traffic per frame batch (H200, PCIe 5 x16: 55 GB/s each way alone, 46.5 GB/s
each way at once, 50 GB/s beside a cuDNN conv that slowed by 1%; benchmarks/results/h200_s8/), and the first
decode's pinning of the pool (about 0.5 s per GiB on the benchmark's VM).

One rule for everything the decode runs beside these copies: no host -> device copy on the compute stream. The
copy engine serves host -> device copies in order, so a small one (a few ints) queued on the compute stream waits
behind a cache load of hundreds of MiB, and the compute stream with it (H200, 49x480x720: 1.16 s instead of 0.94
before the ops kept their zq index on the device; benchmarks/experiments/host_copy_contention.py finds them).

Caches below ``MIN_BYTES`` and anything not a contiguous CUDA tensor stay where they are. The dict diffusers
carries between batches then holds ``HostCache`` entries for the offloaded tensors; the patched decoder turns
them back into device tensors before any module (ours or diffusers') sees them, so only code that reads the
returned cache itself sees the difference (``HostCache.tensor()`` gives the tensor).
"""
from __future__ import annotations

import threading

import torch

MIN_BYTES = 8 << 20  # cache tensors from this size on are offloaded


class HostCache:
    """One conv-cache tensor held in pinned host memory (see the module doc). ``tensor()`` brings it back to its
    device (ordered on the current stream); each is read once, like the caches of the patched ResNet blocks."""

    __slots__ = ("host", "shape", "dtype", "device", "stored", "loaded")

    def __init__(self, host, shape, dtype, device, stored):
        self.host, self.shape, self.dtype, self.device, self.stored = host, shape, dtype, device, stored
        self.loaded = None  # (device tensor, event) once its host -> device copy is issued

    def __del__(self):
        # never read (diffusers drops the last frame batch's caches): the buffer goes back to the pool, to be
        # written again only after this cache's device -> host copy
        try:
            host = self.host
            if isinstance(host, torch.Tensor) and _POOL.owns(host):
                self.host = None
                _POOL.give(host, self.stored)
        except Exception:  # (interpreter shutdown)
            pass

    def __repr__(self):
        return f"HostCache({list(self.shape)}, {self.dtype}, {self.device}, {'loaded' if self.loaded else 'on host'})"

    def prefetch(self):
        """Issue the host -> device copy (on the offload streams' second stream) if not done yet."""
        if self.loaded is None:
            if self.host is None:
                raise ValueError("this HostCache was already read (a conv cache is read once)")
            self.loaded = _streams(self.device).load(self)
            self.host = None

    def tensor(self):
        """The cache as a device tensor, ordered on the current stream; the HostCache is spent afterwards."""
        self.prefetch()
        t, event = self.loaded
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        self.loaded = (None, None)
        if t is None:
            raise ValueError("this HostCache was already read (a conv cache is read once)")
        return t


class _Pool:
    """Exact-size pinned host buffers, reused across frame batches and decodes. A buffer goes back with the event
    of the last copy that reads it; the next copy into it waits for that event."""

    def __init__(self):
        self.free = {}  # nbytes -> [(buffer, event or None)]
        self.registered = []  # (keeper tensor, pointer) of the cudaHostRegister'ed buffers
        self.made = {}  # data_ptr -> nbytes of every buffer this pool made
        self.slab = None  # [pinned slab, bytes used] buffers are carved from
        self.make = None  # (None: _pinned; the probe sets _registered)
        self.lock = threading.Lock()

    def owns(self, buf) -> bool:
        return self.made.get(buf.data_ptr()) == buf.numel()

    def made_bytes(self) -> int:
        """Pinned host bytes this pool has made (in the pool or holding a cache now)."""
        return sum(self.made.values())

    def take(self, nbytes):
        with self.lock:
            bucket = self.free.get(nbytes)
            if bucket:
                return bucket.pop()
        buf = (self.make or _pinned)(nbytes, self)
        self.made[buf.data_ptr()] = nbytes
        return buf, None

    def give(self, buf, event):
        with self.lock:
            self.free.setdefault(buf.numel(), []).append((buf, event))

    def nbytes(self):
        with self.lock:
            return sum(b.numel() for bucket in self.free.values() for b, _ in bucket)

    def release(self):
        """Drop the pooled buffers and unpin what was pinned in place; a buffer holding a cache now stays valid
        (as pageable memory) and is freed with its cache instead of coming back."""
        with self.lock:
            self.made.clear()
            self.free.clear()
            self.slab = None
            keep, self.registered = self.registered, []
        if keep:
            torch.cuda.synchronize()
            cudart = torch.cuda.cudart()
            for _, ptr in keep:
                cudart.cudaHostUnregister(ptr)


_POOL = _Pool()


ARENA_BYTES = 1 << 30  # pinned host memory is taken from torch's pinned allocator in slabs of this size


def _pinned(nbytes, pool):
    """A pinned uint8 host buffer of exactly ``nbytes``, carved from a pinned slab of ARENA_BYTES (or of its own
    size when larger) made by torch's pinned allocator: that allocator rounds each request up to a power of two
    (up to 2x the host memory per cache tensor), a slab once. (benchmarks/experiments/vae_cache_offload_probe.py
    compares it with memory pinned in place by cudaHostRegister, ``_registered``.)"""
    slab = pool.slab
    if slab is None or slab[1] + nbytes > slab[0].numel():
        size = max(nbytes, ARENA_BYTES)
        slab = pool.slab = [torch.empty(size, dtype=torch.uint8, pin_memory=True), 0]
    buf = slab[0][slab[1]:slab[1] + nbytes]
    slab[1] += (nbytes + 4095) // 4096 * 4096
    return buf


def _registered(nbytes, pool):
    """(For the probe) a pinned buffer of exactly ``nbytes`` pinned in place with cudaHostRegister."""
    page = 4096
    keeper = torch.empty(nbytes + page, dtype=torch.uint8)
    offset = (-keeper.data_ptr()) % page
    buf = keeper[offset:offset + nbytes]
    if int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)) != 0:
        raise RuntimeError("cudaHostRegister failed")
    pool.registered.append((keeper, buf.data_ptr()))
    return buf


class _Streams:
    """The two side streams of one device: device -> host (``store``) and host -> device (``load``)."""

    def __init__(self, device):
        self.device = device
        self.d2h = torch.cuda.Stream(device)
        self.h2d = torch.cuda.Stream(device)

    def store(self, t):
        cur = torch.cuda.current_stream(self.device)
        buf, ready = _POOL.take(t.numel() * t.element_size())
        self.d2h.wait_stream(cur)  # t is complete
        if ready is not None:
            self.d2h.wait_event(ready)  # the buffer's last reader is done
        with torch.cuda.stream(self.d2h):
            buf.copy_(t.reshape(-1).view(torch.uint8), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.d2h)
        t.record_stream(self.d2h)  # the device memory is reused only after the copy
        return HostCache(buf, tuple(t.shape), t.dtype, t.device, done)

    def load(self, hc):
        cur = torch.cuda.current_stream(self.device)
        t = torch.empty(hc.shape, dtype=hc.dtype, device=hc.device)
        self.h2d.wait_stream(cur)  # t's memory is free of the work queued before it on the current stream
        self.h2d.wait_event(hc.stored)
        with torch.cuda.stream(self.h2d):
            t.reshape(-1).view(torch.uint8).copy_(hc.host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.h2d)
        t.record_stream(self.h2d)
        _POOL.give(hc.host, done)
        return t, done


_STREAMS = {}


def _streams(device) -> _Streams:
    key = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    s = _STREAMS.get(key)
    if s is None:
        s = _STREAMS[key] = _Streams(torch.device("cuda", key))
    return s


def offload_device(device) -> bool:
    """Whether caches on ``device`` are offloaded (CUDA devices; the CPU tests replace this and ``_streams``)."""
    return device.type == "cuda"


def offloadable(t) -> bool:
    return (isinstance(t, torch.Tensor) and type(t) is torch.Tensor and offload_device(t.device)
            and t.is_contiguous() and t.numel() * t.element_size() >= MIN_BYTES and not t.requires_grad)


def store(tree):
    """``tree`` (a cache: dict / tuple / list / tensor / None) with every offloadable tensor replaced by a
    HostCache whose device -> host copy is issued; the tree's other entries as they are."""
    if isinstance(tree, dict):
        return {k: store(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(store(v) for v in tree)
    if offloadable(tree):
        return _streams(tree.device).store(tree)
    return tree


def prefetch(tree):
    """Issue the host -> device copies of the HostCache entries of ``tree`` (the next stage's cache)."""
    if isinstance(tree, dict):
        for v in tree.values():
            prefetch(v)
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            prefetch(v)
    elif isinstance(tree, HostCache):
        tree.prefetch()


def load(tree):
    """``tree`` with its HostCache entries as device tensors, ordered on the current stream (dicts are changed in
    place and returned, so that a block consuming its cache dict frees what it read; the HostCaches are spent)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            tree[k] = load(v)
        return tree
    if isinstance(tree, (tuple, list)):
        return type(tree)(load(v) for v in tree)
    if isinstance(tree, HostCache):
        return tree.tensor()
    return tree


def holds_host(tree) -> bool:
    if isinstance(tree, dict):
        return any(holds_host(v) for v in tree.values())
    if isinstance(tree, (tuple, list)):
        return any(holds_host(v) for v in tree)
    return isinstance(tree, HostCache)


def pooled_bytes() -> int:
    """Pinned host bytes waiting in the pool (not counting buffers that hold a cache now)."""
    return _POOL.nbytes()


def made_bytes() -> int:
    """Pinned host bytes made for caches so far (pooled or in use)."""
    return _POOL.made_bytes()


def release():
    """Free the pinned host buffers the pool keeps for the next decode."""
    _POOL.release()


__all__ = ["HostCache", "MIN_BYTES", "store", "prefetch", "load", "holds_host", "offloadable", "pooled_bytes",
           "release"]
