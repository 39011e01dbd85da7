"""The object store: one interface, a local-folder backend and an S3-compatible backend.

Keys are '/'-separated and relative to the store root (local) or to `bucket/prefix` (S3).
Writes are atomic: an object is visible under its final key only once it is complete.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import uuid
from abc import abstractmethod
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from dagster import ConfigurableResource
from pydantic import PrivateAttr

from mri_assets.core.temporaries import is_temporary_file, scratch_prefix, temp_prefix

SCRATCH_FOLDER = ".scratch"


class ObjectStoreError(RuntimeError):
    """A store operation failed in a way the user can act on."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    version_id: str | None = None


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ObjectStoreError(f"invalid object key {key!r}: use a relative '/'-separated path")
    return key


class ObjectStore(ConfigurableResource):
    """What every backend offers. Choose the backend in `definitions.py`, never in an asset."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str | None:
        """Store `data` atomically under `key`; return the new VersionId where the store versions."""

    @abstractmethod
    def get_bytes(self, key: str, version_id: str | None = None) -> bytes: ...

    @abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str | None]:
        """The current bytes and the VersionId they belong to (None where unversioned)."""

    @abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object below `prefix`, recursively, sorted by key."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """A local file with the object's current bytes (the file itself, or a cached copy)."""

    def put_file(self, key: str, path: Path) -> str | None:
        return self.put_bytes(key, Path(path).read_bytes())

    def publish_file(self, key: str, path: Path) -> str | None:
        """Store the local file `path` under `key` and remove `path` (a rename where the store allows)."""
        version = self.put_file(key, path)
        Path(path).unlink()
        return version

    def scratch_dir(self) -> tempfile.TemporaryDirectory:
        """A temporary folder for files about to be published (on the store's file system if local)."""
        return tempfile.TemporaryDirectory(prefix=scratch_prefix())

    def copy(self, source_key: str, key: str) -> str | None:
        """Store the current bytes of `source_key` under `key` too, atomically, without passing
        them through this process where the store allows (a hard link, a server-side copy)."""
        return self.put_bytes(key, self.get_bytes(source_key))

    def size(self, key: str) -> int:
        """The object's length in bytes."""
        return len(self.get_bytes(key))

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes of the object's current version from byte `start` (fewer at its end)."""
        return self.get_bytes(key)[start : start + length]

    def is_versioned(self) -> bool:
        return False

    def sha256(self, key: str) -> str:
        return hashlib.sha256(self.get_bytes(key)).hexdigest()


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Objects get the mode any new file of this process gets (0o666 less the umask), not the 0o600
# of the temporary file they are written to first.
_FILE_MODE = 0o666 & ~_current_umask()


class LocalObjectStore(ObjectStore):
    """A folder on a local or shared file system. Objects get the process's normal file mode."""

    root: str

    def _path(self, key: str) -> Path:
        return Path(self.root).resolve() / _check_key(key)

    def put_bytes(self, key: str, data: bytes) -> str | None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                os.fchmod(handle.fileno(), _FILE_MODE)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return None

    def put_file(self, key: str, path: Path) -> str | None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=".part", dir=target.parent)
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return None

    def publish_file(self, key: str, path: Path) -> str | None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, target)
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
            return super().publish_file(key, path)
        return None

    def copy(self, source_key: str, key: str) -> str | None:
        """A hard link where the file system allows: objects are never rewritten in place (every
        write replaces the name), so the two names can share one file.

        When `key` already names the same file (a rerun), nothing is done: renaming a second link
        of a file over the first is a no-op in POSIX that would leave the temporary name behind.
        """
        source = self.local_path(source_key)
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with suppress(FileNotFoundError):
            if os.path.samefile(source, target):
                return None
        tmp = target.parent / f"{temp_prefix(target.name)}{uuid.uuid4().hex[:8]}.part"
        try:
            try:
                os.link(source, tmp)
            except OSError:  # no hard links here (another device, a FAT or SMB share): copy
                shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        finally:
            # Gone after a rename; still there when it failed, or when `target` became a link of
            # the same file meanwhile (the rename then does nothing).
            tmp.unlink(missing_ok=True)
        return None

    def size(self, key: str) -> int:
        return self.local_path(key).stat().st_size

    def read_range(self, key: str, start: int, length: int) -> bytes:
        with open(self.local_path(key), "rb") as handle:
            return os.pread(handle.fileno(), length, start)

    def scratch_dir(self) -> tempfile.TemporaryDirectory:
        base = Path(self.root).resolve() / SCRATCH_FOLDER
        base.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix=scratch_prefix(), dir=base)

    def get_bytes(self, key: str, version_id: str | None = None) -> bytes:
        if version_id is not None:
            raise ObjectStoreError(
                f"the local store keeps no versions; asked for {key!r} at version {version_id!r}"
            )
        path = self._path(key)
        if not path.is_file():
            raise ObjectStoreError(f"no object {key!r} in local store {self.root}")
        return path.read_bytes()

    def get_versioned(self, key: str) -> tuple[bytes, str | None]:
        return self.get_bytes(key), None

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = Path(self.root).resolve()
        folder = prefix.rstrip("/")
        start = base / _check_key(folder) if folder else base
        if start.is_file():
            return [ObjectInfo(folder, start.stat().st_size)]
        if not start.is_dir():
            return []
        found = [
            ObjectInfo(p.relative_to(base).as_posix(), p.stat().st_size)
            for p in start.rglob("*")
            if p.is_file() and not is_temporary_file(p.name)
            and p.relative_to(base).parts[0] != SCRATCH_FOLDER
        ]
        return sorted(found, key=lambda info: info.key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def local_path(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ObjectStoreError(f"no object {key!r} in local store {self.root}")
        return path


MULTIPART_PART_BYTES = 64 * 1024 * 1024
# Sized so that an endpoint that stops answering fails a call in under 40 s (3 attempts of at
# most 5 s to connect + 10 s to answer, plus the backoff): inside two minutes even for a step
# that Dagster retries twice (the embeddings step).
S3_MAX_ATTEMPTS = 3
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 10.0
LOG = logging.getLogger("mri_assets.object_store")


class _RetryReporter:
    """Says on the console (a WARNING log line) each time a call to S3 failed and botocore is
    about to try again, naming the endpoint, the operation, the attempt and the error."""

    def __init__(self, endpoint: str, max_attempts: int) -> None:
        self.endpoint = endpoint
        self.max_attempts = max_attempts

    def __call__(self, attempts: int = 0, response=None, caught_exception=None, operation=None,
                 **_) -> None:
        if attempts >= self.max_attempts:
            return
        if caught_exception is not None:
            error = f"{type(caught_exception).__name__}: {caught_exception}"
        else:
            parsed = response[1] if response else {}
            status = parsed.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status < 500 and status != 429:
                return
            error = f"HTTP {status}"
        LOG.warning("S3 %s at %s failed (attempt %d of %d: %s); retrying",
                    getattr(operation, "name", "request"), self.endpoint, attempts,
                    self.max_attempts, error)


def _check_s3_settings(store: S3ObjectStore) -> None:
    """One-line errors for S3 settings that cannot work, naming the setting and what it takes."""
    endpoint = store.endpoint_url
    if endpoint is not None and urlparse(endpoint).scheme not in ("http", "https"):
        raise ObjectStoreError(
            f"S3 endpoint_url {endpoint!r} (MRI_ASSETS_S3_ENDPOINT_URL / AWS_ENDPOINT_URL) is "
            "not an http(s) URL: use e.g. http://127.0.0.1:9000 or https://s3.example.org")
    if not 1 <= store.max_attempts <= 10:
        raise ObjectStoreError(f"S3 max_attempts {store.max_attempts} must be 1 to 10")
    for name in ("connect_timeout_s", "read_timeout_s"):
        if not 0 < getattr(store, name) <= 600:
            raise ObjectStoreError(f"S3 {name} {getattr(store, name)} must be in (0, 600] seconds")
SINGLE_COPY_MAX_BYTES = 5 * 1024**3
_S3_AUTH_ERRORS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
    "403",
}
_S3_MISSING_KEY_ERRORS = {"NoSuchKey", "404", "NotFound"}
_S3_MISSING_VERSION_ERRORS = {"NoSuchVersion", "InvalidArgument"}


def _error_code(error: BaseException | None) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


_BOTO_SESSIONS: dict[int, object] = {}
_BOTO_SESSIONS_LOCK = threading.Lock()


def _s3_client(endpoint_url: str | None, config):
    """A new client from one boto3 session per process (a session loads the S3 model once)."""
    import boto3

    with _BOTO_SESSIONS_LOCK:
        session = _BOTO_SESSIONS.get(os.getpid())
        if session is None:
            session = _BOTO_SESSIONS[os.getpid()] = boto3.session.Session()
        return session.client("s3", endpoint_url=endpoint_url, config=config)


def _pinnable_version(response: dict) -> str | None:
    """The VersionId S3 answered, or None where it names no fixed bytes (absent or 'null')."""
    version_id = response.get("VersionId")
    return None if version_id in (None, "null") else version_id


def _default_cache_dir() -> Path:
    """Where a store built without `cache_dir` caches (the deployment's stores use `HOME/cache`)."""
    return Path(tempfile.gettempdir()) / "mri_assets-cache"


class S3ObjectStore(ObjectStore):
    """A bucket (and optional prefix) in AWS S3 or any S3-compatible store, through boto3.

    Credentials come from the usual AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
    AWS_SESSION_TOKEN, AWS_PROFILE, instance roles), never from this config.

    Atomic writes: S3 makes an object visible only when its single PUT, or the
    CompleteMultipartUpload of a multipart upload, succeeds; a failed multipart upload is
    aborted, so a half-written object never appears under its key. On a versioned bucket,
    `put_*` returns the new VersionId and `delete` only adds a delete marker, so reads pinned to
    a recorded VersionId keep returning the original bytes. A VersionId of 'null' (unversioned
    or suspended bucket) is reported as None: it pins nothing.
    """

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region_name: str = "us-east-1"
    cache_dir: str | None = None
    multipart_threshold_bytes: int = MULTIPART_PART_BYTES
    max_attempts: int = S3_MAX_ATTEMPTS
    connect_timeout_s: float = S3_CONNECT_TIMEOUT_S
    read_timeout_s: float = S3_READ_TIMEOUT_S

    _client: object = PrivateAttr(default=None)
    _client_pid: int = PrivateAttr(default=-1)
    _bucket_checked: bool = PrivateAttr(default=False)

    def _s3(self):
        if self._client is None or self._client_pid != os.getpid():
            from botocore.config import Config

            s3_options = {"addressing_style": "path"} if self.endpoint_url else {}
            _check_s3_settings(self)
            config = Config(
                region_name=self.region_name,
                retries={"total_max_attempts": self.max_attempts, "mode": "standard"},
                connect_timeout=self.connect_timeout_s,
                read_timeout=self.read_timeout_s,
                s3=s3_options,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            self._client = _s3_client(self.endpoint_url, config)
            self._client.meta.events.register(
                "needs-retry.s3", _RetryReporter(self._endpoint, self.max_attempts))
            self._client_pid = os.getpid()
        return self._client

    @property
    def _endpoint(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region_name})"

    def _full_key(self, key: str) -> str:
        key = _check_key(key)
        base = self.prefix.strip("/")
        return f"{base}/{key}" if base else key

    def _relative_key(self, full_key: str) -> str:
        base = self.prefix.strip("/")
        return full_key[len(base) + 1 :] if base else full_key

    @contextmanager
    def _translated_errors(
        self,
        action: str,
        key: str | None = None,
        version_id: str | None = None,
        missing: str = "key",
    ):
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        where = f"s3://{self.bucket}/{self._full_key(key)}" if key else f"s3://{self.bucket}"
        try:
            yield
        except ClientError as error:
            code = _error_code(error)
            if missing == "bucket" and code in _S3_MISSING_KEY_ERRORS:
                code = "NoSuchBucket"
            raise self._client_error(action, where, code, version_id, error) from error
        except (EndpointConnectionError, ConnectTimeoutError) as error:
            raise ObjectStoreError(
                f"cannot {action} {where}: the S3 endpoint {self._endpoint} is unreachable "
                f"({error}); check the endpoint URL (endpoint_url / AWS_ENDPOINT_URL / "
                "MRI_ASSETS_S3_ENDPOINT_URL), that the server is running, and network/proxy "
                "settings"
            ) from error
        except ReadTimeoutError as error:
            raise ObjectStoreError(
                f"cannot {action} {where}: the S3 endpoint {self._endpoint} stopped answering "
                f"({error}); check the server's health and load"
            ) from error
        except (NoCredentialsError, PartialCredentialsError) as error:
            raise ObjectStoreError(
                f"cannot {action} {where}: no usable AWS credentials ({error}); set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from error

    def _client_error(
        self, action: str, where: str, code: str, version_id: str | None, error: Exception
    ) -> ObjectStoreError:
        if code == "NoSuchBucket":
            return ObjectStoreError(
                f"cannot {action} {where}: bucket {self.bucket!r} does not exist at "
                f"{self._endpoint}; create it or fix the bucket name in the config or URI"
            )
        if code in _S3_AUTH_ERRORS:
            return ObjectStoreError(
                f"cannot {action} {where}: {self._endpoint} rejected the credentials ({code}); "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), and "
                f"that they may access bucket {self.bucket!r}"
            )
        if version_id is not None and code in _S3_MISSING_VERSION_ERRORS | {"404"}:
            return ObjectStoreError(
                f"cannot {action} {where}: version {version_id!r} does not exist (was it "
                "deleted, or recorded from another bucket?)"
            )
        if code in _S3_MISSING_KEY_ERRORS:
            return ObjectStoreError(f"cannot {action} {where}: no such object")
        return ObjectStoreError(f"cannot {action} {where} at {self._endpoint}: {error}")

    def _ensure_bucket(self) -> None:
        if self._bucket_checked:
            return
        with self._translated_errors("check bucket", missing="bucket"):
            self._s3().head_bucket(Bucket=self.bucket)
        self._bucket_checked = True

    def put_bytes(self, key: str, data: bytes) -> str | None:
        with self._translated_errors("write", key):
            response = self._s3().put_object(Bucket=self.bucket, Key=self._full_key(key), Body=data)
        return _pinnable_version(response)

    def put_file(self, key: str, path: Path) -> str | None:
        path = Path(path)
        if path.stat().st_size <= self.multipart_threshold_bytes:
            with open(path, "rb") as handle, self._translated_errors("write", key):
                response = self._s3().put_object(
                    Bucket=self.bucket, Key=self._full_key(key), Body=handle
                )
            return _pinnable_version(response)
        return self._put_multipart(key, path)

    def _put_multipart(self, key: str, path: Path) -> str | None:
        client = self._s3()
        full_key = self._full_key(key)
        part_bytes = max(self.multipart_threshold_bytes, 5 * 1024 * 1024)
        with self._translated_errors("start a multipart upload to", key):
            upload_id = client.create_multipart_upload(Bucket=self.bucket, Key=full_key)["UploadId"]
        try:
            parts = []
            with open(path, "rb") as handle, self._translated_errors("upload a part to", key):
                while chunk := handle.read(part_bytes):
                    number = len(parts) + 1
                    answer = client.upload_part(
                        Bucket=self.bucket,
                        Key=full_key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=chunk,
                    )
                    parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            with self._translated_errors("complete the multipart upload to", key):
                response = client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=full_key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            self._abort_multipart(full_key, upload_id)
            raise
        return _pinnable_version(response)

    def _abort_multipart(self, full_key: str, upload_id: str) -> None:
        """Drop the parts of a failed upload; if even that fails, the original error matters more.

        Parts left behind stay invisible (never an object under the key); a bucket lifecycle
        rule `AbortIncompleteMultipartUpload` reclaims them.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        with suppress(BotoCoreError, ClientError):
            self._s3().abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)

    def _get(self, key: str, version_id: str | None) -> dict:
        arguments = {"Bucket": self.bucket, "Key": self._full_key(key)}
        if version_id is not None:
            arguments["VersionId"] = version_id
        with self._translated_errors("read", key, version_id):
            return self._s3().get_object(**arguments)

    def get_bytes(self, key: str, version_id: str | None = None) -> bytes:
        response = self._get(key, version_id)
        with self._translated_errors("read", key, version_id):
            return response["Body"].read()

    def get_versioned(self, key: str) -> tuple[bytes, str | None]:
        response = self._get(key, None)
        with self._translated_errors("read", key):
            data = response["Body"].read()
        return data, _pinnable_version(response)

    def _list_full_prefix(self, full_prefix: str) -> list[ObjectInfo]:
        paginator = self._s3().get_paginator("list_objects_v2")
        found = []
        with self._translated_errors("list", None):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                found.extend(
                    ObjectInfo(self._relative_key(item["Key"]), int(item["Size"]))
                    for item in page.get("Contents", [])
                )
        return found

    def list(self, prefix: str) -> list[ObjectInfo]:
        folder = _check_key(prefix.rstrip("/")) if prefix.rstrip("/") else ""
        base = self.prefix.strip("/")
        full_folder = "/".join(part for part in (base, folder) if part)
        found = self._list_full_prefix(f"{full_folder}/" if full_folder else "")
        if folder:
            head = self._head_if_exists(folder)
            if head is not None:
                found.append(ObjectInfo(folder, int(head["ContentLength"])))
        return sorted(found, key=lambda info: info.key)

    def _head(self, key: str) -> dict:
        with self._translated_errors("look up", key):
            return self._s3().head_object(Bucket=self.bucket, Key=self._full_key(key))

    def _head_if_exists(self, key: str) -> dict | None:
        try:
            return self._head(key)
        except ObjectStoreError as error:
            if _error_code(error.__cause__) in _S3_MISSING_KEY_ERRORS:
                self._ensure_bucket()
                return None
            raise

    def exists(self, key: str) -> bool:
        return self._head_if_exists(key) is not None

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        arguments = {"Bucket": self.bucket, "Key": self._full_key(key),
                     "Range": f"bytes={start}-{start + length - 1}"}
        with self._translated_errors("read", key):
            return self._s3().get_object(**arguments)["Body"].read()

    def copy(self, source_key: str, key: str) -> str | None:
        """A server-side copy of the source's current version: no byte passes through here."""
        head = self._head(source_key)
        source = {"Bucket": self.bucket, "Key": self._full_key(source_key)}
        version_id = _pinnable_version(head)
        if version_id:
            source["VersionId"] = version_id
        with self._translated_errors("copy into", key):
            if int(head["ContentLength"]) <= SINGLE_COPY_MAX_BYTES:
                response = self._s3().copy_object(
                    Bucket=self.bucket, Key=self._full_key(key), CopySource=source)
                return _pinnable_version(response)
            # above 5 GiB S3 needs a multipart copy; boto3's managed copy does that server-side
            self._s3().copy(source, self.bucket, self._full_key(key))
        return _pinnable_version(self._head(key))

    def delete(self, key: str) -> None:
        with self._translated_errors("delete", key):
            self._s3().delete_object(Bucket=self.bucket, Key=self._full_key(key))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full_key(key)}"

    def is_versioned(self) -> bool:
        with self._translated_errors("read the versioning status of", None):
            answer = self._s3().get_bucket_versioning(Bucket=self.bucket)
        return answer.get("Status") == "Enabled"

    def local_path(self, key: str) -> Path:
        """A cached local copy, named by key + VersionId (or ETag): a changed object is refetched."""
        head = self._head(key)
        version_id = _pinnable_version(head)
        tag = version_id or head["ETag"].strip('"')
        cache_root = Path(self.cache_dir) if self.cache_dir else _default_cache_dir()
        location = hashlib.sha256(
            f"{self._endpoint}\n{self.bucket}\n{self._full_key(key)}".encode()
        ).hexdigest()[:32]
        target = cache_root / "s3" / location / hashlib.sha256(tag.encode()).hexdigest()[:16]
        target = target / key.rsplit("/", 1)[-1]
        if target.is_file():
            return target
        arguments = {"Bucket": self.bucket, "Key": self._full_key(key)}
        if version_id:
            arguments["VersionId"] = version_id
        else:
            arguments["IfMatch"] = head["ETag"]
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle, self._translated_errors("download", key):
                body = self._s3().get_object(**arguments)["Body"]
                for chunk in iter(lambda: body.read(1024 * 1024), b""):
                    handle.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target


def store_from_uri(
    uri: str,
    cache_dir: str | Path | None = None,
    endpoint_url: str | None = None,
    region_name: str = "us-east-1",
) -> ObjectStore:
    """The store a path or URI names: a local path or `file://` URI, or `s3://bucket[/prefix]`.

    For S3, `endpoint_url` (None: AWS itself) and `region_name`; `resources.deployed.source_store_for`
    takes both from the deployment (MRI_ASSETS_S3_ENDPOINT_URL, else AWS_ENDPOINT_URL_S3, else
    AWS_ENDPOINT_URL; AWS_REGION / AWS_DEFAULT_REGION).
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ObjectStoreError(f"S3 URI {uri!r} names no bucket: use s3://BUCKET[/PREFIX]")
        return S3ObjectStore(
            bucket=parsed.netloc,
            prefix=parsed.path.strip("/"),
            endpoint_url=endpoint_url,
            region_name=region_name,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
        )
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ObjectStoreError(f"file URI {uri!r} names a remote host; use file:///ABS/PATH")
        return LocalObjectStore(root=str(Path(url2pathname(parsed.path)).resolve()))
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ObjectStoreError(
            f"unsupported store URI {uri!r}: use a local path, file:///PATH or s3://BUCKET[/PREFIX]"
        )
    if not uri:
        raise ObjectStoreError("empty store path: give a local folder, file:///PATH or s3://BUCKET")
    return LocalObjectStore(root=str(Path(uri).expanduser().resolve()))
