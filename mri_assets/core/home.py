"""Where the local profile keeps its state: everything under MRI_ASSETS_HOME (the deployment
reads the variable; `Deployment.home`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = ".mri_assets"


@dataclass(frozen=True)
class MriHome:
    root: Path

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def labels_db(self) -> Path:
        return self.root / "labels.db"

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow / "artifacts"

    @property
    def dvc_repo(self) -> Path:
        return self.root / "dvc"

    @property
    def dvc_remote(self) -> Path:
        return self.root / "dvc-remote"

    @property
    def dagster(self) -> Path:
        return self.root / "dagster"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    def ensure(self) -> MriHome:
        for path in (self.store, self.mlflow, self.dagster, self.cache, self.scratch):
            path.mkdir(parents=True, exist_ok=True)
        return self
