"""Context parallelism (Ulysses) for the CogVideoX attention, over ``torch.distributed``.

Each rank of a process group holds a contiguous slice of the tokens of the ``[text ; video]``
sequence (``torch.tensor_split`` order: rank r holds slice r, the first ``S % world`` ranks one token
more). For the attention, one ``all_to_all_single`` turns the local q, k, v ``[B, S_r, H, D]`` into
the whole sequence for ``H / world`` heads, ``rope3d_attention`` (our fused QK-norm + RoPE3D +
attention, any backend) runs there with the global ``text_len`` and the full RoPE tables (global
positions), and a second ``all_to_all_single`` turns the output back into the rank's token slice.
Everything else in a block (expert adaLN, FFN, gates, residuals) is token-local and runs on the slice.

* Transport: ``torch.distributed`` collectives only (NCCL on GPUs, gloo on CPU); nothing home-made.
* Sequence lengths that do not divide by the world size are handled: per-rank lengths go to
  ``all_to_all_single`` as unequal split sizes (no padding, no mask needed). Every rank needs at
  least one token.
* Head counts that do not divide by the world size are refused with a ValueError.
* Forward only (inference): ``torch.distributed.all_to_all_single`` does not carry gradients.

Entry points::

    ulysses_rope3d_attention(q_local, k_local, v_local, text_len=..., cos=..., sin=..., group=...)
    shard_sequence(x, group) / gather_sequence(x, group)      # token slices <-> the full sequence
    with enable_context_parallel(model, group):               # our CogVideoXTransformer
        out = model(latents, text_embeddings, timestep)       # same inputs on every rank

For diffusers' ``CogVideoXTransformer3DModel``, diffusers' own ``enable_parallelism`` hosts this
(see ``cogvideox_kernels.integrations.diffusers``): there each rank holds ``[text_r ; video_r]`` and
``ulysses_rope3d_attention(..., text_lens=...)`` reorders the gathered tokens to the global sequence.

``enable_context_parallel`` leaves every forward as it is: module hooks cut the first block's input
(the embedded full sequence) to the rank's slice and give every block the rank's local text length
for its token-local work, every ``RoPE3DAttention`` gets the Ulysses attention as its ``attention``
function (the module's projections stay its own), and the last block's output is gathered back, so
the final norm, projection and unpatchify run on full tensors and every rank returns the full output.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .ops.attention import rope3d_attention

__all__ = ["ulysses_rope3d_attention", "shard_sequence", "gather_sequence", "sequence_split_sizes",
           "enable_context_parallel", "disable_context_parallel", "ContextParallelHandle", "UlyssesAttention"]


# --------------------------------------------------------------------------------------------
# helpers


def _group_rank_world(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("cogvideox_kernels.parallel needs torch.distributed to be initialised "
                           "(torch.distributed.init_process_group) on every rank")
    return dist.get_rank(group), dist.get_world_size(group)


def sequence_split_sizes(seq_len: int, world_size: int) -> list[int]:
    """Per-rank token counts of a ``seq_len`` sequence over ``world_size`` ranks, in rank order,
    as ``torch.tensor_split`` cuts it (the first ``seq_len % world_size`` ranks hold one more)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len={seq_len!r} must be an int >= 0")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be an int >= 1")
    base, extra = divmod(seq_len, world_size)
    return [base + 1] * extra + [base] * (world_size - extra)


def _check_dim(name, x, dim):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for {name} of shape {tuple(x.shape)}")
    return dim % x.dim()


def shard_sequence(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous slice of the full tensor ``x`` along ``dim`` (the token dim, 1 for
    ``[B, S, ...]``), cut as :func:`sequence_split_sizes` says. No communication: every rank must
    pass the same full ``x``. Returns a contiguous tensor."""
    dim = _check_dim("x", x, dim)
    rank, world = _group_rank_world(group)
    if x.shape[dim] < world:
        raise ValueError(f"x has {x.shape[dim]} tokens along dim {dim} (shape {tuple(x.shape)}); splitting "
                         f"over world_size={world} ranks needs at least one token per rank")
    return x.tensor_split(world, dim=dim)[rank].contiguous()


def gather_sequence(x: torch.Tensor, group=None, dim: int = 1, seq_lens=None) -> torch.Tensor:
    """Concatenate every rank's slice along ``dim`` in rank order (the inverse of
    :func:`shard_sequence`); every rank gets the full tensor.

    ``seq_lens``: the per-rank lengths if known (e.g. ``sequence_split_sizes(S, world)``); else they
    are gathered first (one small extra collective). Slices may differ in length.
    """
    dim = _check_dim("x", x, dim)
    rank, world = _group_rank_world(group)
    if world == 1:
        return x
    if seq_lens is None:
        size = torch.tensor([x.shape[dim]], dtype=torch.int64, device=x.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        seq_lens = [int(s.item()) for s in sizes]
    seq_lens = _check_seq_lens(seq_lens, world)
    if seq_lens[rank] != x.shape[dim]:
        raise ValueError(f"seq_lens={seq_lens} gives rank {rank} {seq_lens[rank]} tokens but x has "
                         f"{x.shape[dim]} along dim {dim}")
    # Pad every slice to the longest so one all_gather of equal sizes serves any backend, then trim.
    longest = max(seq_lens)
    moved = x.movedim(dim, 0)
    if moved.shape[0] < longest:
        pad = moved.new_zeros((longest - moved.shape[0],) + tuple(moved.shape[1:]))
        moved = torch.cat((moved, pad), dim=0)
    moved = moved.contiguous()
    parts = [torch.empty_like(moved) for _ in range(world)]
    dist.all_gather(parts, moved, group=group)
    full = torch.cat([part[:n] for part, n in zip(parts, seq_lens)], dim=0)
    return full.movedim(0, dim)


def _check_seq_lens(seq_lens, world):
    if (not isinstance(seq_lens, (list, tuple)) or len(seq_lens) != world
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in seq_lens)):
        raise ValueError(f"seq_lens={seq_lens!r} must be {world} ints >= 1 (tokens per rank, in rank order)")
    return list(seq_lens)


# --------------------------------------------------------------------------------------------
# Ulysses attention


_ORDER_CACHE: dict = {}


def _chunk_order(seq_lens, text_lens, device):
    """(order, inverse): ``gathered[order]`` puts rank-ordered ``[text_r ; video_r]`` chunks into
    ``[text ; video]`` order and ``global[inverse]`` undoes it. Cached (a pure function of the sizes)."""
    key = (tuple(seq_lens), tuple(text_lens), str(device))
    if key not in _ORDER_CACHE:
        if len(_ORDER_CACHE) >= 64:
            _ORDER_CACHE.clear()
        starts = [sum(seq_lens[:j]) for j in range(len(seq_lens))]
        text = [torch.arange(s, s + t) for s, t in zip(starts, text_lens)]
        video = [torch.arange(s + t, s + n) for s, t, n in zip(starts, text_lens, seq_lens)]
        order = torch.cat(text + video)
        _ORDER_CACHE[key] = (order.to(device), torch.argsort(order).to(device))
    return _ORDER_CACHE[key]


def _tokens_to_heads(q, k, v, seq_lens, rank, world, group, order=None):
    """[B, S_r, H, D] x3 on each rank -> [B, S, H/world, D] x3 (all tokens, this rank's heads)."""
    B, S_r, H, D = q.shape
    Hl = H // world
    # Send buffer [world, S_r, 3, B, Hl, D]: chunk j (rank j's heads) is contiguous and token-major,
    # so the received chunks concatenate to the global token order whatever their lengths. One pass
    # over q, k, v (strided views are fine).
    send = torch.empty((world, S_r, 3, B, Hl, D), dtype=q.dtype, device=q.device)
    for i, t in enumerate((q, k, v)):
        send[:, :, i].copy_(t.unflatten(2, (world, Hl)).permute(2, 1, 0, 3, 4))
    recv = torch.empty((sum(seq_lens), 3, B, Hl, D), dtype=q.dtype, device=q.device)
    dist.all_to_all_single(recv, send.view(world * S_r, 3, B, Hl, D), output_split_sizes=seq_lens,
                           input_split_sizes=[S_r] * world, group=group)
    if order is not None:
        recv = recv.index_select(0, order[0])
    heads = recv.permute(1, 2, 0, 3, 4)  # [3, B, S, Hl, D], last dim contiguous
    return heads[0], heads[1], heads[2]


def _heads_to_tokens(out, seq_lens, rank, world, group, order=None):
    """[B, S, H/world, D] (all tokens, this rank's heads) -> [B, S_r, H, D] (this rank's tokens)."""
    B, S, Hl, D = out.shape
    S_r = seq_lens[rank]
    send = out.permute(1, 0, 2, 3)  # [S, B, Hl, D]: rank j's tokens are rows of chunk j
    send = send.contiguous() if order is None else send.index_select(0, order[1])
    recv = torch.empty((world * S_r, B, Hl, D), dtype=send.dtype, device=send.device)
    dist.all_to_all_single(recv, send, output_split_sizes=[S_r] * world, input_split_sizes=seq_lens,
                           group=group)
    return recv.view(world, S_r, B, Hl, D).permute(2, 1, 0, 3, 4).reshape(B, S_r, world * Hl, D)


def ulysses_rope3d_attention(q, k, v, *, text_len, cos=None, sin=None, q_norm=None, k_norm=None, eps=1e-6,
                             scale=None, group=None, seq_lens=None, text_lens=None, backend="auto",
                             precision="bf16"):
    """``rope3d_attention`` over a sequence split across the ranks of ``group`` (Ulysses).

    q, k, v: this rank's tokens ``[B, S_r, H, D]``, a contiguous slice of the global ``[text ; video]``
    sequence (rank order; see :func:`shard_sequence`). ``text_len``: the GLOBAL text length (the first
    ``text_len`` global tokens are text, wherever they fall). cos, sin: the FULL ``[S - text_len, D]``
    tables (global positions) or None. q_norm, k_norm: ``(weight, bias)`` of ``[D]`` (shared by the
    heads) or None. ``seq_lens``: per-rank token counts; if None they are ``sequence_split_sizes(S)``
    with ``S = text_len + cos.shape[0]`` when cos is given, else gathered (one small collective).
    ``text_lens``: for the other layout, where each rank holds a slice of the text AND a slice of the
    video, ``[text_r ; video_r]`` (how diffusers' CogVideoX blocks see their tokens under a context-
    parallel plan that splits text and video separately): the per-rank text counts (sum = text_len);
    ``seq_lens`` is then required. The output keeps the rank's layout.
    H must divide by the world size. ``precision`` as in ``rope3d_attention`` (each rank runs it on
    all tokens of its heads, so "int8" quantizes as on one GPU). Returns this rank's ``[B, S_r, H, D]``
    output. Every rank calls it with the same B, H, D, text_len, tables and norm weights.
    """
    rank, world = _group_rank_world(group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [B, S_local, H, D] tensor, got {shape}")
        if t.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but q has {tuple(q.shape)}")
    B, S_r, H, D = q.shape
    if world == 1:
        return rope3d_attention(q, k, v, text_len=text_len, cos=cos, sin=sin, q_norm=q_norm, k_norm=k_norm,
                                eps=eps, scale=scale, backend=backend, precision=precision)
    if H % world:
        raise ValueError(f"heads={H} (dim 2 of q) is not divisible by the context-parallel world size "
                         f"{world}; Ulysses gives each rank heads / world_size heads, so use a world size "
                         f"that divides {H}")
    if text_lens is not None and seq_lens is None:
        raise ValueError("text_lens (per-rank [text_r ; video_r] layout) needs seq_lens, the per-rank token counts")
    if seq_lens is None:
        if cos is not None and isinstance(text_len, int) and isinstance(cos, torch.Tensor) and cos.dim() == 2:
            seq_lens = sequence_split_sizes(text_len + cos.shape[0], world)
        else:
            size = torch.tensor([S_r], dtype=torch.int64, device=q.device)
            sizes = [torch.zeros_like(size) for _ in range(world)]
            dist.all_gather(sizes, size, group=group)
            seq_lens = [int(s.item()) for s in sizes]
    seq_lens = _check_seq_lens(seq_lens, world)
    if seq_lens[rank] != S_r:
        raise ValueError(f"rank {rank} holds S_local={S_r} tokens (dim 1 of q) but seq_lens={seq_lens} gives it "
                         f"{seq_lens[rank]}; shard the sequence with shard_sequence (torch.tensor_split order) "
                         "or pass the per-rank lengths as seq_lens")
    order = None
    if text_lens is not None:
        if (not isinstance(text_lens, (list, tuple)) or len(text_lens) != world
                or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= n
                       for t, n in zip(text_lens, seq_lens))
                or sum(text_lens) != text_len):
            raise ValueError(f"text_lens={text_lens!r} must be {world} ints, each in [0, seq_lens[r]] "
                             f"(seq_lens={seq_lens}), summing to text_len={text_len}")
        order = _chunk_order(seq_lens, text_lens, q.device)
    qh, kh, vh = _tokens_to_heads(q, k, v, seq_lens, rank, world, group, order)
    # The gathered sequence is the global one, so text_len and the tables apply unchanged; the op
    # checks them against the global length.
    out = rope3d_attention(qh, kh, vh, text_len=text_len, cos=cos, sin=sin, q_norm=q_norm, k_norm=k_norm,
                           eps=eps, scale=scale, backend=backend, precision=precision)
    return _heads_to_tokens(out, seq_lens, rank, world, group, order)


# --------------------------------------------------------------------------------------------
# our CogVideoXTransformer under context parallelism


class _CPState:
    """What the hooks of one model share during one forward."""

    def __init__(self, group, rank, world):
        self.group, self.rank, self.world = group, rank, world
        self.seq_lens = None  # per-rank token counts of the current forward
        self.text_len = None  # global text length of the current forward
        self.local_text_len = None

    def begin(self, seq_len, text_len):
        if seq_len < self.world:
            raise ValueError(f"the sequence has {seq_len} tokens (text + video); context parallelism over "
                             f"world_size={self.world} ranks needs at least one token per rank")
        self.seq_lens = sequence_split_sizes(seq_len, self.world)
        self.text_len = text_len
        start = sum(self.seq_lens[:self.rank])
        self.local_text_len = min(max(text_len - start, 0), self.seq_lens[self.rank])

    def end(self):
        self.seq_lens = self.text_len = self.local_text_len = None


class ContextParallelHandle:
    """Returned by :func:`enable_context_parallel`; ``remove()`` (or leaving the ``with``) undoes it."""

    def __init__(self, model, state, handles, attentions):
        # attentions: {RoPE3DAttention: the attention function it had before}
        self.model, self.state, self._handles, self._attentions = model, state, handles, attentions

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for attn, previous in self._attentions.items():
            attn.attention = previous
        self._handles, self._attentions = [], {}
        if getattr(self.model, "_cogvideox_context_parallel", None) is self:
            del self.model._cogvideox_context_parallel

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def _args_get(args, kwargs, index, name):
    return kwargs[name] if name in kwargs else args[index]


def _args_set(args, kwargs, index, name, value):
    if name in kwargs:
        kwargs[name] = value
    else:
        args = args[:index] + (value,) + args[index + 1:]
    return args, kwargs


class UlyssesAttention:
    """The attention function ``enable_context_parallel`` hands every ``RoPE3DAttention``: the same
    arguments as ``ops.rope3d_attention`` on the rank's tokens, run over the whole sequence with
    :func:`ulysses_rope3d_attention` (the module passes the local text length; the global one and
    the per-rank lengths come from the model's hooks)."""

    def __init__(self, state):
        self.state = state

    def __call__(self, q, k, v, *, text_len, cos=None, sin=None, q_norm=None, k_norm=None, eps=1e-6,
                 scale=None, backend="auto"):
        state = self.state
        if state.seq_lens is None:
            raise RuntimeError("this RoPE3DAttention runs under enable_context_parallel and can only be "
                               "called from inside the model's forward (the hooks set the sequence layout)")
        return ulysses_rope3d_attention(q, k, v, text_len=state.text_len, cos=cos, sin=sin, q_norm=q_norm,
                                        k_norm=k_norm, eps=eps, scale=scale, group=state.group,
                                        seq_lens=state.seq_lens, backend=backend)


def enable_context_parallel(model, group=None) -> ContextParallelHandle:
    """Run our ``CogVideoXTransformer`` with Ulysses context parallelism over ``group``.

    Every rank builds the same model (same weights) and calls it with the same full inputs; each
    rank runs the blocks on its slice of the tokens and returns the full output. Returns a handle
    that also works as a context manager; ``handle.remove()`` / :func:`disable_context_parallel`
    restore the single-process model. The number of heads must divide by the world size.
    """
    from .models.transformer import CogVideoXTransformer  # models sit below this module
    from .nn.attention import RoPE3DAttention

    if not isinstance(model, CogVideoXTransformer):
        raise TypeError(f"enable_context_parallel supports cogvideox_kernels' CogVideoXTransformer, got "
                        f"{type(model).__name__} (for diffusers' model see cogvideox_kernels.integrations.diffusers)")
    if getattr(model, "_cogvideox_context_parallel", None) is not None:
        raise ValueError("context parallelism is already enabled on this model; call remove() on its handle "
                         "(or disable_context_parallel(model)) first")
    rank, world = _group_rank_world(group)
    if model.num_heads % world:
        raise ValueError(f"num_heads={model.num_heads} is not divisible by the context-parallel world size "
                         f"{world}; Ulysses needs heads divisible by the number of ranks")
    state = _CPState(group, rank, world)
    blocks = list(model.blocks)
    handles = []

    # CogVideoXBlock.forward(x, temb, text_len, rope)
    def first_pre(module, args, kwargs):
        x = _args_get(args, kwargs, 0, "x")
        state.begin(x.shape[1], int(_args_get(args, kwargs, 2, "text_len")))
        args, kwargs = _args_set(args, kwargs, 0, "x", x.tensor_split(world, dim=1)[rank].contiguous())
        return args, kwargs

    def every_pre(module, args, kwargs):
        text_len = _args_get(args, kwargs, 2, "text_len")
        if state.seq_lens is None or text_len != state.text_len:
            raise RuntimeError("enable_context_parallel: a block ran outside the model's forward or with a "
                               "different text_len than the first block")
        return _args_set(args, kwargs, 2, "text_len", state.local_text_len)

    def last_post(module, args, kwargs, output):
        try:
            return gather_sequence(output, group, dim=1, seq_lens=state.seq_lens)
        finally:
            state.end()

    handles.append(blocks[0].register_forward_pre_hook(first_pre, with_kwargs=True))
    for block in blocks:
        handles.append(block.register_forward_pre_hook(every_pre, with_kwargs=True))
    handles.append(blocks[-1].register_forward_hook(last_post, with_kwargs=True))
    attentions = {m: m.attention for m in model.modules() if isinstance(m, RoPE3DAttention)}
    ulysses = UlyssesAttention(state)
    for attn in attentions:
        attn.attention = ulysses
    handle = ContextParallelHandle(model, state, handles, attentions)
    model._cogvideox_context_parallel = handle
    return handle


def disable_context_parallel(model) -> None:
    """Undo :func:`enable_context_parallel` on ``model`` (nothing happens if it is not enabled)."""
    handle = getattr(model, "_cogvideox_context_parallel", None)
    if handle is not None:
        handle.remove()

