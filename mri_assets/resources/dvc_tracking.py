"""DVC tracking of produced files (embedding shards): a DVC repo whose remote lives in the store.

Local profile: repo in `MRI_ASSETS_HOME/dvc`, remote folder `MRI_ASSETS_HOME/dvc-remote`.
Other profiles: remote `s3://BUCKET/PREFIX/dvc` with `remote_endpoint_url` for S3-compatible
stores; credentials come from the usual AWS variables.

DVC runs as a command-line tool in its own environment (`.venv-dvc/`, built by `make dvc-env`
from `requirements/dvc.lock.txt`), never imported here: DVC's hydra-core/omegaconf pin
`antlr4-python3-runtime==4.9.*`, while Dagster's asset-selection parser needs the 4.13 runtime.

Several Dagster steps (processes) may track different shards at once: every repo operation runs
under one file lock beside the repo, so DVC's own repo lock never makes a step fail.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml
from dagster import ConfigurableResource
from filelock import FileLock, Timeout

from mri_assets.core.temporaries import temp_prefix
from mri_assets.deployment import child_environment

REMOTE_NAME = "storage"
LOCK_TIMEOUT_S = 1800.0
COMMAND_TIMEOUT_S = 3600.0
DVC_ENV_DIR = ".venv-dvc"
DVC_EXECUTABLE_ENV = "MRI_ASSETS_DVC"
SITE_CACHE = ".dvc/tmp/site-cache"
# Variables that could point the DVC environment's interpreter at another environment's packages.
_PYTHON_ENV_LEAKS = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__")


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


def _file_md5(path: Path) -> tuple[str, int]:
    """The md5 and size DVC 3 records for a file (`hash: md5`: the md5 of its bytes)."""
    digest = hashlib.md5()
    size = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


class DvcBatch:
    """Files tracked together (`DvcTracking.batched`): each is copied into the workspace when it is
    tracked, and its record (the md5 DVC will record) returned at once; `add_and_push` runs one
    `dvc add` and one `dvc push` for all of them and checks that DVC recorded those md5s. Every
    other attribute is the resource's own."""

    def __init__(self, tracking: DvcTracking) -> None:
        self._tracking = tracking
        self._expected: dict[str, DvcRecord] = {}

    def __getattr__(self, name: str):
        return getattr(self._tracking, name)

    def track(self, local_file: Path, dvc_path: str) -> DvcRecord:
        with self._tracking._locked():
            record = self._tracking._stage(local_file, dvc_path)
        self._expected[record.dvc_path] = record
        return record

    def add_and_push(self) -> None:
        if self._expected:
            with self._tracking._locked():
                self._tracking._add_and_push(list(self._expected.values()))
            self._expected.clear()


def _write_atomically(target: Path, text: str) -> None:
    """Write `text` to `target` unless it already holds exactly that (no needless mtime change)."""
    if target.is_file() and target.read_text() == text:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_atomically(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _config_value(value: str) -> str:
    """A value for DVC's INI config (configobj syntax): quoted, so commas and '#' stay literal."""
    if '"' not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    raise DvcTrackingError(f"cannot write {value!r} to the DVC config: it holds both quote kinds")


def _config_text(sections: dict[str, dict[str, str]]) -> str:
    lines = [
        "# Written by mri_assets (resources/dvc_tracking.py) on every repo operation; put your",
        "# own settings in .dvc/config.local, which DVC merges over this file.",
    ]
    for section, settings in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"    {key} = {_config_value(value)}" for key, value in settings.items())
    return "\n".join(lines) + "\n"


def _project_roots() -> list[Path]:
    """Folders that may hold `.venv-dvc/`: the one holding this interpreter's venv, and the
    source checkout this module was imported from (an editable install)."""
    roots = [Path(sys.prefix).resolve().parent, Path(__file__).resolve().parents[2]]
    return list(dict.fromkeys(roots))


def find_dvc_executable(configured: str | None = None) -> str:
    """The `dvc` program to run: `configured` (a path, or a name looked up on PATH; the deployment
    passes `$MRI_ASSETS_DVC`), else `.venv-dvc/bin/dvc` beside the project's venv, else `dvc` on
    PATH."""
    wanted = configured or None
    if wanted:
        found = shutil.which(str(Path(wanted).expanduser()))
        if found is None:
            raise DvcTrackingError(
                f"dvc_executable (${DVC_EXECUTABLE_ENV}) is {wanted!r}, which is not an "
                "executable file nor a program on PATH; "
                f"run `make dvc-env` (builds {DVC_ENV_DIR}/ from requirements/dvc.lock.txt) or "
                "point it at an installed `dvc`"
            )
        return found
    candidates = [root / DVC_ENV_DIR / "bin" / "dvc" for root in _project_roots()]
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which("dvc")
    if on_path is not None:
        return on_path
    raise DvcTrackingError(
        "DVC is not installed: looked for "
        + ", ".join(str(candidate) for candidate in candidates)
        + " and for `dvc` on PATH. Run `make dvc-env` in the project (it builds "
        f"{DVC_ENV_DIR}/ from requirements/dvc.lock.txt), or set the dvc resource's "
        f"`dvc_executable` (or ${DVC_EXECUTABLE_ENV}) to a `dvc` program. DVC must not be "
        "installed in the project's own environment (its ANTLR pin breaks Dagster's --select)."
    )


class DvcTracking(ConfigurableResource):
    """A DVC repo (no Git) with one default remote; `track` adds and pushes, `read` pulls.

    `dvc_executable`: the `dvc` program (path or name on PATH); unset, see `find_dvc_executable`.
    """

    repo_dir: str
    remote_url: str
    remote_endpoint_url: str | None = None
    dvc_executable: str | None = None

    @property
    def _repo_path(self) -> Path:
        return Path(self.repo_dir).expanduser().resolve()

    @property
    def _remote(self) -> str:
        if "://" in self.remote_url:
            return self.remote_url
        return str(Path(self.remote_url).expanduser().resolve())

    def _remote_in_config(self, repo_root: Path) -> str:
        """The remote URL as the repo's `.dvc/config` holds it: relative to `.dvc/` (DVC resolves
        relative remote paths against the config file's folder) when the remote folder lies
        in the folder that holds the repo (`MRI_ASSETS_HOME`), so a copied home pushes to its
        own remote, never to the original's; absolute otherwise."""
        if "://" in self._remote:
            return self._remote
        remote = Path(self._remote)
        if not remote.is_relative_to(repo_root.parent):
            return str(remote)
        return Path(os.path.relpath(remote, repo_root / ".dvc")).as_posix()

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

    def _dvc(self, repo_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `dvc ARGS` in `repo_root`; a failure raises `DvcTrackingError` with DVC's output.

        DVC's per-repo site cache goes to `REPO/.dvc/tmp/site-cache` (not `/var/tmp/dvc`), so
        all state stays below the repo; analytics are off.
        """
        executable = find_dvc_executable(self.dvc_executable)
        env = child_environment(
            {"DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(repo_root / SITE_CACHE),
             "PYTHONNOUSERSITE": "1"},
            without=_PYTHON_ENV_LEAKS,
        )
        command = [executable, *args]
        try:
            result = subprocess.run(
                command, cwd=repo_root, env=env, capture_output=True, text=True,
                timeout=COMMAND_TIMEOUT_S, check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise DvcTrackingError(
                f"`dvc {' '.join(args)}` in {repo_root} ran over {COMMAND_TIMEOUT_S:.0f} s"
            ) from error
        if result.returncode != 0:
            output = (result.stderr.strip() or result.stdout.strip())[-2000:]
            raise DvcTrackingError(
                f"`dvc {' '.join(args)}` in {repo_root} failed (exit {result.returncode}): {output}"
            )
        return result

    def _configure(self, repo_root: Path, remote_in_config: str) -> None:
        """`dvc init --no-scm` where missing, then write the repo config this resource owns."""
        if not (repo_root / ".dvc").is_dir():
            repo_root.mkdir(parents=True, exist_ok=True)
            self._dvc(repo_root, "init", "--no-scm", "--quiet")
        remote = {"url": remote_in_config}
        if self.remote_endpoint_url:
            remote["endpointurl"] = self.remote_endpoint_url
        if "://" not in self._remote:
            Path(self._remote).mkdir(parents=True, exist_ok=True)
        sections = {
            "core": {
                "no_scm": "true",
                "analytics": "false",
                "remote": REMOTE_NAME,
                # For `dvc` run by hand from the repo root; our runs set DVC_SITE_CACHE_DIR.
                "site_cache_dir": SITE_CACHE,
            },
            "cache": {"type": "reflink,hardlink,copy"},
            f"'remote \"{REMOTE_NAME}\"'": remote,
        }
        _write_atomically(repo_root / ".dvc" / "config", _config_text(sections))

    def ensure_repo(self) -> Path:
        """Create the repo (`dvc init --no-scm`) if missing and point its default remote here."""
        repo = self._repo_path
        with self._locked():
            repo.mkdir(parents=True, exist_ok=True)
            self._configure(repo, self._remote_in_config(repo))
        return repo

    def track(self, local_file: Path, dvc_path: str) -> DvcRecord:
        """Copy `local_file` to `dvc_path` in the workspace, `dvc add` it and `dvc push` it."""
        with self._locked():
            expected = self._stage(local_file, dvc_path)
            self._add_and_push([expected])
        return expected

    @contextmanager
    def batched(self) -> Iterator[DvcBatch]:
        """A `DvcBatch`: `track` many files, then one `dvc add` and one `dvc push` for them all
        when the block ends without an error (each DVC command starts a Python process of about
        a second; a wave's 16 embedding shards made 32 of them)."""
        batch = DvcBatch(self)
        yield batch
        batch.add_and_push()

    def _add_and_push(self, expected: list[DvcRecord]) -> None:
        """`dvc add` and `dvc push` the staged files, then check that DVC recorded the md5s they
        were staged with (the caller holds the repo lock)."""
        repo = self._repo_path
        paths = [record.dvc_path for record in expected]
        self._configure(repo, self._remote_in_config(repo))
        try:
            self._dvc(repo, "add", "--quiet", *paths)
            self._dvc(repo, "push", "--quiet", "--remote", REMOTE_NAME,
                      *[f"{path}.dvc" for path in paths])
        except DvcTrackingError as error:
            shown = paths[0] if len(paths) == 1 else paths
            raise DvcTrackingError(
                f"DVC could not add and push {shown!r} to remote {self._remote}: {error}; "
                "check the remote URL, its endpoint and the AWS credentials"
            ) from error
        for record in expected:
            md5, size = _read_dvc_file(repo / f"{record.dvc_path}.dvc")
            if (md5, size) != (record.md5, record.size):
                raise DvcTrackingError(
                    f"DVC recorded {record.dvc_path!r} as md5 {md5} ({size} bytes) but the file "
                    f"staged there was md5 {record.md5} ({record.size} bytes): another process "
                    "wrote the same path meanwhile; track it again")

    def _stage(self, local_file: Path, dvc_path: str) -> DvcRecord:
        """Copy `local_file` into the workspace at `dvc_path` and say what DVC will record for it
        (the caller holds the repo lock)."""
        local_file = Path(local_file)
        if not local_file.is_file():
            raise DvcTrackingError(f"cannot track {local_file}: no such file")
        _check_dvc_path(dvc_path)
        repo = self._repo_path
        repo.mkdir(parents=True, exist_ok=True)
        self._configure(repo, self._remote_in_config(repo))
        _copy_atomically(local_file, repo / dvc_path)
        md5, size = _file_md5(repo / dvc_path)
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
        revision = md5 or self.record(dvc_path).md5
        with tempfile.TemporaryDirectory(prefix="dvc-read-") as scratch:
            clone = Path(scratch)
            (clone / ".dvc").mkdir()
            self._configure(clone, self._remote)
            dvc_file = clone / (_check_dvc_path(dvc_path) + ".dvc")
            dvc_file.parent.mkdir(parents=True, exist_ok=True)
            outs = [{"md5": revision, "hash": "md5", "path": PurePosixPath(dvc_path).name}]
            dvc_file.write_text(yaml.safe_dump({"outs": outs}, sort_keys=False))
            try:
                self._dvc(clone, "pull", "--quiet", "--remote", REMOTE_NAME, f"{dvc_path}.dvc")
            except DvcTrackingError as error:
                raise DvcTrackingError(
                    f"DVC could not pull {dvc_path!r} at md5 {revision} from remote "
                    f"{self._remote}: {error}; check that the revision was pushed there"
                ) from error
            return (clone / dvc_path).read_bytes()


def local_dvc_tracking(home: Path) -> DvcTracking:
    """The local profile's DVC resource: repo `HOME/dvc`, remote folder `HOME/dvc-remote`."""
    home = Path(home)
    return DvcTracking(repo_dir=str(home / "dvc"), remote_url=str(home / "dvc-remote"))
