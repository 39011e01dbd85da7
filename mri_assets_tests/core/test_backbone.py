from __future__ import annotations

import io
import urllib.error

import pytest
import torch
import torchvision
import torchvision.models._api as torchvision_weights_api
from torch import nn

from mri_assets.core.backbone import (
    GRAY_MEAN,
    GRAY_STD,
    BackboneConfigError,
    backbone_checkpoint_bytes,
    build_backbone,
    grayscale_conv1,
    imagenet_weights_path,
    read_backbone_meta,
)


def _seeded_torchvision_resnet18(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Identity()
    return model.eval()


def _gray_pixels(n: int, side: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, side, side), dtype=torch.uint8, generator=generator)


def test_grayscale_conv1_on_one_channel_equals_rgb_conv1_on_gray_repeated_three_times():
    torch.manual_seed(3)
    rgb = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
    gray_image = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        expected = rgb(gray_image.repeat(1, 3, 1, 1))
        actual = grayscale_conv1(rgb)(gray_image)
    assert grayscale_conv1(rgb).in_channels == 1
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_backbone_on_uint8_gray_equals_torchvision_resnet_on_normalised_gray_repeated_as_rgb():
    pixels = _gray_pixels(2, 64, seed=1)
    backbone = build_backbone("resnet18", "none", seed=7)
    reference = _seeded_torchvision_resnet18(seed=7)
    normalised = (pixels.float() / 255.0 - GRAY_MEAN) / GRAY_STD
    with torch.inference_mode():
        expected = reference(normalised.repeat(1, 3, 1, 1))
        actual = backbone(pixels)
    assert actual.shape == (2, 512)
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4)


def test_same_seed_gives_same_model_id_and_another_seed_another():
    first, again, other = (build_backbone(seed=s) for s in (0, 0, 1))
    assert first.model_id == again.model_id
    assert first.model_id != other.model_id
    assert first.model_id.startswith("resnet18:none:")
    assert len(first.model_id.split(":")[2]) == 12


def test_seeded_build_leaves_the_global_torch_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_backbone(seed=5)
    torch.testing.assert_close(torch.rand(3), expected)


def test_resnet50_gives_2048_dimensional_features():
    backbone = build_backbone("resnet50")
    with torch.inference_mode():
        features = backbone(_gray_pixels(1, 64, seed=0))
    assert backbone.dim == 2048
    assert features.shape == (1, 2048)


def test_input_size_resizes_on_the_device_and_is_part_of_the_model_id():
    plain = build_backbone(seed=0)
    resized = build_backbone(seed=0, input_size=128)
    assert resized.model_id == f"{plain.model_id}@128"
    assert resized.normalise(_gray_pixels(2, 256, seed=0)).shape == (2, 1, 128, 128)


def test_unknown_arch_is_a_config_error_naming_the_allowed_archs():
    with pytest.raises(BackboneConfigError, match="resnet18.*resnet50"):
        build_backbone("vit_b_16")


def test_unknown_weights_is_a_config_error_naming_the_allowed_weights():
    with pytest.raises(BackboneConfigError, match="'none', 'imagenet'"):
        build_backbone(weights="imagenet21k")


def _no_network(*args, **kwargs):
    raise AssertionError("the test tried to download")


def test_imagenet_weights_missing_from_the_cache_is_a_config_error_naming_the_path(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torchvision_weights_api, "load_state_dict_from_url", _no_network)
    expected_path = imagenet_weights_path("resnet18")
    assert str(expected_path).startswith(str(tmp_path))
    with pytest.raises(BackboneConfigError, match="downloading is off") as error:
        build_backbone(weights="imagenet")
    assert str(expected_path) in str(error.value)
    assert not expected_path.exists()


def test_imagenet_download_goes_through_torchvisions_hash_checked_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    calls = []
    served = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        served.conv1.weight.fill_(0.02)

    def fake_loader(url, *args, **kwargs):
        calls.append((url, kwargs))
        return served.state_dict()

    monkeypatch.setattr(torchvision_weights_api, "load_state_dict_from_url", fake_loader)
    backbone = build_backbone(weights="imagenet", download=True)
    assert [url for url, _ in calls] == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert calls[0][1]["check_hash"] is True
    torch.testing.assert_close(backbone.body.conv1.weight, torch.full((64, 1, 7, 7), 0.06))


def test_imagenet_download_offline_is_one_clear_error_naming_url_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision_weights_api, "load_state_dict_from_url", offline)
    with pytest.raises(BackboneConfigError, match="Offline") as error:
        build_backbone(weights="imagenet", download=True)
    message = str(error.value)
    assert torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url in message
    assert str(imagenet_weights_path("resnet18")) in message


def test_imagenet_weights_are_read_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    cached = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        cached.conv1.weight.fill_(0.01)
    path = imagenet_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(cached.state_dict(), path)
    backbone = build_backbone(weights="imagenet")
    assert backbone.model_id.startswith("resnet18:imagenet:")
    torch.testing.assert_close(backbone.body.conv1.weight, torch.full((64, 1, 7, 7), 0.03))
    torch.testing.assert_close(backbone.body.layer4[1].conv2.weight, cached.layer4[1].conv2.weight)


def _checkpoint_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_checkpoint_bytes_replace_the_weights_and_head_keys_are_ignored():
    trained = build_backbone(seed=11)
    state = dict(trained.state_dict())
    state["head.weight"] = torch.zeros(4, 512)
    loaded = build_backbone(seed=0, checkpoint=_checkpoint_bytes(state))
    assert loaded.model_id == trained.model_id.replace(":none:", ":checkpoint:")
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)


def test_checkpoint_with_foreign_keys_is_a_config_error_listing_them():
    with pytest.raises(BackboneConfigError, match="unexpected.*fc.weight"):
        build_backbone(checkpoint=_checkpoint_bytes({"fc.weight": torch.zeros(2, 2)}))


def test_checkpoint_bytes_that_are_not_a_state_dict_are_a_config_error():
    with pytest.raises(BackboneConfigError, match="not a torch state dict"):
        build_backbone(checkpoint=b"definitely not a checkpoint")


def test_float_input_is_rejected_with_the_expected_dtype_and_shape():
    with pytest.raises(ValueError, match=r"uint8 pixels shaped \(N, 1, H, W\)"):
        build_backbone()(torch.zeros(1, 3, 32, 32))


def test_a_backbone_file_names_its_origin_in_the_model_id_and_keeps_its_meta():
    trained = build_backbone(seed=4, input_size=64)
    data = backbone_checkpoint_bytes(trained.state_dict(), "ssl", {"steps": 12})
    loaded = build_backbone(seed=0, checkpoint=data, input_size=64)
    assert loaded.model_id == trained.model_id.replace(":none:", ":ssl:")
    assert loaded.model_id.startswith("resnet18:ssl:") and loaded.model_id.endswith("@64")
    assert read_backbone_meta(data) == {"steps": 12}
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)


def test_a_backbone_file_of_unknown_origin_is_refused():
    with pytest.raises(BackboneConfigError, match="unknown backbone origin"):
        backbone_checkpoint_bytes(build_backbone().state_dict(), "magic")
