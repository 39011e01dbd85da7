"""DVC tracking against a local-folder remote and an S3 remote on a real moto server.

DVC runs as a CLI from its own environment (`make dvc-env`); these tests run it the same way.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import boto3
import pytest

from mri_assets.definitions.code_location import resources_for
from mri_assets.deployment import Deployment
from mri_assets.resources.dvc_tracking import (
    DvcRecord,
    DvcTracking,
    DvcTrackingError,
    find_dvc_executable,
    local_dvc_tracking,
)


def _shard_bytes(seed: int, size: int = 20_000) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _forget_local_copies(tracking: DvcTracking, dvc_path: str) -> None:
    repo = Path(tracking.repo_dir)
    (repo / dvc_path).unlink()
    shutil.rmtree(repo / ".dvc" / "cache")


def _dvc_by_hand(repo: Path, *args: str) -> str:
    """`dvc ARGS` run in `repo` the way a person would, with no help from the resource."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    env.pop("DVC_SITE_CACHE_DIR", None)
    result = subprocess.run([find_dvc_executable(), *args], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=300, check=True)
    return result.stdout


def _track_in_a_new_process(repo_dir: str, remote_url: str, source: str, dvc_path: str):
    tracking = DvcTracking(repo_dir=repo_dir, remote_url=remote_url)
    return tracking.track(Path(source), dvc_path)


def test_tracked_file_reads_back_identical_from_the_remote(mri_home: Path, tmp_path: Path):
    tracking = local_dvc_tracking(mri_home)
    data = _shard_bytes(1)
    source = _write(tmp_path / "out" / "shard-00.arrow", data)

    record = tracking.track(source, "embeddings/pilot/shard-00.arrow")
    _forget_local_copies(tracking, "embeddings/pilot/shard-00.arrow")

    assert record == DvcRecord(
        dvc_path="embeddings/pilot/shard-00.arrow",
        md5=hashlib.md5(data).hexdigest(),
        size=len(data),
        remote=str((mri_home / "dvc-remote").resolve()),
    )
    assert tracking.read("embeddings/pilot/shard-00.arrow") == data
    assert tracking.record("embeddings/pilot/shard-00.arrow") == record


def test_retracking_changed_content_gives_a_new_revision(mri_home: Path, tmp_path: Path):
    tracking = local_dvc_tracking(mri_home)
    first = tracking.track(
        _write(tmp_path / "a", _shard_bytes(1)), "embeddings/full-1/shard-02.arrow"
    )
    second = tracking.track(
        _write(tmp_path / "b", _shard_bytes(2)), "embeddings/full-1/shard-02.arrow"
    )

    assert first.md5 != second.md5
    assert tracking.read("embeddings/full-1/shard-02.arrow") == _shard_bytes(2)
    assert tracking.read("embeddings/full-1/shard-02.arrow", md5=first.md5) == _shard_bytes(1)


def test_a_batch_adds_and_pushes_its_files_together_with_the_records_it_returned(
        mri_home: Path, tmp_path: Path):
    tracking = local_dvc_tracking(mri_home)
    paths = [f"embeddings/w1/shard-{shard:02d}.arrow" for shard in range(3)]
    with tracking.batched() as batch:
        records = [batch.track(_write(tmp_path / f"s{shard}", _shard_bytes(shard)), path)
                   for shard, path in enumerate(paths)]
        assert not (Path(tracking.repo_dir) / f"{paths[0]}.dvc").exists()  # nothing added yet
    for shard, (path, record) in enumerate(zip(paths, records, strict=True)):
        assert record.md5 == hashlib.md5(_shard_bytes(shard)).hexdigest()
        assert tracking.record(path) == record  # what DVC wrote in the .dvc file
    for path in paths[1:]:
        (Path(tracking.repo_dir) / path).unlink()
    _forget_local_copies(tracking, paths[0])  # and the cache: what is read comes from the remote
    assert [tracking.read(path) for path in paths] == [_shard_bytes(shard) for shard in range(3)]


def test_a_batch_whose_block_fails_adds_and_pushes_nothing(mri_home: Path, tmp_path: Path):
    tracking = local_dvc_tracking(mri_home)
    with pytest.raises(RuntimeError, match="shard 01 failed"), tracking.batched() as batch:
        batch.track(_write(tmp_path / "s0", _shard_bytes(0)), "embeddings/w1/shard-00.arrow")
        raise RuntimeError("shard 01 failed")
    assert not (Path(tracking.repo_dir) / "embeddings/w1/shard-00.arrow.dvc").exists()
    assert not any((mri_home / "dvc-remote").rglob("*"))


def test_a_revision_never_pushed_is_a_clear_error(mri_home: Path, tmp_path: Path):
    tracking = local_dvc_tracking(mri_home)
    tracking.track(_write(tmp_path / "a", _shard_bytes(1)), "embeddings/pilot/shard-01.arrow")
    missing = hashlib.md5(b"never tracked").hexdigest()
    with pytest.raises(DvcTrackingError, match=f"could not pull .* at md5 {missing}"):
        tracking.read("embeddings/pilot/shard-01.arrow", md5=missing)


def test_ensure_repo_is_idempotent_and_sets_the_default_remote(mri_home: Path):
    tracking = local_dvc_tracking(mri_home)
    assert tracking.ensure_repo() == tracking.ensure_repo()

    settings = dict(
        line.split("=", 1)
        for line in _dvc_by_hand(mri_home / "dvc", "config", "--list").splitlines()
    )
    assert settings["core.no_scm"] == "true"
    assert settings["core.analytics"] == "false"
    assert settings["core.remote"] == "storage"
    assert settings["remote.storage.url"] == str((mri_home / "dvc-remote").resolve())
    # Stored relative to `.dvc/`, so a copied home has its own remote.
    assert 'url = "../../dvc-remote"' in (mri_home / "dvc" / ".dvc" / "config").read_text()


def test_a_copied_home_pushes_to_its_own_remote_never_the_original(
    mri_home: Path, tmp_path: Path
):
    local_dvc_tracking(mri_home).track(
        _write(tmp_path / "a", _shard_bytes(1)), "embeddings/pilot/shard-00.arrow"
    )
    copy = tmp_path / "copied_home"
    shutil.copytree(mri_home, copy)
    original_remote = sorted((mri_home / "dvc-remote").rglob("*"))
    original_site_cache = sorted((mri_home / "dvc" / ".dvc" / "tmp").rglob("*"))

    _write(copy / "dvc" / "embeddings" / "pilot" / "shard-01.arrow", _shard_bytes(2))
    _dvc_by_hand(copy / "dvc", "add", "embeddings/pilot/shard-01.arrow")
    _dvc_by_hand(copy / "dvc", "push")
    by_resource = local_dvc_tracking(copy).track(
        _write(tmp_path / "c", _shard_bytes(3)), "embeddings/pilot/shard-02.arrow"
    )

    copied_remote = copy / "dvc-remote" / "files" / "md5"
    for data in (_shard_bytes(2), _shard_bytes(3)):
        md5 = hashlib.md5(data).hexdigest()
        assert (copied_remote / md5[:2] / md5[2:]).read_bytes() == data
    assert by_resource.remote == str((copy / "dvc-remote").resolve())
    assert sorted((mri_home / "dvc-remote").rglob("*")) == original_remote
    assert sorted((mri_home / "dvc" / ".dvc" / "tmp").rglob("*")) == original_site_cache


def test_tracks_from_four_processes_at_once_all_succeed(mri_home: Path, tmp_path: Path):
    tracking = local_dvc_tracking(mri_home)
    shards = {
        f"embeddings/scale/shard-{shard:02d}.arrow": _write(
            tmp_path / f"shard-{shard:02d}.arrow", _shard_bytes(shard)
        )
        for shard in range(4)
    }
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [
            pool.submit(
                _track_in_a_new_process, tracking.repo_dir, tracking.remote_url, str(source), path
            )
            for path, source in shards.items()
        ]
        records = [future.result(timeout=300) for future in futures]

    remote = mri_home / "dvc-remote" / "files" / "md5"
    for record, (path, source) in zip(records, shards.items(), strict=True):
        assert record.dvc_path == path
        assert record.md5 == hashlib.md5(source.read_bytes()).hexdigest()
        assert (remote / record.md5[:2] / record.md5[2:]).read_bytes() == source.read_bytes()
    assert tracking.read("embeddings/scale/shard-03.arrow") == _shard_bytes(3)


@pytest.mark.parametrize(
    "dvc_path", ["", "/abs/shard.arrow", "../outside.arrow", "a//b", ".dvc/config", "x.dvc"]
)
def test_invalid_dvc_paths_are_refused(mri_home: Path, tmp_path: Path, dvc_path: str):
    source = _write(tmp_path / "shard.arrow", b"x")
    with pytest.raises(DvcTrackingError, match="invalid DVC path"):
        local_dvc_tracking(mri_home).track(source, dvc_path)


def test_tracking_a_missing_file_names_it(mri_home: Path, tmp_path: Path):
    with pytest.raises(DvcTrackingError, match="shard-09.arrow: no such file"):
        local_dvc_tracking(mri_home).track(tmp_path / "shard-09.arrow", "embeddings/x.arrow")


def test_reading_an_untracked_path_says_so(mri_home: Path):
    tracking = local_dvc_tracking(mri_home)
    tracking.ensure_repo()
    with pytest.raises(DvcTrackingError, match="is not tracked"):
        tracking.read("embeddings/pilot/shard-15.arrow")


def test_a_missing_dvc_program_names_what_to_run(
    mri_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from mri_assets.resources import dvc_tracking

    configured = DvcTracking(repo_dir=str(mri_home / "dvc"), remote_url=str(tmp_path / "remote"),
                             dvc_executable=str(tmp_path / "nowhere" / "dvc"))
    with pytest.raises(DvcTrackingError, match=r"dvc_executable .*nowhere.*make dvc-env"):
        configured.ensure_repo()

    deployment = Deployment.from_env({"MRI_ASSETS_DVC": str(tmp_path / "elsewhere" / "dvc")},
                                     home=mri_home)
    with pytest.raises(DvcTrackingError, match=r"\$MRI_ASSETS_DVC\) is .*elsewhere"):
        resources_for(deployment)["dvc"].ensure_repo()

    monkeypatch.setattr(dvc_tracking, "_project_roots", lambda: [tmp_path])
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(DvcTrackingError, match=r"\.venv-dvc/bin/dvc .*make dvc-env"):
        local_dvc_tracking(mri_home).ensure_repo()


def test_an_explicit_dvc_program_is_used(mri_home: Path, tmp_path: Path):
    tracking = DvcTracking(repo_dir=str(mri_home / "dvc"), remote_url=str(mri_home / "remote"),
                           dvc_executable=find_dvc_executable())
    data = _shard_bytes(4)
    record = tracking.track(_write(tmp_path / "s", data), "embeddings/pilot/shard-04.arrow")
    assert record.md5 == hashlib.md5(data).hexdigest()


@pytest.mark.integration
def test_s3_remote_on_an_s3_compatible_server_round_trips(
    mri_home: Path, tmp_path: Path, s3_endpoint: str, plain_bucket: str
):
    tracking = DvcTracking(
        repo_dir=str(mri_home / "dvc"),
        remote_url=f"s3://{plain_bucket}/mri/dvc",
        remote_endpoint_url=s3_endpoint,
    )
    data = _shard_bytes(7)
    record = tracking.track(
        _write(tmp_path / "shard-07.arrow", data), "embeddings/pilot/shard-07.arrow"
    )
    _forget_local_copies(tracking, "embeddings/pilot/shard-07.arrow")

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    stored = client.list_objects_v2(Bucket=plain_bucket, Prefix="mri/dvc/")
    assert [item["Size"] for item in stored["Contents"]] == [len(data)]
    assert record.remote == f"s3://{plain_bucket}/mri/dvc"
    assert tracking.read("embeddings/pilot/shard-07.arrow") == data
