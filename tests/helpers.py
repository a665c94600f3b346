"""Shared by the tests: the one comparison every parity test uses, and strided views of inputs."""
import torch


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; fails on a NaN/Inf output (an unwritten, NaN-poisoned element)."""
    assert torch.isfinite(out).all(), "non-finite output (unwritten or overflowed elements)"
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def strided_view(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A non-contiguous tensor of ``t``'s values (``expand``: ``t``'s first slice, repeated).

    ``step``: every other element of the last dim, NaN (torch.empty is poisoned in tests) between;
    ``slice``: a window of a NaN-padded tensor along dim 1; ``expand``: stride 0 along the first dim
    longer than 1; ``transpose``: the last two dims longer than 1 stored transposed;
    ``channels_last_3d``: 5-D only."""
    if kind == "step":
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)  # NaN (poisoned) in between
        wide[..., ::2] = t
        return wide[..., ::2]
    if kind == "slice":
        padded = torch.empty(t.shape[0], t.shape[1] + 3, *t.shape[2:], dtype=t.dtype)
        padded[:, 1:1 + t.shape[1]] = t
        return padded[:, 1:1 + t.shape[1]]
    if kind == "expand":
        dim = next(d for d, n in enumerate(t.shape) if n > 1)
        return t.narrow(dim, 0, 1).expand(t.shape)
    if kind == "transpose":  # the last two dims longer than 1
        a, b = [d for d, n in enumerate(t.shape) if n > 1][-2:]
        return t.transpose(a, b).contiguous().transpose(a, b)
    assert kind == "channels_last_3d"
    return t.contiguous(memory_format=torch.channels_last_3d)


def view_kinds(t: torch.Tensor) -> list[str]:
    """The kinds of ``strided_view`` that give ``t`` a non-contiguous layout."""
    long_dims = sum(n > 1 for n in t.shape)
    return (["step", "expand"] + (["slice"] if t.dim() >= 2 else []) + (["transpose"] if long_dims >= 2 else [])
            + (["channels_last_3d"] if t.dim() == 5 and not strided_view(t, "channels_last_3d").is_contiguous() else []))


def tensor_args(inputs: dict):
    """(argument, index in a tuple argument or None, tensor) of an op's keyword inputs."""
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            yield name, None, value
        elif isinstance(value, tuple):
            for i, t in enumerate(value):
                if isinstance(t, torch.Tensor):
                    yield name, i, t


def replaced(inputs: dict, name: str, index, t) -> dict:
    """``inputs`` with argument ``name`` (element ``index`` of it when it is a tuple) set to ``t``."""
    out = dict(inputs)
    if index is None:
        out[name] = t
    else:
        out[name] = tuple(t if i == index else v for i, v in enumerate(inputs[name]))
    return out


def randomize(module, seed, scale=0.2):
    """Fresh random values in every parameter (LayerNorm weights too), so no mapping hides behind 1/0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def copy_of(model, how: str):
    """``model`` through ``copy.deepcopy`` (how="deepcopy") or a ``torch.save``/``torch.load`` round trip."""
    import copy
    import io

    if how == "deepcopy":
        return copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)
