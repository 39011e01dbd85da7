"""Landing a wave: sync a folder or S3 prefix of raw files into `raw/WAVE/` and mark it ready."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import pydicom

from mri_assets.core.deid import deidentify_dicom, is_dicom
from mri_assets.core.manifest import READY_MARKER, patient_key_for, raw_prefix
from mri_assets.resources.object_store import ObjectStore


@dataclass(frozen=True)
class LandingReport:
    wave: str
    listed: int
    copied: int
    skipped_same_checksum: int
    deidentified: int
    bytes_copied: int

    def describe(self) -> str:
        return (
            f"wave {self.wave}: {self.listed} files listed, {self.copied} copied "
            f"({self.bytes_copied / 1e6:.1f} MB, {self.deidentified} DICOM de-identified), "
            f"{self.skipped_same_checksum} already there with the same checksum"
        )


def _landing_bytes(data: bytes, salt: str) -> tuple[bytes, bool]:
    """DICOM headers are de-identified before they enter the store; other files pass as they are."""
    if not is_dicom(data):
        return data, False
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # noqa: BLE001 - an unreadable header is quarantined by the manifest; land as is
        return data, False
    patient_id = str(header.get("PatientID", ""))
    try:
        return deidentify_dicom(data, pseudonym=patient_key_for(f"dicom:{patient_id}", salt)), True
    except Exception:  # noqa: BLE001 - too broken to rewrite: lands as is, the manifest quarantines it
        return data, False


NOT_RAW_NAMES = ("labels.csv", READY_MARKER)


def is_raw_file(relative: str) -> bool:
    """Ground-truth tables, markers and hidden files sit beside the scans but are not scans."""
    name = relative.split("/")[-1]
    return bool(name) and name not in NOT_RAW_NAMES and not name.startswith(".")


def land_wave(
    source: ObjectStore,
    source_prefix: str,
    target: ObjectStore,
    wave: str,
    salt: str,
    on_file: Callable[[], None] | None = None,
) -> LandingReport:
    """Copy every raw file below `source_prefix` into `raw/WAVE/`, skip identical ones, mark ready."""
    prefix = raw_prefix(wave)
    existing = {info.key for info in target.list(prefix)}
    listed = copied = skipped = deidentified = copied_bytes = 0
    base = source_prefix.strip("/")
    for info in source.list(base):
        relative = info.key[len(base):].lstrip("/") if base else info.key
        if not is_raw_file(relative):
            continue
        listed += 1
        data, changed = _landing_bytes(source.get_bytes(info.key), salt)
        key = prefix + relative
        if key in existing and hashlib.sha256(target.get_bytes(key)).digest() == hashlib.sha256(data).digest():
            skipped += 1
        else:
            target.put_bytes(key, data)
            copied += 1
            copied_bytes += len(data)
            deidentified += int(changed)
        if on_file is not None:
            on_file()
    report = LandingReport(wave, listed, copied, skipped, deidentified, copied_bytes)
    marker = {"wave": wave, "files": listed, "copied": copied, "skipped": skipped}
    target.put_bytes(prefix + READY_MARKER, json.dumps(marker, sort_keys=True).encode())
    return report
