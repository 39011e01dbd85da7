"""Pipeline settings that are not an outside system: salt, split seed, windowing, workers."""

from __future__ import annotations

import os

from dagster import ConfigurableResource
from pydantic import Field

from mri_assets.core.manifest import ManifestSettings

DEV_SALT = "mri-assets-development-salt"


class IngestSettings(ConfigurableResource):
    """How a wave is ingested. The salt is a secret: pass it with `EnvVar("MRI_ASSETS_SALT")`."""

    salt: str = Field(default=DEV_SALT, description="secret salt of patient_key")
    split_seed: int = Field(default=0, description="seed of the patient split")
    train_fraction: float = 0.8
    val_fraction: float = 0.1
    holdout_fraction: float = 0.1
    window_low_percentile: float = 0.5
    window_high_percentile: float = 99.5
    decode_workers: int = Field(default=0, description="0 = one per CPU core")

    def manifest_settings(self, n_shards: int) -> ManifestSettings:
        return ManifestSettings(
            salt=self.salt,
            split_seed=self.split_seed,
            split_fractions=(self.train_fraction, self.val_fraction, self.holdout_fraction),
            n_shards=n_shards,
        )

    def window(self) -> tuple[float, float]:
        low, high = self.window_low_percentile, self.window_high_percentile
        if not 0 <= low < high <= 100:
            raise ValueError(
                f"window percentiles ({low}, {high}) must satisfy 0 <= low < high <= 100"
            )
        return low, high

    def workers(self) -> int:
        return self.decode_workers or (os.cpu_count() or 1)

    def uses_dev_salt(self) -> bool:
        return self.salt == DEV_SALT
