"""The object-store contract, run against the local folder and against S3 on a real moto server."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest

from mri_assets.deployment import Deployment
from mri_assets.resources import object_store as object_store_module
from mri_assets.resources.deployed import source_store_for
from mri_assets.resources.object_store import (
    LocalObjectStore,
    ObjectStore,
    ObjectStoreError,
    S3ObjectStore,
    store_from_uri,
)
from mri_assets_tests import services

PART_BYTES = 5 * 1024 * 1024
S3_PREFIX = "tenant/store"


def _s3_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture(
    params=[
        "local",
        pytest.param("s3-versioned", marks=pytest.mark.integration),
        pytest.param("s3-plain", marks=pytest.mark.integration),
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(root=str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket_fixture = "versioned_bucket" if request.param == "s3-versioned" else "plain_bucket"
    return S3ObjectStore(
        bucket=request.getfixturevalue(bucket_fixture),
        prefix=S3_PREFIX,
        endpoint_url=endpoint,
        cache_dir=str(tmp_path / "cache"),
        multipart_threshold_bytes=PART_BYTES,
    )


@pytest.fixture
def s3_store(s3_endpoint: str, versioned_bucket: str, tmp_path: Path) -> S3ObjectStore:
    return S3ObjectStore(
        bucket=versioned_bucket,
        prefix=S3_PREFIX,
        endpoint_url=s3_endpoint,
        cache_dir=str(tmp_path / "cache"),
        multipart_threshold_bytes=PART_BYTES,
    )


def _payload(size: int, seed: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[seed : seed + size]


@contextmanager
def _writes_interrupted(store: ObjectStore, monkeypatch: pytest.MonkeyPatch):
    """Make the next write fail after data has been sent, before the object is published."""
    if isinstance(store, LocalObjectStore):

        def failing_replace(src, dst):
            raise OSError("disk vanished while publishing")

        monkeypatch.setattr(object_store_module.os, "replace", failing_replace)
        yield
        return
    client = store._s3()
    parts_sent = []

    def fail_on_second_part(params, **kwargs):
        parts_sent.append(params["PartNumber"])
        if params["PartNumber"] == 2:
            raise ConnectionResetError("connection dropped during part 2")

    client.meta.events.register("before-parameter-build.s3.UploadPart", fail_on_second_part)
    try:
        yield
    finally:
        client.meta.events.unregister("before-parameter-build.s3.UploadPart", fail_on_second_part)
    assert parts_sent[:2] == [1, 2], "the interrupted upload must have sent its first part"


def test_put_then_get_returns_the_same_bytes(store: ObjectStore):
    store.put_bytes("raw/pilot/a.bin", b"\x00slice-bytes\xff")
    assert store.get_bytes("raw/pilot/a.bin") == b"\x00slice-bytes\xff"
    data, _ = store.get_versioned("raw/pilot/a.bin")
    assert data == b"\x00slice-bytes\xff"


def test_put_file_and_local_path_round_trip(store: ObjectStore, tmp_path: Path):
    source = tmp_path / "volume.nii.gz"
    source.write_bytes(_payload(3000, 7))
    store.put_file("raw/pilot/p01/volume.nii.gz", source)
    local = store.local_path("raw/pilot/p01/volume.nii.gz")
    assert local.name == "volume.nii.gz"
    assert local.read_bytes() == source.read_bytes()


def test_copy_gives_an_independent_object_of_the_same_bytes(store: ObjectStore):
    store.put_bytes("staging/pilot/shard-00.npy", b"pixels v1")
    store.put_bytes("slices/pilot/shard-00.npy", b"an older shard")
    store.copy("staging/pilot/shard-00.npy", "slices/pilot/shard-00.npy")
    assert store.get_bytes("slices/pilot/shard-00.npy") == b"pixels v1"
    assert store.size("slices/pilot/shard-00.npy") == len(b"pixels v1")
    # the source is replaced later (as a re-materialized manifest does): the copy keeps its bytes
    store.put_bytes("staging/pilot/shard-00.npy", b"pixels v2, longer")
    assert store.get_bytes("slices/pilot/shard-00.npy") == b"pixels v1"
    assert store.size("staging/pilot/shard-00.npy") == len(b"pixels v2, longer")
    assert [i.key for i in store.list("slices/")] == ["slices/pilot/shard-00.npy"]
    with pytest.raises(ObjectStoreError, match="staging/pilot/missing.npy"):
        store.copy("staging/pilot/missing.npy", "slices/pilot/shard-01.npy")


def test_local_copy_is_a_hard_link(tmp_path: Path):
    store = LocalObjectStore(root=str(tmp_path))
    store.put_bytes("staging/a.npy", b"x" * 1000)
    store.copy("staging/a.npy", "slices/a.npy")
    assert store.local_path("slices/a.npy").stat().st_ino == store.local_path("staging/a.npy").stat().st_ino


def test_local_path_follows_an_overwritten_object(store: ObjectStore):
    store.put_bytes("models/pca/pilot.npz", b"first fit")
    assert store.local_path("models/pca/pilot.npz").read_bytes() == b"first fit"
    store.put_bytes("models/pca/pilot.npz", b"second fit")
    assert store.local_path("models/pca/pilot.npz").read_bytes() == b"second fit"


def test_list_is_recursive_sorted_and_scoped_to_the_folder(store: ObjectStore):
    contents = {
        "raw/pilot/p02/b.dcm": b"bb",
        "raw/pilot/_READY": b"{}",
        "raw/pilot/p01/deep/a.png": b"a",
        "raw/pilot2/c.png": b"ccc",
        "raw/pilotx": b"dddd",
        "manifests/pilot/manifest.parquet": b"eeeee",
    }
    for key, data in contents.items():
        store.put_bytes(key, data)

    listed = store.list("raw/pilot")

    assert [(info.key, info.size) for info in listed] == [
        ("raw/pilot/_READY", 2),
        ("raw/pilot/p01/deep/a.png", 1),
        ("raw/pilot/p02/b.dcm", 2),
    ]
    assert [info.key for info in store.list("raw/pilot/")] == [info.key for info in listed]
    assert [info.key for info in store.list("")] == sorted(contents)
    assert store.list("raw/none") == []


def test_listing_one_object_by_its_key_gives_that_object(store: ObjectStore):
    store.put_bytes("raw/pilot/_READY", b"{}")
    assert [(info.key, info.size) for info in store.list("raw/pilot/_READY")] == [
        ("raw/pilot/_READY", 2)
    ]


def test_exists_and_delete(store: ObjectStore):
    store.put_bytes("staging/pilot/shard-00.npy", b"x")
    assert store.exists("staging/pilot/shard-00.npy")
    assert not store.exists("staging/pilot/shard-01.npy")
    store.delete("staging/pilot/shard-00.npy")
    assert not store.exists("staging/pilot/shard-00.npy")
    store.delete("staging/pilot/shard-00.npy")
    assert store.list("staging") == []


def test_reading_a_missing_key_names_the_key(store: ObjectStore):
    with pytest.raises(ObjectStoreError, match="raw/pilot/missing.dcm"):
        store.get_bytes("raw/pilot/missing.dcm")
    with pytest.raises(ObjectStoreError, match="raw/pilot/missing.dcm"):
        store.local_path("raw/pilot/missing.dcm")


@pytest.mark.parametrize("key", ["", "/etc/passwd", "raw/../../x", "raw//a", "./raw/a", "raw/."])
def test_invalid_keys_are_refused(store: ObjectStore, key: str):
    with pytest.raises(ObjectStoreError, match="invalid object key"):
        store.put_bytes(key, b"x")
    with pytest.raises(ObjectStoreError, match="invalid object key"):
        store.get_bytes(key)


@pytest.mark.parametrize("prefix", ["../outside", "/etc", "raw/../.."])
def test_listing_outside_the_store_is_refused(store: ObjectStore, prefix: str):
    with pytest.raises(ObjectStoreError, match="invalid object key"):
        store.list(prefix)


def test_failed_overwrite_keeps_the_previous_bytes_and_leaves_no_partial_object(
    store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    store.put_bytes("embeddings/pilot/shard-03.arrow", b"complete old shard")
    big = tmp_path / "shard-03.arrow"
    big.write_bytes(_payload(2 * PART_BYTES + 1000, 3))

    with _writes_interrupted(store, monkeypatch), pytest.raises((OSError, ObjectStoreError)):
        store.put_file("embeddings/pilot/shard-03.arrow", big)
    with _writes_interrupted(store, monkeypatch), pytest.raises((OSError, ObjectStoreError)):
        store.put_file("embeddings/pilot/shard-04.arrow", big)
    monkeypatch.undo()

    assert store.get_bytes("embeddings/pilot/shard-03.arrow") == b"complete old shard"
    assert not store.exists("embeddings/pilot/shard-04.arrow")
    assert [info.key for info in store.list("embeddings")] == ["embeddings/pilot/shard-03.arrow"]
    if isinstance(store, LocalObjectStore):
        leftovers = [p.name for p in Path(store.root).rglob("*") if p.is_file()]
        assert leftovers == ["shard-03.arrow"]
    else:
        pending = store._s3().list_multipart_uploads(Bucket=store.bucket)
        assert pending.get("Uploads", []) == []


def test_large_file_is_uploaded_whole(store: ObjectStore, tmp_path: Path):
    big = tmp_path / "shard-00.npy"
    big.write_bytes(_payload(2 * PART_BYTES + 1000, 11))
    version_id = store.put_file("slices/pilot/shard-00.npy", big)
    data, read_version = store.get_versioned("slices/pilot/shard-00.npy")
    assert data == big.read_bytes()
    assert read_version == version_id


def test_is_versioned_reports_the_bucket_status(store: ObjectStore, request):
    expected = request.node.callspec.params["store"] == "s3-versioned"
    assert store.is_versioned() is expected


def test_uri_names_the_object(store: ObjectStore):
    uri = store.uri("raw/pilot/a.png")
    if isinstance(store, LocalObjectStore):
        assert uri == (Path(store.root).resolve() / "raw/pilot/a.png").as_uri()
    else:
        assert uri == f"s3://{store.bucket}/{S3_PREFIX}/raw/pilot/a.png"


@pytest.mark.integration
def test_overwritten_object_is_still_read_at_its_recorded_version(s3_store: S3ObjectStore):
    original = b"DICM original scan"
    put_version = s3_store.put_bytes("raw/pilot/p01/scan.dcm", original)
    data, recorded_version = s3_store.get_versioned("raw/pilot/p01/scan.dcm")
    assert (data, recorded_version) == (original, put_version)

    new_version = s3_store.put_bytes("raw/pilot/p01/scan.dcm", b"DICM replaced by the site")
    assert new_version != recorded_version
    assert s3_store.get_bytes("raw/pilot/p01/scan.dcm") == b"DICM replaced by the site"
    assert s3_store.get_bytes("raw/pilot/p01/scan.dcm", recorded_version) == original

    s3_store.delete("raw/pilot/p01/scan.dcm")
    assert not s3_store.exists("raw/pilot/p01/scan.dcm")
    assert s3_store.get_bytes("raw/pilot/p01/scan.dcm", recorded_version) == original


@pytest.mark.integration
def test_reading_an_unknown_version_names_the_version(s3_store: S3ObjectStore):
    s3_store.put_bytes("raw/pilot/a.png", b"png")
    with pytest.raises(ObjectStoreError, match="version 'no-such-version' does not exist"):
        s3_store.get_bytes("raw/pilot/a.png", "no-such-version")


def test_local_store_refuses_a_version_it_cannot_keep(tmp_path: Path):
    store = LocalObjectStore(root=str(tmp_path))
    store.put_bytes("raw/pilot/a.png", b"png")
    with pytest.raises(ObjectStoreError, match="keeps no versions"):
        store.get_bytes("raw/pilot/a.png", "v1")


@pytest.mark.integration
def test_missing_bucket_error_names_bucket_and_endpoint(s3_endpoint: str, tmp_path: Path):
    store = S3ObjectStore(bucket="no-such-bucket", endpoint_url=s3_endpoint)
    for operation in (
        lambda: store.get_bytes("raw/a.png"),
        lambda: store.exists("raw/a.png"),
        lambda: store.list("raw"),
        lambda: store.put_bytes("raw/a.png", b"x"),
    ):
        with pytest.raises(ObjectStoreError) as raised:
            operation()
        message = str(raised.value)
        assert "bucket 'no-such-bucket' does not exist" in message
        assert s3_endpoint in message


@pytest.mark.integration
def test_unreachable_endpoint_error_names_the_endpoint_and_what_to_check(s3_endpoint: str):
    endpoint = f"http://127.0.0.1:{services.free_port()}"
    store = S3ObjectStore(bucket="waves", endpoint_url=endpoint, max_attempts=1)
    with pytest.raises(ObjectStoreError, match="unreachable") as raised:
        store.get_bytes("raw/pilot/a.png")
    assert endpoint in str(raised.value)
    assert "AWS_ENDPOINT_URL" in str(raised.value)


@pytest.mark.integration
def test_rejected_credentials_error_says_which_variables_to_check(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
):
    with services.moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as checking_endpoint:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        store = S3ObjectStore(bucket="waves", endpoint_url=checking_endpoint, max_attempts=1)
        with pytest.raises(ObjectStoreError, match="rejected the credentials") as raised:
            store.get_bytes("raw/pilot/a.png")
    assert "AWS_ACCESS_KEY_ID" in str(raised.value)


def test_store_from_uri_gives_a_local_store_for_paths_and_file_uris(tmp_path: Path):
    LocalObjectStore(root=str(tmp_path)).put_bytes("raw/pilot/a.png", b"png")
    for uri in (str(tmp_path), tmp_path.as_uri()):
        store = store_from_uri(uri, cache_dir=tmp_path / "cache")
        assert isinstance(store, LocalObjectStore)
        assert store.get_bytes("raw/pilot/a.png") == b"png"


@pytest.mark.integration
def test_source_store_gives_an_s3_store_on_the_endpoint_from_the_environment(
    s3_endpoint: str, plain_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    _s3_client(s3_endpoint).put_object(Bucket=plain_bucket, Key="landing/site-a/a.png", Body=b"a")
    monkeypatch.delenv("MRI_ASSETS_S3_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)

    store = source_store_for(Deployment.from_env(home=tmp_path), f"s3://{plain_bucket}/landing/site-a/")

    assert isinstance(store, S3ObjectStore)
    assert (store.bucket, store.prefix, store.endpoint_url) == (
        plain_bucket,
        "landing/site-a",
        s3_endpoint,
    )
    assert [info.key for info in store.list("")] == ["a.png"]
    assert store.local_path("a.png").is_relative_to(tmp_path / "cache")


def test_source_store_prefers_the_project_endpoint_variable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic.invalid:9000")
    monkeypatch.setenv("MRI_ASSETS_S3_ENDPOINT_URL", "http://project.invalid:9000")
    store = source_store_for(Deployment.from_env(), "s3://waves")
    assert isinstance(store, S3ObjectStore)
    assert (store.bucket, store.prefix, store.endpoint_url) == (
        "waves",
        "",
        "http://project.invalid:9000",
    )


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3:///prefix-only", "names no bucket"),
        ("gs://bucket/raw", "unsupported store URI"),
        ("file://server/share", "remote host"),
        ("", "empty store path"),
    ],
)
def test_store_from_uri_refuses_what_it_cannot_open(uri: str, message: str):
    with pytest.raises(ObjectStoreError, match=message):
        store_from_uri(uri)
