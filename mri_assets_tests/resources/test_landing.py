"""Landings: complete only with their marker (written last, listing keys, sizes and sha256),
never of zero objects, resumable, and never storing what cannot be de-identified."""

import hashlib
import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydantic import PrivateAttr

from mri_assets.core.deid import read_withheld
from mri_assets.resources.landing import (
    LANDED_LISTING,
    LandingError,
    land_wave,
    landed_objects,
    landing_keys,
)
from mri_assets.resources.object_store import LocalObjectStore
from mri_assets_tests.core.bad_inputs import MR_SMALL, mr_small_pixels, png_bytes

PLANTED_NAME = "Landingtest^Plantedperson"


class CrashingStore(LocalObjectStore):
    """A local store whose process 'dies' (raises) after `survive` raw objects were written."""

    survive: int
    _written: int = PrivateAttr(default=0)

    def put_bytes(self, key: str, data: bytes):
        if key.startswith("raw/") and not key.endswith(("_READY", LANDED_LISTING)):
            if self._written >= self.survive:
                raise OSError("simulated crash during landing")
            self._written += 1
        return super().put_bytes(key, data)


def _source(root: Path) -> Path:
    ds = pydicom.dcmread(MR_SMALL)
    ds.PatientName = PLANTED_NAME
    for patient in range(3):
        folder = root / f"patient-{patient}"
        folder.mkdir(parents=True)
        for index in range(3):
            ds.InstanceNumber = index + 1
            ds.SOPInstanceUID = f"1.2.826.0.1.3680043.9.7777.{patient}.{index}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(folder / f"slice-{index}.dcm", enforce_file_format=True)
        (folder / "view.png").write_bytes(png_bytes(mr_small_pixels()[::-1].astype(np.uint16)))
    (root / "labels.csv").write_text("relative_path,slice_index,label\n")
    return root


def test_marker_is_written_last_and_lists_every_object_with_size_and_sha256(tmp_path):
    source, store = _source(tmp_path / "src"), LocalObjectStore(root=str(tmp_path / "store"))
    report = land_wave(LocalObjectStore(root=str(source)), "", store, "w1", "salt")
    assert report.listed == report.copied == 12 and report.deidentified == 9
    landed = landed_objects(store, "w1")
    assert landed.height == 12 and "raw/w1/labels.csv" not in landed["key"].to_list()
    for key, size, sha in landed.iter_rows():
        data = store.get_bytes(key)
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha
    marker_key, listing_key = landing_keys("w1")
    marker = json.loads(store.get_bytes(marker_key))
    assert marker["objects"] == 12 and marker["listing"] == listing_key
    # written last: the marker is not older than anything else of the landing
    newest = max(store.local_path(k).stat().st_mtime_ns for k in [*landed["key"], listing_key])
    assert store.local_path(marker_key).stat().st_mtime_ns >= newest


@pytest.mark.parametrize("kind", ["missing", "empty", "only-labels"])
def test_a_landing_of_zero_objects_is_an_error_naming_the_source(tmp_path, kind):
    source = tmp_path / "src"
    if kind != "missing":
        source.mkdir()
    if kind == "only-labels":
        (source / "labels.csv").write_text("relative_path,slice_index,label\n")
    store = LocalObjectStore(root=str(tmp_path / "store"))
    with pytest.raises(LandingError, match=str(source)) as info:
        land_wave(LocalObjectStore(root=str(source)), "", store, "w1", "salt")
    assert "nothing to land" in str(info.value) and "\n" not in str(info.value)
    assert not store.exists(landing_keys("w1")[0])


def test_an_interrupted_landing_is_not_complete_and_resumes_where_it_stopped(tmp_path):
    source = LocalObjectStore(root=str(_source(tmp_path / "src")))
    root = str(tmp_path / "store")
    land_wave(source, "", LocalObjectStore(root=root), "w1", "salt")  # an earlier, complete one
    with pytest.raises(OSError, match="simulated crash"):
        land_wave(source, "", CrashingStore(root=root, survive=4), "w1", "other-salt")
    store = LocalObjectStore(root=root)
    with pytest.raises(LandingError, match=r"no complete landing .*mri-assets ingest-wave w1"):
        landed_objects(store, "w1")
    report = land_wave(source, "", store, "w1", "other-salt")
    assert (report.copied, report.skipped_same_checksum) == (9 - 4, 3 + 4)  # PNGs never changed
    assert landed_objects(store, "w1").height == 12


def test_markers_from_an_older_version_or_not_matching_their_listing_are_refused(tmp_path):
    source = LocalObjectStore(root=str(_source(tmp_path / "src")))
    store = LocalObjectStore(root=str(tmp_path / "store"))
    land_wave(source, "", store, "w1", "salt")
    marker_key, listing_key = landing_keys("w1")
    store.put_bytes(listing_key, store.get_bytes(listing_key) + b"x")
    with pytest.raises(LandingError, match="does not match its marker"):
        landed_objects(store, "w1")
    store.put_bytes(marker_key, json.dumps({"wave": "w1", "files": 12}).encode())
    with pytest.raises(LandingError, match="older version"):
        landed_objects(store, "w1")


def test_what_cannot_be_deidentified_is_never_stored_in_clear(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    report_text = f"Referral for {PLANTED_NAME}, born 1938\n".encode() * 5
    (source / "referral.txt").write_bytes(report_text)
    planted = pydicom.dcmread(MR_SMALL)
    planted.PatientName = PLANTED_NAME
    buffer = io.BytesIO()
    planted.save_as(buffer, enforce_file_format=True)
    # a DICOM whose header breaks right after the name: pydicom cannot read it
    good = buffer.getvalue()
    at = good.index(PLANTED_NAME.encode()) + len(PLANTED_NAME)
    (source / "broken.dcm").write_bytes(good[:at] + b"\x10\x00\x20\x00LO\xff\xff" + good[at:at + 40])
    store = LocalObjectStore(root=str(tmp_path / "store"))
    report = land_wave(LocalObjectStore(root=str(source)), "", store, "w1", "salt")
    assert report.withheld == 2
    for key in ("raw/w1/referral.txt", "raw/w1/broken.dcm"):
        stored = store.get_bytes(key)
        assert PLANTED_NAME.encode() not in stored
        record = read_withheld(stored)
        original = (source / key.rsplit("/", 1)[-1]).read_bytes()
        assert record["sha256"] == hashlib.sha256(original).hexdigest()
        assert "withheld at landing" in record["reason"] and "re-run ingest-wave" in record["reason"]
    # landing the same source again skips the withheld records (same bytes)
    again = land_wave(LocalObjectStore(root=str(source)), "", store, "w1", "salt")
    assert again.copied == 0 and again.skipped_same_checksum == 2


def test_objects_land_with_the_normal_file_mode(tmp_path):
    source = LocalObjectStore(root=str(_source(tmp_path / "src")))
    store = LocalObjectStore(root=str(tmp_path / "store"))
    land_wave(source, "", store, "w1", "salt")
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {stat.S_IMODE(store.local_path(key).stat().st_mode)
             for key in landed_objects(store, "w1")["key"]}
    assert modes == {0o666 & ~umask}  # as any new file, not the 0o600 of a temporary file


def test_nifti_free_text_is_blanked_on_the_way_in(tmp_path):
    import nibabel as nib

    source = tmp_path / "src"
    source.mkdir()
    img = nib.Nifti1Image(np.arange(40 * 40 * 3, dtype=np.int16).reshape(40, 40, 3), np.eye(4))
    img.header["descrip"] = PLANTED_NAME.encode()
    (source / "volume.nii").write_bytes(img.to_bytes())
    store = LocalObjectStore(root=str(tmp_path / "store"))
    report = land_wave(LocalObjectStore(root=str(source)), "", store, "w1", "salt")
    assert report.deidentified == 1
    assert PLANTED_NAME.encode() not in store.get_bytes("raw/w1/volume.nii")
