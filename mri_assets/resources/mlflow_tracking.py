"""MLflow tracking: one experiment per deployment, one run per wave and stage.

Everything goes through `MlflowClient` with explicit run ids; the resource never starts
MLflow's process-global "active run", so nothing can be left dangling in a worker process.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dagster import ConfigurableResource
from filelock import FileLock
from pydantic import Field

from mri_assets.core.temporaries import scratch_prefix, temp_prefix

if TYPE_CHECKING:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

# MLflow (and the pandas, FastAPI and SQLAlchemy models it imports, about 1.5 s) is imported by
# the methods that talk to it, not with this module: every Dagster run worker imports the code
# location, and most runs of a wave never log to MLflow.

WAVE_TAG = "mri_assets.wave"
STAGE_TAG = "mri_assets.stage"
SUPERSEDED_TAG = "mri_assets.superseded"
DAGSTER_RUN_TAG = "dagster_run_id"
DAGSTER_ASSET_TAG = "dagster_asset_key"
DAGSTER_PARTITION_TAG = "dagster_partition"
DAGSTER_RUN_URL_TAG = "dagster_run_url"
LOCAL_UI_URL = "http://127.0.0.1:5000"


class MlflowTrackingError(RuntimeError):
    """A tracking call that cannot do what was asked; the message says what to change."""


class MlflowTracking(ConfigurableResource):
    """Logs params, metrics and artifacts for a wave's stage (e.g. `clusters`, `classifier`).

    Local profile: `MlflowTracking.local(home)` keeps a SQLite store and an artifact folder
    under MRI_ASSETS_HOME/mlflow; other profiles set `tracking_uri` to a tracking server.
    """

    tracking_uri: str = Field(
        description="e.g. sqlite:////abs/path/mlflow.db or http://mlflow:5000"
    )
    experiment_name: str = Field(default="mri_assets", description="one experiment per deployment")
    artifact_location: str | None = Field(
        default=None,
        description="where a NEW experiment stores artifacts (file:// URI or s3://...); "
        "None lets the tracking server decide",
    )

    ui_url: str | None = Field(
        default=None,
        description="where people open MLflow's UI (None: the tracking URI when it is http(s))",
    )
    relocatable: bool = Field(
        default=False,
        description="the store and artifacts live together under one folder that may move "
        "(MRI_ASSETS_HOME): stored artifact URIs are re-rooted at `artifact_location` on start",
    )
    dagster_url: str | None = Field(
        default=None,
        description="where people open the Dagster UI (MRI_ASSETS_DAGSTER_URL): runs and "
        "registered versions then link to the Dagster run that made them",
    )

    @classmethod
    def local(cls, home: Path, experiment_name: str = "mri_assets-local",
              dagster_url: str | None = None) -> MlflowTracking:
        root = Path(home).resolve() / "mlflow"
        return cls(
            tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
            experiment_name=experiment_name,
            artifact_location=(root / "artifacts").as_uri(),
            ui_url=LOCAL_UI_URL,
            relocatable=True,
            dagster_url=dagster_url,
        )

    def dagster_run_url(self, dagster_run_id: str) -> str | None:
        """The Dagster UI's page of a run, or None when the UI's address is not known."""
        if not self.dagster_url:
            return None
        return f"{self.dagster_url.rstrip('/')}/runs/{dagster_run_id}"

    def run_url(self, run_id: str) -> str | None:
        """The run's page in MLflow's UI (for a local store: what `mlflow ui --backend-store-uri
        sqlite:///HOME/mlflow/mlflow.db` serves), or None when no UI is known."""
        base = self.ui_url or (
            self.tracking_uri if self.tracking_uri.startswith(("http://", "https://")) else None)
        if base is None:
            return None
        experiment_id = self.client().get_run(run_id).info.experiment_id
        return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    @property
    def _local_db(self) -> Path | None:
        if self.tracking_uri.startswith("sqlite:///"):
            return Path(self.tracking_uri.removeprefix("sqlite:///"))
        return None

    def prepare(self) -> None:
        """Create a local SQLite store now, completely, if it does not exist yet (a no-op for a
        tracking server): `mri-assets run` calls it before any step; every client does on first
        use in its process (`ensure_local_store`)."""
        if self._local_db is not None:
            ensure_local_store(self._local_db, self.artifact_location)

    def _scratch(self) -> str | None:
        """Where artifact files wait to be logged: `.scratch` beside a local store (swept after a
        kill with the home's other temporaries), else the system's temporary folder."""
        if self._local_db is None:
            return None
        folder = self._local_db.parent / ".scratch"
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    def client(self) -> MlflowClient:
        from mlflow.tracking import MlflowClient

        self.prepare()
        return MlflowClient(tracking_uri=self.tracking_uri)

    def experiment_id(self, client: MlflowClient | None = None) -> str:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

        client = client or self.client()
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            moved_from = experiment.artifact_location
            if self.relocatable and self.artifact_location and moved_from != self.artifact_location:
                rebase_artifact_uris(self.tracking_uri, moved_from, self.artifact_location)
            return experiment.experiment_id
        try:
            return client.create_experiment(
                self.experiment_name, artifact_location=self.artifact_location
            )
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            existing = client.get_experiment_by_name(self.experiment_name)
            if existing is None:
                raise
            return existing.experiment_id

    def find_wave_run(self, wave: str, stage: str) -> str | None:
        """The current run id for this wave and stage, or None."""
        client = self.client()
        runs = client.search_runs(
            [self.experiment_id(client)],
            filter_string=(
                f"tags.`{WAVE_TAG}` = '{_quoted(wave)}' AND tags.`{STAGE_TAG}` = '{_quoted(stage)}'"
            ),
            order_by=["attributes.start_time DESC"],
            max_results=10,
        )
        current = [run for run in runs if run.data.tags.get(SUPERSEDED_TAG) != "true"]
        return current[0].info.run_id if current else None

    @contextmanager
    def start_wave_run(
        self,
        wave: str,
        stage: str,
        tags: Mapping[str, str] | None = None,
        run_name: str | None = None,
        new_run: bool = False,
    ) -> Iterator[str]:
        """Yield the run id of the (wave, stage) run, reusing it when one exists.

        `new_run=True` marks the existing run superseded and starts a fresh one (needed when
        a rematerialization changes params, which MLflow keeps immutable). The run ends
        FINISHED, or FAILED when the block raises.
        """
        from mlflow.entities import RunStatus, RunTag

        client = self.client()
        run_id = self.find_wave_run(wave, stage)
        if run_id is not None and new_run:
            client.set_tag(run_id, SUPERSEDED_TAG, "true")
            run_id = None
        all_tags = {WAVE_TAG: wave, STAGE_TAG: stage, **dict(tags or {})}
        if run_id is None:
            run = client.create_run(
                self.experiment_id(client),
                tags=all_tags,
                run_name=run_name or f"{wave}-{stage}",
            )
            run_id = run.info.run_id
        else:
            client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self._log_batch(client, run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
        status = RunStatus.FAILED
        try:
            yield run_id
            status = RunStatus.FINISHED
        finally:
            client.set_terminated(run_id, status=RunStatus.to_string(status))

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params; a key already logged with a different value is an error (MLflow params
        are immutable: start the wave's run with `new_run=True`)."""
        from mlflow.entities import Param

        client = self.client()
        existing = client.get_run(run_id).data.params
        fresh: list[Param] = []
        for key, value in params.items():
            text = str(value)
            if key in existing and existing[key] != text:
                raise MlflowTrackingError(
                    f"param {key!r} is already {existing[key]!r} in MLflow run {run_id}, "
                    f"cannot change it to {text!r}: start the wave's run with new_run=True"
                )
            if key not in existing:
                fresh.append(Param(key, text))
        self._log_batch(client, run_id, params=fresh)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float | None], step: int = 0) -> None:
        """Log numeric metrics; None values (e.g. ARI not computable) are not logged as numbers."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if value is not None
        ]
        self._log_batch(self.client(), run_id, metrics=entries)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._log_batch(self.client(), run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact_bytes(
        self, run_id: str, name: str, data: bytes, artifact_path: str | None = None
    ) -> str:
        """Store `data` as artifact `artifact_path/name`; returns the artifact's relative path."""
        if not name or "/" in name or name in (".", ".."):
            raise MlflowTrackingError(f"artifact name {name!r} must be a plain file name")
        with tempfile.TemporaryDirectory(prefix=scratch_prefix("mri-mlflow"),
                                         dir=self._scratch()) as folder:
            local = Path(folder) / name
            local.write_bytes(data)
            self.client().log_artifact(run_id, str(local), artifact_path=artifact_path)
        return f"{artifact_path}/{name}" if artifact_path else name

    def log_png(self, run_id: str, name: str, png: bytes, artifact_path: str = "plots") -> str:
        if not png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise MlflowTrackingError(f"{name!r} is not PNG data (missing the PNG signature)")
        file_name = name if name.endswith(".png") else f"{name}.png"
        return self.log_artifact_bytes(run_id, file_name, png, artifact_path)

    def log_dict(
        self, run_id: str, name: str, data: Mapping[str, Any], artifact_path: str | None = None
    ) -> str:
        file_name = name if name.endswith(".json") else f"{name}.json"
        payload = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
        return self.log_artifact_bytes(run_id, file_name, payload, artifact_path)

    def register_checkpoint(
        self, run_id: str, checkpoint: bytes, registered_name: str, model: Any,
        tags: Mapping[str, Any] | None = None,
    ) -> str:
        """Log the checkpoint and a PyTorch-flavoured MLflow model, and register a new version
        carrying `tags` (the Dagster run, asset and partition that made it).

        Returns the registry version. The model is saved with explicit requirements, so MLflow
        never inspects the environment or reaches the network.
        """
        import mlflow.pytorch

        client = self.client()
        self.log_artifact_bytes(run_id, "checkpoint.pt", checkpoint, artifact_path="checkpoint")
        with tempfile.TemporaryDirectory(prefix=scratch_prefix("mri-mlflow-model"),
                                         dir=self._scratch()) as folder:
            target = Path(folder) / "model"
            mlflow.pytorch.save_model(
                model, str(target), serialization_format="pickle",
                pip_requirements=["torch==2.14.1", "torchvision==0.29.1"],
            )
            client.log_artifacts(run_id, str(target), artifact_path="model")
        try:
            client.get_registered_model(registered_name)
        except Exception:  # noqa: BLE001 - MLflow raises RestException or MlflowException for "not found"
            client.create_registered_model(registered_name)
        artifact_uri = client.get_run(run_id).info.artifact_uri
        version = client.create_model_version(
            registered_name, source=f"{artifact_uri}/model", run_id=run_id,
            tags={k: str(v) for k, v in (tags or {}).items()},
        )
        return str(version.version)

    @staticmethod
    def _log_batch(
        client: MlflowClient,
        run_id: str,
        metrics: list[Metric] | None = None,
        params: list[Param] | None = None,
        tags: list[RunTag] | None = None,
    ) -> None:
        metrics, params, tags = metrics or [], params or [], tags or []
        for start in range(0, max(len(metrics), len(params), len(tags)), 100):
            end = start + 100
            client.log_batch(
                run_id, metrics=metrics[start:end], params=params[start:end], tags=tags[start:end]
            )


# Local stores this process has checked or created (see `ensure_local_store`).
_READY_STORES: set[str] = set()
STORE_LOCK_TIMEOUT_S = 600.0


def ensure_local_store(db_path: Path, artifact_root: str | None = None) -> None:
    """Make sure the local SQLite tracking store `db_path` exists with MLflow's whole schema.

    MLflow builds its schema on first use, in place, in some sixty migrations that SQLite does
    not run as one transaction: a process killed meanwhile leaves a store that every later start
    refuses (`table ... already exists`), and two processes that start at once race through the
    same migrations (`_alembic_tmp_experiments already exists`). Here, under a file lock beside
    the store (released by the kernel if its holder dies), the schema is built in a temporary
    file that is then renamed into place: the store exists whole or not at all. A store left
    half-built by an earlier version (schema not at MLflow's head, and no run nor experiment of
    ours in it) is set aside as `mlflow.db.incomplete-TIME` and built again; one holding runs is
    left alone for `mlflow db upgrade`, which MLflow's own error names. Once per process.
    """
    db_path = Path(db_path).resolve()
    if str(db_path) in _READY_STORES and db_path.is_file():
        return
    db_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(db_path.with_name(f".{db_path.name}.lock")), timeout=STORE_LOCK_TIMEOUT_S)
    with lock:
        if db_path.is_file() and not _schema_at_head(db_path) and not _holds_data(db_path):
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for side in ("", "-journal", "-wal", "-shm"):
                old = Path(f"{db_path}{side}")
                if old.exists():
                    os.replace(old, db_path.with_name(f"{db_path.name}.incomplete-{stamp}{side}"))
        if not db_path.is_file():
            _build_store(db_path, artifact_root or (db_path.parent / "artifacts").as_uri())
    _READY_STORES.add(str(db_path))


def _build_store(db_path: Path, artifact_root: str) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = db_path.with_name(f"{temp_prefix(db_path.name)}{uuid.uuid4().hex[:8]}.tmp")
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp}", artifact_root)
        store.engine.dispose()
        for side in ("-journal", "-wal", "-shm"):  # stale side files would apply to the new store
            Path(f"{db_path}{side}").unlink(missing_ok=True)
        os.replace(tmp, db_path)
    finally:
        for side in ("", "-journal", "-wal", "-shm"):
            Path(f"{tmp}{side}").unlink(missing_ok=True)


def _tables(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _schema_at_head(db_path: Path) -> bool:
    from mlflow.store.db.utils import _get_latest_schema_revision

    with closing(sqlite3.connect(db_path, timeout=60)) as db:
        if "alembic_version" not in _tables(db):
            return False
        versions = [row[0] for row in db.execute("SELECT version_num FROM alembic_version")]
    return versions == [_get_latest_schema_revision()]


def _holds_data(db_path: Path) -> bool:
    """Any run, or any experiment besides MLflow's Default (id 0)."""
    with closing(sqlite3.connect(db_path, timeout=60)) as db:
        tables = _tables(db)
        if "runs" in tables and db.execute("SELECT 1 FROM runs LIMIT 1").fetchone():
            return True
        return "experiments" in tables and bool(
            db.execute("SELECT 1 FROM experiments WHERE experiment_id != 0 LIMIT 1").fetchone()
        )


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


# Every column in which MLflow's SQL store keeps an artifact URI (experiments, runs, logged
# models, registered model versions); missing tables or columns are skipped.
ARTIFACT_URI_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def rebase_artifact_uris(tracking_uri: str, old_root: str, new_root: str) -> int:
    """Re-root the artifact URIs a local SQLite tracking store holds from `old_root` (where the
    home was) to `new_root` (where it is now); returns the number of values changed.

    MLflow stores absolute artifact URIs and has no relative form, so a copied MRI_ASSETS_HOME
    would log every new artifact into the original. Only values equal to `old_root` or below it
    change, in one transaction; a second call finds nothing left to change.
    """
    if not tracking_uri.startswith("sqlite:///"):
        raise MlflowTrackingError(f"only a local SQLite store can be re-rooted, not {tracking_uri!r}")
    old_root, new_root = old_root.rstrip("/"), new_root.rstrip("/")
    changed = 0
    with closing(sqlite3.connect(tracking_uri.removeprefix("sqlite:///"), timeout=60)) as db, db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table, column in ARTIFACT_URI_COLUMNS:
            if table not in tables:
                continue
            columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                continue
            cursor = db.execute(
                f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                (new_root, len(old_root) + 1, old_root, len(old_root) + 1, old_root + "/"),
            )
            changed += cursor.rowcount
    return changed
