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
    max_slices_per_object: int = Field(
        default=4096,
        description="most slices one object may give (a 4-D volume gives every volume's "
                    "slices); an object with more is quarantined whole, saying so",
    )
    allowed_modalities: list[str] = Field(
        default_factory=lambda: ["MR"],
        description="DICOM modalities ingested; any other is quarantined with its modality named",
    )

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
                f"ingest.window_low_percentile / window_high_percentile are ({low}, {high}): "
                "they must satisfy 0 <= low < high <= 100"
            )
        return low, high

    def workers(self) -> int:
        if self.decode_workers < 0:
            raise ValueError(f"ingest.decode_workers is {self.decode_workers}: use 0 (one per "
                             "CPU core) or a positive number of processes")
        return self.decode_workers or (os.cpu_count() or 1)

    def modalities(self) -> tuple[str, ...]:
        codes = tuple(str(code).strip().upper() for code in self.allowed_modalities)
        if not codes or not all(code.isalnum() and len(code) <= 16 for code in codes):
            raise ValueError(f"ingest.allowed_modalities is {self.allowed_modalities!r}: list one "
                             "or more DICOM modality codes, e.g. ['MR'] or ['MR', 'CT']")
        return codes

    def max_slices(self) -> int:
        if self.max_slices_per_object < 1:
            raise ValueError(f"ingest.max_slices_per_object is {self.max_slices_per_object}: "
                             "use a positive number of slices, e.g. 4096")
        return self.max_slices_per_object

    def uses_dev_salt(self) -> bool:
        return self.salt == DEV_SALT


class ClusteringSettings(ConfigurableResource):
    """PCA/KMeans and the drift rule."""

    variance_target: float = Field(default=0.9, description="PCA keeps the fewest components reaching it")
    standardize: bool = Field(
        default=True,
        description="fit the PCA to embeddings scaled to unit variance per dimension (false: raw "
        "embeddings, where a few high-variance channels can decide the clusters)")
    seed: int = 0
    drift_k: int = Field(default=4, description="the k whose ARI is watched for drift")
    drift_threshold: float = Field(default=0.10, description="relative ARI drop that counts as drift")
    baseline_wave: str | None = Field(
        default=None, description="pin the drift baseline to this wave (default: first wave with ARI)"
    )

    def checked(self) -> ClusteringSettings:
        if not 0 < self.variance_target <= 1:
            raise ValueError(f"variance_target must be in (0, 1], got {self.variance_target}")
        if self.drift_k not in (2, 3, 4):
            raise ValueError(f"drift_k must be one of 2, 3, 4 (the fitted k), got {self.drift_k}")
        if not 0 < self.drift_threshold < 1:
            raise ValueError(f"drift_threshold must be in (0, 1), got {self.drift_threshold}")
        return self


class LabelingSettings(ConfigurableResource):
    """What the active-learning queue asks of the clinicians."""

    classes: list[str] = Field(
        default_factory=lambda: ["axial_inferior", "axial_superior", "coronal", "sagittal"],
        description="the class set clinicians choose from",
    )
    batch_size: int = Field(default=200, description="training slices queued per wave and request")
    holdout_per_wave: int = Field(default=100, description="holdout slices queued for evaluation")
    duplicate_radius: float = Field(default=0.0, description="PCA distance below which two slices are near-duplicates")
    seed: int = 0


class PseudoLabelSettings(ConfigurableResource):
    """The promotion rule and its gate (plan: confidence >= 0.8 + kNN majority; F1 >= 0.88)."""

    confidence_threshold: float = 0.8
    knn_k: int = 10
    knn_space: str = Field(default="embedding", description="'embedding' (exact, 512-d) or 'pca' (the wave's PCA)")
    f1_threshold: float = 0.88
    min_promoted_holdout: int = Field(default=10, description="the gate needs at least this many promoted holdout slices")
    seed: int = 0


class TrainingSettings(ConfigurableResource):
    """The two-stage schedule: head on cached embeddings, then layer3 + layer4 + head on images."""

    head_epochs: int = 5
    finetune_epochs: int = 3
    head_lr: float = 1e-2
    lr_head: float = Field(default=1e-2, description="stage-2 peak head lr (SGD, warm-up + cosine); layer4 gets /3, layer3 /10")
    lr_layer4: float | None = None
    lr_layer3: float | None = None
    batch_size: int = 32
    seed: int = 0
    max_finetune_images: int = Field(
        default=0, description="cap on stage-2 training images (0 = all); the demo uses a small cap on CPUs"
    )


class RetrainSettings(ConfigurableResource):
    """When the retrain sensor asks for a new classifier."""

    every_slices: int = Field(default=500_000, description="retrain each time this many more slices are ingested")
