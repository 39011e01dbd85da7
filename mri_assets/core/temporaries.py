"""Temporary files and folders that name the process that wrote them, and the sweep that removes
those whose process is gone.

Every temporary this package writes under MRI_ASSETS_HOME carries its writer's pid:

- a file written beside its target and then renamed over it (atomic writes):
  `.{target name}.p{pid}.{random}.part` (or `.tmp`), hidden, in the target's folder;
- a scratch folder: `{kind}-p{pid}-{random}`, directly inside a scratch root
  (`store/.scratch`, `mlflow/.scratch`, `HOME/scratch`).

A process that ends normally removes its own. One that is killed cannot, so `sweep` removes
every temporary whose process no longer runs on this machine (a live writer's files are never
touched, whatever their age), and temporaries without a pid (written by older versions) once
they are older than `legacy_age_s`. Only names of this form are ever removed.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

TEMP_SUFFIXES = (".part", ".tmp")
# SQLite's side files of a database written under a temporary name.
_SIDE_FILES = ("-journal", "-wal", "-shm")
_FILE_PID = re.compile(r"\.p(\d+)\.")
_FOLDER_PID = re.compile(r"-p(\d+)-")
LEGACY_AGE_S = 3600.0


def temp_prefix(target_name: str) -> str:
    """The start of a temporary file's name for `target_name` (for `tempfile.mkstemp(prefix=)`)."""
    return f".{target_name}.p{os.getpid()}."


def scratch_prefix(kind: str = "mri-assets") -> str:
    """The start of a scratch folder's name (for `tempfile.TemporaryDirectory(prefix=)`)."""
    return f"{kind}-p{os.getpid()}-"


def is_temporary_file(name: str) -> bool:
    """`.NAME….part` / `.NAME….tmp` (and SQLite's journal of such a file)."""
    if not name.startswith(".") or len(name) < 3:
        return False
    for side in _SIDE_FILES:
        if name.endswith(side):
            name = name[: -len(side)]
            break
    return name.endswith(TEMP_SUFFIXES)


def writer_pid(name: str) -> int | None:
    """The pid a temporary's name records, or None (written before names carried one)."""
    found = _FILE_PID.search(name) or _FOLDER_PID.search(name)
    return int(found.group(1)) if found else None


def process_runs(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


@dataclass
class SweepReport:
    files: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    bytes: int = 0

    @property
    def count(self) -> int:
        return len(self.files) + len(self.folders)

    def describe(self) -> str:
        return (f"removed {len(self.files)} temporary files and {len(self.folders)} scratch "
                f"folders ({self.bytes / 1e6:.1f} MB) left by processes that are gone")


def _stale(name: str, path: Path, now: float, legacy_age_s: float) -> bool:
    pid = writer_pid(name)
    if pid is not None:
        return pid != os.getpid() and not process_runs(pid)
    try:
        return now - path.lstat().st_mtime > legacy_age_s
    except FileNotFoundError:
        return False


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                pass
    return total


def sweep(
    root: Path,
    scratch_roots: Iterable[Path] = (),
    legacy_age_s: float = LEGACY_AGE_S,
    now: float | None = None,
) -> SweepReport:
    """Remove the temporary files below `root` and the entries of `scratch_roots` that no
    running process writes (see the module's docstring). Symbolic links are not followed."""
    now = time.time() if now is None else now
    report = SweepReport()
    scratch = {Path(p).resolve() for p in scratch_roots}
    for folder in sorted(scratch):
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            path = Path(entry.path)
            is_dir = entry.is_dir(follow_symlinks=False)
            if not _stale(entry.name, path, now, legacy_age_s):
                continue
            if is_dir:
                size = _tree_bytes(path)
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    report.folders.append(path)
                    report.bytes += size
            else:
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                    path.unlink()
                except FileNotFoundError:
                    continue
                report.files.append(path)
                report.bytes += size
    root = Path(root)
    if not root.is_dir():
        return report
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        if here.resolve() in scratch:
            dirs[:] = []
            continue
        for name in files:
            if not is_temporary_file(name):
                continue
            path = here / name
            if not _stale(name, path, now, legacy_age_s):
                continue
            try:
                size = path.lstat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            report.files.append(path)
            report.bytes += size
    return report
