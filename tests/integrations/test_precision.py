"""``apply(..., precision=)``: under "fp8" / "int8-ffn" the FFN half of each block runs ``expert_ffn(precision="fp8" /
"int8")``; the mode
is validated before anything changes and travels with copies of the patched model."""
import pytest
import torch

pytest.importorskip("diffusers")
from tiny import OpSpy, make_transformer, rel_err, transformer_inputs  # noqa: E402

from cogvideox_kernels.integrations import diffusers as integration  # noqa: E402
from cogvideox_kernels.integrations.diffusers import state  # noqa: E402
from helpers import copy_of  # noqa: E402


@pytest.mark.parametrize("mode,ffn", [("fp8", "fp8"), ("int8-ffn", "int8")])
def test_8bit_mode_reaches_expert_ffn(monkeypatch, mode, ffn):
    model = make_transformer("5b")
    inputs = transformer_inputs(model)
    with torch.no_grad():
        ref = model(**inputs)[0]
        spy = OpSpy(monkeypatch)
        integration.apply(model, backend="reference", precision=mode)
        out = model(**inputs)[0]
        assert len(spy.ffn_calls) == 2 and all(kw["precision"] == ffn for _, kw in spy.ffn_calls)
        assert all(kw["precision"] == "bf16" for _, kw in spy.attention_calls)
        assert 1e-4 < rel_err(out, ref) < 5e-2  # lossy, but the same function
        with pytest.raises(ValueError, match="already patched"):  # another mode needs remove() first
            integration.apply(model, backend="reference")
        copied = copy_of(model, "deepcopy")
        assert torch.equal(copied(**inputs)[0], out)
        integration.remove(model)
        integration.apply(model, backend="reference")
        assert rel_err(model(**inputs)[0], ref) <= 1e-5
        assert spy.ffn_calls[-1][1]["precision"] == "bf16"


def test_unknown_precision_refused_before_patching():
    model = make_transformer("2b")
    for bad in ("int3", "FP8", None):
        with pytest.raises(ValueError, match="precision"):
            integration.apply(model, precision=bad)
    assert not integration.is_patched(model)
    assert state.op_precision("fp8", "expert_ffn") == "fp8" and state.op_precision("int8-ffn", "expert_ffn") == "int8"
    assert all(set(ops) == {"rope3d_attention", "expert_ffn", "linear"} for ops in state.PRECISION_MODES.values())
    assert [m for m, ops in state.PRECISION_MODES.items() if ops["linear"] != "bf16"] == ["fp8-all"]


@pytest.mark.parametrize("mode,ffn", [("fp8", "fp8"), ("int8-ffn", "int8")])
def test_8bit_kernels_in_a_bf16_model(interpret, monkeypatch, mode, ffn):
    """bf16 model, backend='triton': the FFN halves run the 8-bit Triton path (interpreter; fp8's GEMMs
    emulated, int8's in the Triton kernel)."""
    model = make_transformer("5b")
    inputs = transformer_inputs(model)
    with torch.no_grad():
        ref = model(**inputs)[0]
        model = model.to(torch.bfloat16)
        bf16_inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                       for k, v in inputs.items()}
        integration.apply(model, backend="triton")
        bf16 = model(**bf16_inputs)[0]
        integration.remove(model)
        spy = OpSpy(monkeypatch)
        integration.apply(model, backend="triton", precision=mode)
        out = model(**bf16_inputs)[0]
    assert len(spy.ffn_calls) == 2 and all(kw["precision"] == ffn for _, kw in spy.ffn_calls)
    assert rel_err(bf16, ref) < rel_err(out, ref) < 1e-1


def test_fp8_all_runs_the_projections_in_fp8(interpret, monkeypatch):
    """precision="fp8-all": the fused attention half's adaln_linear / gated_linear get precision="fp8" (the FFN
    fp8 too); "fp8" leaves them exact; the output stays the model's function."""
    model = make_transformer("5b")
    inputs = transformer_inputs(model)
    calls = []
    for name in ("adaln_linear", "gated_linear"):
        real = getattr(integration, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, kwargs.get("precision", "bf16")))
            return _real(*args, **kwargs)
        monkeypatch.setattr(integration, name, spy)
    with torch.no_grad():
        ref = model(**inputs)[0]
        model = model.to(torch.bfloat16)
        bf16_inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                       for k, v in inputs.items()}
        integration.apply(model, backend="triton", precision="fp8")
        ffn_only = model(**bf16_inputs)[0]
        assert calls and {p for _, p in calls} == {"bf16"}
        integration.remove(model)
        calls.clear()
        spy = OpSpy(monkeypatch)
        integration.apply(model, backend="triton", precision="fp8-all")
        out = model(**bf16_inputs)[0]
    assert sorted(set(calls)) == [("adaln_linear", "fp8"), ("gated_linear", "fp8")] and len(calls) == 4
    assert all(kw["precision"] == "fp8" for _, kw in spy.ffn_calls)
    assert not torch.equal(out, ffn_only)
    assert rel_err(ffn_only, ref) < rel_err(out, ref) * 3 and rel_err(out, ref) < 1e-1
