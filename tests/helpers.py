"""Shared by the tests: the one comparison every parity test uses."""
import torch


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; fails on a NaN/Inf output (an unwritten, NaN-poisoned element)."""
    assert torch.isfinite(out).all(), "non-finite output (unwritten or overflowed elements)"
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()
