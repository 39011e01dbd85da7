"""Compute configuration for GPU-shaped work: which device, precision, batch size, workers and backbone."""

from __future__ import annotations

from typing import TYPE_CHECKING

import dagster as dg

from mri_assets.core.compute_choices import ARCHS, DEVICES, PRECISIONS, WEIGHTS

if TYPE_CHECKING:
    import torch

    from mri_assets.core.backbone import Backbone

# torch and the modules built on it are imported by the methods that need them: every Dagster run
# worker imports the code location (and this resource) before its first step, and most steps of a
# wave never touch torch (about 4 s of a run worker's start on two cores).

MAX_BATCH_SIZE = 65536


class ComputeResource(dg.ConfigurableResource):
    """Device, precision and loader settings plus the backbone to build.

    Defaults fit a small CPU node; GPU nodes set `device: cuda`, `num_workers: 8` and a large
    `batch_size` in their profile's config.
    """

    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    num_workers: int = 0
    arch: str = "resnet18"
    weights: str = "none"
    seed: int = 0
    input_size: int | None = None
    checkpoint_key: str | None = None
    download_weights: bool = True  # weights=imagenet: fetch a missing file (torchvision's hash-checked loader)

    def validate(self) -> None:
        """Raise ValueError naming the allowed values for the first setting that is off."""
        checks = (
            (
                self.device in DEVICES,
                f"compute.device={self.device!r}: allowed values are {list(DEVICES)}",
            ),
            (
                self.precision in PRECISIONS,
                f"compute.precision={self.precision!r}: allowed values are {list(PRECISIONS)}",
            ),
            (
                1 <= self.batch_size <= MAX_BATCH_SIZE,
                f"compute.batch_size={self.batch_size}: use an integer from 1 to {MAX_BATCH_SIZE}",
            ),
            (
                self.num_workers >= 0,
                f"compute.num_workers={self.num_workers}: use 0 (load in-process) or more",
            ),
            (self.arch in ARCHS, f"compute.arch={self.arch!r}: allowed values are {sorted(ARCHS)}"),
            (
                self.weights in WEIGHTS,
                f"compute.weights={self.weights!r}: allowed values are {list(WEIGHTS)}",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def device_and_precision(self) -> tuple[torch.device, str, str]:
        """(device, precision, note); the note says when `auto` fell back to the CPU."""
        from mri_assets.core.embed import resolve_device
        from mri_assets.core.precision import resolve_precision

        self.validate()
        device, note = resolve_device(self.device)
        return device, resolve_precision(device, self.precision, purpose="inference"), note

    def build_backbone(self, checkpoint: bytes | None = None) -> Backbone:
        from mri_assets.core.backbone import build_backbone

        self.validate()
        return build_backbone(
            self.arch, self.weights, self.seed, checkpoint=checkpoint, input_size=self.input_size,
            download=self.download_weights,
        )
