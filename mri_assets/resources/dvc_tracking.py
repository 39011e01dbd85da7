"""DVC tracking of produced files (embedding shards): a DVC repo whose remote lives in the store.

Local profile: repo in `MRI_ASSETS_HOME/dvc`, remote folder `MRI_ASSETS_HOME/dvc-remote`.
Other profiles: remote `s3://BUCKET/PREFIX/dvc` with `remote_endpoint_url` for S3-compatible
stores; credentials come from the usual AWS variables.

Several Dagster steps (processes) may track different shards at once: every repo operation runs
under one file lock beside the repo, so DVC's own repo lock never makes a step fail.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml
from dagster import ConfigurableResource
from filelock import FileLock, Timeout

REMOTE_NAME = "storage"
LOCK_TIMEOUT_S = 1800.0


class DvcTrackingError(RuntimeError):
    """A DVC operation failed in a way the user can act on."""


@dataclass(frozen=True)
class DvcRecord:
    """Where a tracked file lives in DVC, and its revision (the md5 DVC recorded)."""

    dvc_path: str
    md5: str
    size: int
    remote: str


def _check_dvc_path(dvc_path: str) -> str:
    path = PurePosixPath(dvc_path)
    if (
        not dvc_path
        or path.is_absolute()
        or "\\" in dvc_path
        or any(part in ("", ".", "..") for part in dvc_path.split("/"))
        or path.parts[0] == ".dvc"
        or path.suffix == ".dvc"
    ):
        raise DvcTrackingError(
            f"invalid DVC path {dvc_path!r}: use a relative '/'-separated path such as "
            "'embeddings/pilot/shard-00.arrow', outside '.dvc/' and not ending in '.dvc'"
        )
    return dvc_path


def _read_dvc_file(dvc_file: Path) -> tuple[str, int]:
    outs = yaml.safe_load(dvc_file.read_text())["outs"]
    return str(outs[0]["md5"]), int(outs[0]["size"])


def _copy_atomically(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DvcTracking(ConfigurableResource):
    """A DVC repo (no Git) with one default remote; `track` adds and pushes, `read` pulls."""

    repo_dir: str
    remote_url: str
    remote_endpoint_url: str | None = None

    @property
    def _repo_path(self) -> Path:
        return Path(self.repo_dir).expanduser().resolve()

    @property
    def _remote(self) -> str:
        if "://" in self.remote_url:
            return self.remote_url
        return str(Path(self.remote_url).expanduser().resolve())

    @contextmanager
    def _locked(self):
        repo = self._repo_path
        repo.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(repo.parent / f".{repo.name}.lock"), timeout=LOCK_TIMEOUT_S)
        try:
            with lock:
                yield
        except Timeout as error:
            raise DvcTrackingError(
                f"waited {LOCK_TIMEOUT_S:.0f} s for the DVC repo lock {lock.lock_file}; another "
                "process holds it (a hung step?) — stop it, or remove the lock file if none runs"
            ) from error

    def _remote_config(self) -> dict:
        config = {"url": self._remote}
        if self.remote_endpoint_url:
            config["endpointurl"] = self.remote_endpoint_url
        return config

    def _configure(self, repo_root: Path) -> None:
        """`dvc init --no-scm` where missing, then the settings this resource owns.

        DVC's per-repo site cache goes inside `.dvc/tmp`, so all state stays below the repo
        instead of `/var/tmp/dvc`; analytics are off.
        """
        from dvc.config import Config

        dvc_dir = repo_root / ".dvc"
        dvc_dir.mkdir(parents=True, exist_ok=True)
        config = (
            Config(str(dvc_dir)) if (dvc_dir / "config").is_file() else Config.init(str(dvc_dir))
        )
        if "://" not in self._remote:
            Path(self._remote).mkdir(parents=True, exist_ok=True)
        with config.edit("repo") as settings:
            settings["core"]["no_scm"] = True
            settings["core"]["analytics"] = False
            settings["core"]["remote"] = REMOTE_NAME
            settings["core"]["site_cache_dir"] = str(dvc_dir / "tmp" / "site-cache")
            settings["cache"]["type"] = "reflink,hardlink,copy"
            settings["remote"][REMOTE_NAME] = self._remote_config()

    def ensure_repo(self) -> Path:
        """Create the repo (`dvc init --no-scm`) if missing and point its default remote here."""
        with self._locked():
            self._repo_path.mkdir(parents=True, exist_ok=True)
            self._configure(self._repo_path)
        return self._repo_path

    def track(self, local_file: Path, dvc_path: str) -> DvcRecord:
        """Copy `local_file` to `dvc_path` in the workspace, `dvc add` it and `dvc push` it."""
        from dvc.exceptions import DvcException
        from dvc.repo import Repo

        local_file = Path(local_file)
        if not local_file.is_file():
            raise DvcTrackingError(f"cannot track {local_file}: no such file")
        _check_dvc_path(dvc_path)
        target = self._repo_path / dvc_path
        dvc_file = target.with_name(target.name + ".dvc")
        with self._locked():
            self._repo_path.mkdir(parents=True, exist_ok=True)
            self._configure(self._repo_path)
            _copy_atomically(local_file, target)
            try:
                with Repo(str(self._repo_path)) as repo:
                    repo.add(str(target))
                    repo.push(targets=[str(dvc_file)], remote=REMOTE_NAME)
            except DvcException as error:
                raise DvcTrackingError(
                    f"DVC could not add and push {dvc_path!r} to remote {self._remote}: {error}; "
                    "check the remote URL, its endpoint and the AWS credentials"
                ) from error
            md5, size = _read_dvc_file(dvc_file)
        return DvcRecord(dvc_path=dvc_path, md5=md5, size=size, remote=self._remote)

    def record(self, dvc_path: str) -> DvcRecord:
        """The revision currently recorded for `dvc_path` (from its `.dvc` file)."""
        dvc_file = self._repo_path / (_check_dvc_path(dvc_path) + ".dvc")
        with self._locked():
            if not dvc_file.is_file():
                raise DvcTrackingError(
                    f"{dvc_path!r} is not tracked in the DVC repo {self.repo_dir}"
                )
            md5, size = _read_dvc_file(dvc_file)
        return DvcRecord(dvc_path=dvc_path, md5=md5, size=size, remote=self._remote)

    def read(self, dvc_path: str, md5: str | None = None) -> bytes:
        """The tracked bytes, pulled from the remote into a fresh clone.

        Without `md5`: the revision this repo's `.dvc` file records. With `md5` (a revision from
        an asset's metadata): that revision, even if `dvc_path` was re-tracked since, and even on
        a machine that never had this repo. Nothing from this repo's workspace or cache is used,
        so identical bytes prove the remote holds the file (DVC checks the md5 while pulling).
        """
        from dvc.exceptions import DvcException
        from dvc.repo import Repo

        revision = md5 or self.record(dvc_path).md5
        with tempfile.TemporaryDirectory(prefix="dvc-read-") as scratch:
            clone = Path(scratch)
            self._configure(clone)
            dvc_file = clone / (_check_dvc_path(dvc_path) + ".dvc")
            dvc_file.parent.mkdir(parents=True, exist_ok=True)
            outs = [{"md5": revision, "hash": "md5", "path": PurePosixPath(dvc_path).name}]
            dvc_file.write_text(yaml.safe_dump({"outs": outs}, sort_keys=False))
            try:
                with Repo(str(clone)) as repo:
                    repo.pull(targets=[str(dvc_file)], remote=REMOTE_NAME)
            except DvcException as error:
                raise DvcTrackingError(
                    f"DVC could not pull {dvc_path!r} at md5 {revision} from remote "
                    f"{self._remote}: {error}; check that the revision was pushed there"
                ) from error
            return (clone / dvc_path).read_bytes()


def local_dvc_tracking(home: Path) -> DvcTracking:
    """The local profile's DVC resource: repo `HOME/dvc`, remote folder `HOME/dvc-remote`."""
    home = Path(home)
    return DvcTracking(repo_dir=str(home / "dvc"), remote_url=str(home / "dvc-remote"))
