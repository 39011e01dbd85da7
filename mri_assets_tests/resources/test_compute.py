from __future__ import annotations

import pytest
import torch

from mri_assets.core.embed import DeviceUnavailableError
from mri_assets.resources.compute import ComputeResource


def test_defaults_build_the_seeded_resnet18_on_an_available_device():
    compute = ComputeResource()
    device, precision, _note = compute.device_and_precision()
    backbone = compute.build_backbone()
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert precision in ("fp16", "bf16", "fp32")
    assert backbone.model_id.startswith("resnet18:none:")
    assert backbone.dim == 512


def test_resource_backbone_matches_core_for_the_same_seed_and_input_size():
    first = ComputeResource(seed=3, input_size=96).build_backbone()
    again = ComputeResource(seed=3, input_size=96).build_backbone()
    other = ComputeResource(seed=4, input_size=96).build_backbone()
    assert first.model_id == again.model_id != other.model_id
    assert first.model_id.endswith("@96")


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("device", "tpu", "'auto', 'cpu', 'cuda'"),
        ("precision", "int8", "'auto', 'fp32', 'bf16', 'fp16'"),
        ("arch", "vgg16", "'resnet18', 'resnet50'"),
        ("weights", "laion", "'none', 'imagenet'"),
    ],
)
def test_unknown_setting_is_rejected_naming_the_allowed_values(field, value, allowed):
    compute = ComputeResource(**{field: value})
    with pytest.raises(ValueError, match=f"compute.{field}='{value}'.*{allowed}"):
        compute.device_and_precision()
    with pytest.raises(ValueError, match=f"compute.{field}="):
        compute.build_backbone()


@pytest.mark.parametrize(("field", "value"), [("batch_size", 0), ("num_workers", -1)])
def test_out_of_range_loader_setting_is_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"compute.{field}={value}"):
        ComputeResource(**{field: value}).validate()


def test_cuda_asked_for_on_a_machine_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="device='cuda'"):
        ComputeResource(device="cuda").device_and_precision()


def test_auto_device_without_cuda_falls_back_with_a_note(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, precision, note = ComputeResource(
        device="auto", precision="fp32"
    ).device_and_precision()
    assert (device.type, precision) == ("cpu", "fp32")
    assert "fell back to CPU" in note
