"""Real outside services for integration tests, each started on loopback on a free port.

Every starter is a context manager that yields the service's URL once the service answers, and
stops the process (and removes its data) on exit. `require_binary` decides what happens when a
binary is missing: the test fails under CI (`CI=true`), and is skipped elsewhere.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 30.0


def require_binary(name: str) -> str:
    """The absolute path of `name` (a command on PATH, or a path); fail under CI, else skip."""
    found = name if os.path.isabs(name) and os.access(name, os.X_OK) else shutil.which(name)
    if found:
        return found
    message = (
        f"integration test needs the binary {name!r}, which is not installed "
        "(install the Debian package / `.venv/bin/pip install -e .[dev]`, see the Makefile)"
    )
    under_ci = os.environ.get("CI") == "true"
    (pytest.fail if under_ci else pytest.skip)(message)  # CI: a missing service fails, never skips


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _venv_binary(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return require_binary(name)


def _postgres_binary(name: str) -> str:
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0,
    )
    if candidates:
        return candidates[-1]
    return require_binary(name)


def stop_process(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process group started with `start_new_session`, SIGKILL it after `timeout`."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _log_tail(log_path: Path) -> str:
    if not log_path.exists():
        return ""
    return log_path.read_text(errors="replace")[-2000:]


def _wait_until(
    answers: Callable[[], bool], process: subprocess.Popen, what: str, log_path: Path
) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with code {process.returncode} before answering; "
                f"its output:\n{_log_tail(log_path)}"
            )
        if answers():
            return
        time.sleep(0.1)
    raise RuntimeError(
        f"{what} did not answer within {STARTUP_TIMEOUT_S:.0f} s; its output:\n{_log_tail(log_path)}"
    )


def _http_answers(url: str) -> Callable[[], bool]:
    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status < 500
        except urllib.error.HTTPError as error:
            return error.code < 500
        except OSError:
            return False

    return answers


def _redis_answers(port: int) -> Callable[[], bool]:
    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    return answers


@contextmanager
def _running(
    command: list[str],
    what: str,
    answers_for: Callable[[], bool],
    workdir: Path,
    extra_env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen]:
    log_path = workdir / "service.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env={**os.environ, **(extra_env or {})},
            start_new_session=True,
        )
    try:
        _wait_until(answers_for, process, what, log_path)
        yield process
    finally:
        stop_process(process)


@contextmanager
def moto_server(extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """A moto S3 server (moto[server]'s `moto_server`); yields its endpoint URL.

    `extra_env` reaches the server process, e.g. `{"INITIAL_NO_AUTH_ACTION_COUNT": "0"}` makes
    it check credentials like AWS does.
    """
    binary = _venv_binary("moto_server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="moto-") as workdir:
        command = [binary, "-H", "127.0.0.1", "-p", str(port)]
        answers = _http_answers(f"{url}/moto-api/")
        with _running(command, "moto_server", answers, Path(workdir), extra_env):
            yield url


@contextmanager
def redis_server() -> Iterator[str]:
    """A throw-away `redis-server` with persistence off; yields `redis://127.0.0.1:PORT/0`."""
    binary = require_binary("redis-server")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="redis-") as workdir:
        command = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ]
        with _running(command, "redis-server", _redis_answers(port), Path(workdir)):
            yield f"redis://127.0.0.1:{port}/0"


@contextmanager
def pushgateway() -> Iterator[str]:
    """Debian's Prometheus Pushgateway; yields its base URL."""
    binary = require_binary("/usr/bin/prometheus-pushgateway")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="pushgateway-") as workdir:
        command = [binary, f"--web.listen-address=127.0.0.1:{port}"]
        with _running(
            command, "prometheus-pushgateway", _http_answers(f"{url}/-/ready"), Path(workdir)
        ):
            yield url


def _as_postgres_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return [require_binary("runuser"), "-u", "postgres", "--", *command]


def _start_postgres(workdir: Path, port: int, database: str) -> None:
    data_dir = workdir / "data"
    options = f"-h 127.0.0.1 -p {port} -k {workdir} -c fsync=off -c full_page_writes=off"
    steps = [
        _as_postgres_user(
            [
                _postgres_binary("initdb"),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ]
        ),
        _as_postgres_user(
            [
                _postgres_binary("pg_ctl"),
                "-D",
                str(data_dir),
                "-l",
                str(workdir / "postgres.log"),
                "-o",
                options,
                "-w",
                "-t",
                str(int(STARTUP_TIMEOUT_S)),
                "start",
            ]
        ),
        [
            _postgres_binary("createdb"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            "postgres",
            database,
        ],
    ]
    for step in steps:
        try:
            subprocess.run(step, check=True, capture_output=True, timeout=STARTUP_TIMEOUT_S + 60)
        except subprocess.CalledProcessError as error:
            raise RuntimeError(
                f"PostgreSQL did not start: {' '.join(step)} exited {error.returncode}: "
                f"{error.stderr.decode(errors='replace')}\n{_log_tail(workdir / 'postgres.log')}"
            ) from error


@contextmanager
def postgres_server(database: str = "mri_assets") -> Iterator[str]:
    """A PostgreSQL cluster in a temp dir (initdb + pg_ctl, as user `postgres` when run as root).

    Yields a SQLAlchemy URL (`postgresql+psycopg2://postgres@127.0.0.1:PORT/DATABASE`).
    """
    pg_ctl = _postgres_binary("pg_ctl")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="postgres-"))
    if os.geteuid() == 0:
        shutil.chown(workdir, user="postgres", group="postgres")
    try:
        _start_postgres(workdir, port, database)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{database}"
    finally:
        if (workdir / "data" / "postmaster.pid").exists():
            subprocess.run(
                _as_postgres_user(
                    [pg_ctl, "-D", str(workdir / "data"), "-m", "immediate", "-w", "stop"]
                ),
                check=False,
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(workdir, ignore_errors=True)
