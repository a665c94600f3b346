"""``apply(..., precision="int8")``: the attention processors call ``rope3d_attention`` with the
8-bit precision (on CPU its float32 emulation), the output changes but stays close, and the
option is part of what a second ``apply`` must match."""
import pytest
import torch

pytest.importorskip("diffusers")
from tiny import OpSpy, make_transformer, rel_err, transformer_inputs  # noqa: E402

from cogvideox_kernels.integrations import diffusers as integration  # noqa: E402


def test_apply_precision_int8(monkeypatch):
    model = make_transformer("5b")
    inputs = transformer_inputs(model)
    with torch.no_grad():
        ref = model(**inputs)[0]
        spy = OpSpy(monkeypatch)
        integration.apply(model, backend="reference", ffn=False, precision="int8")
        out = model(**inputs)[0]
    assert len(spy.attention_calls) == 2
    assert all(kw["precision"] == "int8" for _, kw in spy.attention_calls)
    assert 1e-5 < rel_err(out, ref) < 5e-2  # the 8-bit path ran, and stays close
    with pytest.raises(ValueError, match="already patched"):
        integration.apply(model, backend="reference", ffn=False)  # bf16 now: other options
    integration.apply(model, backend="reference", ffn=False, precision="int8")  # same: fine
    with pytest.raises(ValueError, match="precision='fp4'"):
        integration.apply(make_transformer("5b"), precision="fp4")


def test_apply_precision_int8_plus_fp8(monkeypatch):
    """The mode with every 8-bit path: attention int8 and the FFN fp8 in the same model."""
    model = make_transformer("5b")
    inputs = transformer_inputs(model)
    with torch.no_grad():
        spy = OpSpy(monkeypatch)
        integration.apply(model, backend="reference", precision="int8+fp8")
        model(**inputs)
    assert spy.attention_calls and all(kw["precision"] == "int8" for _, kw in spy.attention_calls)
    assert spy.ffn_calls and all(kw["precision"] == "fp8" for _, kw in spy.ffn_calls)
