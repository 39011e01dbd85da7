"""The embedding backbone: a torchvision ResNet whose first convolution reads one grayscale channel.

`build_backbone` returns a `Backbone` that takes the slices' uint8 pixels (N, 1, H, W) as they are
stored, scales and normalises them on the device it runs on (so the host ships one byte per
pixel), and returns (N, dim) features. Its `model_id` names the architecture, the weights' origin
and a hash of every parameter, so each embedding row can say exactly which network produced it.

Weights come from a seed (`none`), from torchvision's ImageNet file (`imagenet`: read from the
torch hub cache, downloaded into it through torchvision's hash-checked loader only when the
caller allows it), or from checkpoint bytes: a flat `body.*` state dict (a classifier's backbone,
origin `checkpoint`) or a `mri_assets.backbone/1` file written by `backbone_checkpoint_bytes`,
which names its own origin (`ssl` for `core.pretrain`), so its model id reads e.g.
`resnet18:ssl:1a2b3c4d5e6f@128`.
"""

from __future__ import annotations

import hashlib
import io
import json
import urllib.error
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from mri_assets.core.compute_choices import ARCHS, WEIGHTS

CHECKPOINT_WEIGHTS = "checkpoint"
BACKBONE_FORMAT = "mri_assets.backbone/1"
ORIGINS = ("ssl",)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMINANCE = (0.299, 0.587, 0.114)
GRAY_MEAN = sum(w * m for w, m in zip(LUMINANCE, IMAGENET_MEAN))
GRAY_STD = sum(w * s for w, s in zip(LUMINANCE, IMAGENET_STD))

HEAD_PREFIX = "head."

_TORCHVISION_BUILDERS = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
}
_IMAGENET_WEIGHTS = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
}


class BackboneConfigError(ValueError):
    """The backbone cannot be built as configured; the message says which values are allowed."""


class Backbone(nn.Module):
    """ResNet body with a one-channel `conv1` and `fc = Identity`; uint8 in, float features out."""

    def __init__(self, body: nn.Module, arch: str, weights: str, input_size: int | None = None):
        super().__init__()
        self.body = body
        self.arch = arch
        self.weights = weights
        self.dim = ARCHS[arch]
        self.input_size = input_size
        self.register_buffer("scale", torch.tensor(1.0 / (255.0 * GRAY_STD)), persistent=False)
        self.register_buffer("shift", torch.tensor(GRAY_MEAN / GRAY_STD), persistent=False)
        self.model_id = model_id_for(arch, weights, self.state_dict(), input_size)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 1, H, W) -> float32 normalised with the grayscale ImageNet statistics."""
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 1:
            raise ValueError(
                f"Backbone expects uint8 pixels shaped (N, 1, H, W), got {pixels.dtype} {tuple(pixels.shape)}"
            )
        x = pixels.to(torch.float32) * self.scale - self.shift
        if self.input_size is not None and tuple(x.shape[-2:]) != (
            self.input_size,
            self.input_size,
        ):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True
            )
        return x.contiguous(memory_format=torch.channels_last)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalise(pixels))


def model_id_for(
    arch: str, weights: str, state_dict: dict[str, torch.Tensor], input_size: int | None
) -> str:
    """`"{arch}:{weights}:{sha12}"`, sha256 over the state dict's names and tensor bytes in key order.

    A backbone that resizes its input on the device appends `@{input_size}`: the same weights give
    another embedding at another resolution.
    """
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    model_id = f"{arch}:{weights}:{digest.hexdigest()[:12]}"
    return model_id if input_size is None else f"{model_id}@{input_size}"


def grayscale_conv1(conv: nn.Conv2d) -> nn.Conv2d:
    """A copy of an RGB `conv1` that reads one channel: its filter is the sum of the three RGB filters.

    Feeding a gray image repeated on three channels to `conv` equals feeding it once to the result.
    """
    gray = nn.Conv2d(
        1,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        gray.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            gray.bias.copy_(conv.bias)
    return gray


def imagenet_weights_path(arch: str) -> Path:
    """Where torchvision's weights API caches the ImageNet file for `arch` (the torch hub cache)."""
    url = _IMAGENET_WEIGHTS[arch].url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _imagenet_state_dict(arch: str, download: bool) -> dict[str, torch.Tensor]:
    path = imagenet_weights_path(arch)
    url = _IMAGENET_WEIGHTS[arch].url
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    if not download:
        raise BackboneConfigError(
            f"weights='imagenet' for {arch} needs the file {path} (torchvision's cache; "
            f"TORCH_HOME moves it). It is not there and downloading is off: "
            f"copy {url} to that path, allow the download, or use weights='none'."
        )
    try:
        # torchvision's own loader: downloads into the hub cache and checks the sha256 prefix
        # that the file name carries.
        return _IMAGENET_WEIGHTS[arch].get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise BackboneConfigError(
            f"weights='imagenet' for {arch}: could not download {url} into {path} "
            f"({type(error).__name__}: {error}). Offline? Copy the file to that path by hand, "
            f"or use weights='none'."
        ) from error


def backbone_checkpoint_bytes(
    state_dict: dict[str, torch.Tensor], origin: str, meta: dict[str, Any] | None = None
) -> bytes:
    """A `mri_assets.backbone/1` file: `torch.save` of `{format, origin, state_dict, meta}`.

    `state_dict` has the keys of `Backbone.state_dict()` (`body.*`); `origin` (one of `ORIGINS`)
    takes the place of the weights in the model id; `meta` is stored as JSON text (how the
    weights were trained). `build_backbone(checkpoint=...)` reads it.
    """
    if origin not in ORIGINS:
        raise BackboneConfigError(f"unknown backbone origin {origin!r}: allowed values are {list(ORIGINS)}")
    payload = {
        "format": BACKBONE_FORMAT,
        "origin": origin,
        "state_dict": OrderedDict(
            (k, v.detach().to("cpu").contiguous().clone()) for k, v in state_dict.items()
        ),
        "meta": json.dumps(meta or {}, sort_keys=True, default=str),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def read_backbone_meta(checkpoint: bytes) -> dict[str, Any]:
    """The `meta` of a `mri_assets.backbone/1` file ({} for a flat state dict)."""
    loaded = _load_checkpoint(checkpoint)
    return json.loads(loaded["meta"]) if _is_backbone_file(loaded) else {}


def _load_checkpoint(checkpoint: bytes) -> Any:
    try:
        return torch.load(io.BytesIO(checkpoint), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for bytes it cannot read
        raise BackboneConfigError(
            f"checkpoint bytes are not a torch state dict: {error}"
        ) from error


def _is_backbone_file(loaded: Any) -> bool:
    return isinstance(loaded, dict) and loaded.get("format") == BACKBONE_FORMAT


def _checkpoint_state_dict(checkpoint: bytes) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict without `head.*` keys, the weights label of the model id)."""
    loaded = _load_checkpoint(checkpoint)
    label = CHECKPOINT_WEIGHTS
    if _is_backbone_file(loaded):
        label = str(loaded.get("origin"))
        if label not in ORIGINS:
            raise BackboneConfigError(
                f"backbone file of unknown origin {label!r}: allowed values are {list(ORIGINS)}"
            )
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise BackboneConfigError(
            f"checkpoint must hold a state dict (dict of tensors), got {type(loaded).__name__}"
        )
    state = OrderedDict((k, v) for k, v in loaded.items() if not k.startswith(HEAD_PREFIX))
    return state, label


def _load_into(backbone_body: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    prefixed = OrderedDict(
        (k.removeprefix("body."), v) for k, v in state.items() if k.startswith("body.")
    )
    stray = [k for k in state if not k.startswith("body.")]
    expected = backbone_body.state_dict()
    missing = [k for k in expected if k not in prefixed]
    unexpected = stray + [f"body.{k}" for k in prefixed if k not in expected]
    if missing or unexpected:
        raise BackboneConfigError(
            f"{what} does not match the backbone: missing {missing[:5]}, unexpected {unexpected[:5]} "
            f"(keys must be those of Backbone.state_dict(), optionally with '{HEAD_PREFIX}' keys)"
        )
    wrong_shape = [k for k, v in prefixed.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong_shape:
        raise BackboneConfigError(
            f"{what} has tensors of the wrong shape for this arch: {wrong_shape[:5]}"
        )
    backbone_body.load_state_dict(prefixed)


def build_backbone(
    arch: str = "resnet18",
    weights: str = "none",
    seed: int = 0,
    checkpoint: bytes | None = None,
    input_size: int | None = None,
    download: bool = False,
) -> Backbone:
    """Build the embedding backbone in eval mode on the CPU.

    `weights="none"`: deterministic init from `seed` (works offline). `"imagenet"`: torchvision's
    ImageNet weights from the torch hub cache; when the file is missing and `download` is true,
    torchvision's hash-checked loader fetches it into that cache (offline: a `BackboneConfigError`
    naming the URL and the path). `checkpoint`: a state dict saved with `torch.save` (keys of
    `Backbone.state_dict()`, `head.*` keys ignored) or a `backbone_checkpoint_bytes` file, which
    replaces the weights; the model id then says `checkpoint` (or the file's origin, e.g. `ssl`).
    `input_size`: resize (bilinear, antialiased) to this side on the device before the network;
    None feeds the slices at their stored size.
    """
    if arch not in ARCHS:
        raise BackboneConfigError(f"unknown arch {arch!r}: allowed values are {sorted(ARCHS)}")
    if weights not in WEIGHTS:
        raise BackboneConfigError(
            f"unknown weights {weights!r}: allowed values are {list(WEIGHTS)} (or pass checkpoint bytes)"
        )
    if input_size is not None and not 32 <= input_size <= 1024:
        raise BackboneConfigError(
            f"input_size must be None or between 32 and 1024 pixels, got {input_size}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = _TORCHVISION_BUILDERS[arch](weights=None)
        if weights == "imagenet" and checkpoint is None:
            body.load_state_dict(_imagenet_state_dict(arch, download))
        body.conv1 = grayscale_conv1(body.conv1)
        body.fc = nn.Identity()
    label = weights
    if checkpoint is not None:
        state, label = _checkpoint_state_dict(checkpoint)
        _load_into(body, state, "checkpoint")
    return Backbone(body, arch, label, input_size).eval()
