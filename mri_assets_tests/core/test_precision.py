"""The one precision policy (core/precision.py); CUDA answers are checked without a GPU."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mri_assets.core.precision import (
    PRECISIONS,
    PrecisionError,
    autocast_for,
    cpu_has_native_bf16,
    resolve_precision,
)

ALLOWED = "'auto', 'fp32', 'bf16', 'fp16'"


@pytest.mark.parametrize("purpose", ["inference", "training"])
@pytest.mark.parametrize(("device", "requested"), [
    ("cpu", "fp32"), ("cpu", "bf16"), ("cuda", "fp32"), ("cuda", "bf16"), ("cuda", "fp16"),
])
def test_an_explicit_choice_is_kept(device, requested, purpose):
    assert resolve_precision(device, requested, purpose) == requested
    assert resolve_precision(torch.device(device), requested, purpose) == requested


def test_fp16_off_cuda_is_refused_saying_what_to_use_instead():
    advice = "'fp16' is for CUDA, not cpu; use 'bf16', 'fp32' or 'auto'"
    with pytest.raises(PrecisionError, match=advice):
        resolve_precision("cpu", "fp16")


def test_an_unknown_precision_is_refused_listing_the_allowed_values():
    assert PRECISIONS == ("auto", "fp32", "bf16", "fp16")
    with pytest.raises(PrecisionError, match=f"precision 'int8': allowed values are {ALLOWED}"):
        resolve_precision("cpu", "int8")
    assert issubclass(PrecisionError, ValueError)


def test_an_unknown_purpose_is_refused():
    with pytest.raises(PrecisionError, match="'inference', 'training'"):
        resolve_precision("cpu", "auto", purpose="serving")


@pytest.mark.parametrize("purpose", ["inference", "training"])
def test_auto_on_a_cpu_is_bf16_only_with_native_bf16(purpose):
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert resolve_precision("cpu", "auto", purpose) == expected


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_a_cpu_follows_the_native_bf16_probe(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert cpu_has_native_bf16() is native
    assert resolve_precision("cpu") == ("bf16" if native else "fp32")


@pytest.mark.parametrize(("kernels", "native"), [("AVX512", True), ("AVX2", False),
                                                 ("DEFAULT", False)])
def test_bf16_hardware_under_kernels_capped_below_avx512_is_not_native(monkeypatch, kernels,
                                                                         native):
    # ATEN_CPU_CAPABILITY=avx2 on a bf16 CPU: torch's kernels cannot use the bf16 units.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: kernels)
    assert cpu_has_native_bf16() is native
    assert resolve_precision("cpu", "auto", "training") == ("bf16" if native else "fp32")


def test_a_missing_or_failing_probe_means_no_native_bf16(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert cpu_has_native_bf16() is False

    def fails() -> bool:
        raise RuntimeError("cpuinfo failed to initialise")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", fails, raising=False)
    assert cpu_has_native_bf16() is False


@pytest.mark.parametrize("bf16_card", [True, False])
def test_auto_on_cuda_is_fp16_for_inference_and_bf16_where_the_card_has_it_for_training(
    monkeypatch, bf16_card
):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_card)
    assert resolve_precision("cuda", "auto", "inference") == "fp16"
    assert resolve_precision(torch.device("cuda", 0)) == "fp16"
    assert resolve_precision("cuda", "auto", "training") == ("bf16" if bf16_card else "fp16")


def test_auto_on_another_device_is_fp32():
    assert resolve_precision("meta", "auto") == "fp32"


def test_autocast_for_fp32_is_a_no_op():
    context = autocast_for("cpu", "fp32")
    assert isinstance(context, contextlib.nullcontext)
    with context:
        assert not torch.is_autocast_enabled("cpu")


def test_autocast_for_bf16_on_a_cpu_autocasts_to_bf16():
    with autocast_for(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_autocast_for_needs_a_resolved_precision():
    with pytest.raises(PrecisionError, match="resolved precision, got 'auto'"):
        autocast_for("cpu", "auto")
