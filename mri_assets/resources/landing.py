"""Landing a wave: sync a folder or S3 prefix of raw files into `raw/WAVE/` and mark it complete.

A landing is complete only once its `_READY` marker exists, and the marker is written last. It
names the listing of what was landed (`_LANDED.parquet` beside it: each object's key, size and
sha256) and that listing's own sha256, so the `manifest` step can run a wave only when every
object is in place and can check each object's bytes against the landing. A landing first removes
an old marker, so a wave being landed again is never taken for complete; an interrupted landing is
resumed by running it again (objects already landed with the same checksum are not copied again).

Every object is de-identified on the way in: DICOM headers (PS3.15 basic profile), the free text
of NIfTI, Analyze, MINC 1 and 2, PAR and AFNI headers, PNG text chunks and JPEG EXIF/XMP/comment
segments; a `.gz` object is unpacked (up to a bound), cleaned and packed again. A format written
as two files (`.hdr` + `.img`, `.PAR` + `.REC`, `.HEAD` + `.BRIK[.gz]`) is landed as one object
under the header's name (a pair bundle, `core.volume_formats`). An object that cannot be
de-identified (a DICOM header that cannot be read or cleaned, content that is no known image
format and so cannot be checked for patient data, a gzip bomb, a pair missing its partner, a
recognised non-image such as tractography or PET) is never stored: a withheld record with its
sha256 and the reason stands in its place.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pydicom

from mri_assets.core.deid import (
    deidentify_dicom,
    deidentify_nifti,
    read_withheld,
    withheld_record,
)
from mri_assets.core.header_deid import (
    deidentify_afni_head,
    deidentify_analyze_header,
    deidentify_minc,
    deidentify_par,
)
from mri_assets.core.image_metadata import scrub_jpeg, scrub_png
from mri_assets.core.imaging import (
    UNRECOGNISED,
    UnreadableImage,
    detect_format,
    format_from_extension,
)
from mri_assets.core.manifest import patient_key_for
from mri_assets.core.volume_formats import (
    DEFAULT_MAX_UNPACKED_BYTES,
    GZIP_SIGNATURE,
    NON_IMAGE_REASONS,
    PairedFiles,
    gunzip_bounded,
    missing_partner_reason,
    pack_pair,
    pair_role,
    unpack_pair,
)
from mri_assets.core.wave_keys import (
    LANDED_LISTING,
    READY_MARKER,
    landing_keys,
    raw_key,
    raw_prefix,
)
from mri_assets.resources.object_store import LocalObjectStore, ObjectStore

MARKER_FORMAT = "mri_assets.landing/2"
LISTING_SCHEMA = {"key": pl.String, "size": pl.Int64, "sha256": pl.String}


class LandingError(ValueError):
    """A landing that cannot be done or a wave whose landing is not complete."""


@dataclass(frozen=True)
class LandingReport:
    wave: str
    listed: int
    copied: int
    skipped_same_checksum: int
    deidentified: int
    bytes_copied: int
    withheld: int = 0

    def describe(self) -> str:
        withheld = (f", {self.withheld} withheld (could not be de-identified: only their hash "
                    "and reason are stored)" if self.withheld else "")
        return (
            f"wave {self.wave}: {self.listed} files listed, {self.copied} copied "
            f"({self.bytes_copied / 1e6:.1f} MB, {self.deidentified} de-identified or cleaned "
            "of metadata), "
            f"{self.skipped_same_checksum} already there with the same checksum{withheld}"
        )


def _withheld(data: bytes, why: str) -> tuple[bytes, bool]:
    """A withheld record in place of `data`. `why` must not quote the content: the record is
    stored, and the content is what may identify a patient."""
    reason = (f"{why}; withheld at landing: only its sha256 was stored, never its bytes; fix or "
              "export it again at the source, then re-run ingest-wave")
    return withheld_record(data, reason), False


def _unrecognised(name: str) -> str:
    claimed = format_from_extension(name)
    said = f" although its name says {claimed.upper()}" if claimed else ""
    return (f"not an image: {UNRECOGNISED}{said}, and unrecognised content may hold patient "
            "data")


def _cleaned(data: bytes, clean: Callable[[bytes], bytes]) -> tuple[bytes, bool]:
    try:
        cleaned = clean(data)
    except UnreadableImage as error:
        return _withheld(data, error.reason)
    return cleaned, cleaned is not data


def landing_bytes(data: bytes, salt: str, name: str = "",
                  max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES) -> tuple[bytes, bool]:
    """The bytes to store for one raw object, and whether they were de-identified or cleaned.

    DICOM (with or without preamble) is de-identified; the free text of NIfTI, MINC 1/2 and pair
    bundle headers is blanked; PNG text chunks and JPEG EXIF/XMP/comments are dropped; MGH passes
    as it is; gzip is unpacked (at most `max_unpacked_bytes`), cleaned and packed again; an
    empty object stays empty. Anything that cannot be de-identified becomes a withheld record.
    """
    if not data or read_withheld(data) is not None:
        return data, False
    fmt = detect_format(data)
    if fmt is None:
        return _withheld(data, _unrecognised(name))
    if fmt in NON_IMAGE_REASONS:
        return _withheld(data, NON_IMAGE_REASONS[fmt])
    if data.startswith(GZIP_SIGNATURE):
        return _landing_gunzipped(data, salt, name, max_unpacked_bytes)
    role = pair_role(name)
    if role is not None and role[1] == "header" and fmt not in ("analyze", "parrec", "afni"):
        return withheld_record(data, missing_partner_reason(name, role[0], role[1])), False
    if fmt == "nifti":
        return _cleaned(data, deidentify_nifti)
    if fmt == "png":
        return _cleaned(data, scrub_png)
    if fmt == "jpeg":
        return _cleaned(data, scrub_jpeg)
    if fmt == "minc":
        return _cleaned(data, deidentify_minc)
    if fmt in ("analyze", "parrec", "afni"):
        return _cleaned(data, lambda bundle: _deidentified_pair(unpack_pair(bundle),
                                                                max_unpacked_bytes))
    if fmt != "dicom":
        return data, False
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                                 specific_tags=["PatientID"], force=not has_preamble)
        patient_id = str(header.get("PatientID", ""))
    except Exception as error:  # noqa: BLE001 - whatever pydicom raises, the header is unreadable
        return _withheld(data, f"unreadable DICOM header ({type(error).__name__}), so it cannot "
                               "be de-identified")
    try:
        return deidentify_dicom(data, pseudonym=patient_key_for(f"dicom:{patient_id}", salt)), True
    except Exception as error:  # noqa: BLE001 - a header too broken to rewrite is not de-identified
        cause = error.__cause__ or error
        if isinstance(error, UnreadableImage) and error.reason.startswith("de-identification left"):
            return _withheld(data, error.reason)  # names no value
        return _withheld(data, f"DICOM header cannot be de-identified ({type(cause).__name__})")


def _landing_gunzipped(data: bytes, salt: str, name: str, limit: int) -> tuple[bytes, bool]:
    """A `.gz` object: unpacked within the bound, its content cleaned, packed again."""
    try:
        inner = gunzip_bounded(data, limit)
    except UnreadableImage as error:
        return _withheld(data, error.reason)
    inner_name = name[:-3] if name.lower().endswith(".gz") else name
    cleaned, changed = landing_bytes(inner, salt, inner_name, limit)
    if read_withheld(cleaned) is not None:
        return withheld_record(data, read_withheld(cleaned)["reason"]), False
    if not changed:
        return data, False
    return gzip.compress(cleaned, compresslevel=6, mtime=0), True


def _deidentified_pair(pair: PairedFiles, limit: int) -> bytes:
    """The pair bundle of `pair` with its header de-identified (the same object when clean)."""
    header = pair.header
    wrapped = header[:2] == GZIP_SIGNATURE
    raw = gunzip_bounded(header, limit, "header") if wrapped else header
    if pair.kind == "parrec":
        cleaned = deidentify_par(raw)
    elif pair.kind == "afni":
        cleaned = deidentify_afni_head(raw)
    elif raw[344:347] == b"ni1" or raw[4:7] == b"ni2":
        cleaned = deidentify_nifti(raw)
    else:
        cleaned = deidentify_analyze_header(raw)
    if cleaned is raw:
        return pack_pair(pair)
    if wrapped:
        cleaned = gzip.compress(cleaned, compresslevel=6, mtime=0)
    return pack_pair(PairedFiles(pair.kind, pair.header_name, cleaned, pair.image_name,
                                 pair.image))


@dataclass(frozen=True)
class _LandingUnit:
    """What becomes one landed object: a file, or the two files of a pair (header first)."""

    relative: str
    keys: tuple[str, ...]
    kind: str | None = None


def _landing_units(infos: list, base: str) -> list[_LandingUnit]:
    """Files grouped into landing units: each header of a paired format with the image file of the
    same stem in the same folder (names compared case-insensitively); a file whose partner is
    missing stays alone and is withheld saying so."""
    relative = {info.key: info.key[len(base):].lstrip("/") if base else info.key for info in infos}
    by_stem: dict[tuple[str, str], dict[str, str]] = {}
    for key, rel in relative.items():
        role = pair_role(rel)
        if role is not None:
            by_stem.setdefault((role[0], role[2].lower()), {}).setdefault(role[1], key)
    paired: dict[str, _LandingUnit] = {}
    for (kind, _), roles in by_stem.items():
        if "header" in roles and "image" in roles:
            unit = _LandingUnit(relative[roles["header"]], (roles["header"], roles["image"]), kind)
            paired[roles["header"]] = paired[roles["image"]] = unit
    units, seen = [], set()
    for info in infos:
        unit = paired.get(info.key) or _LandingUnit(relative[info.key], (info.key,))
        if unit.relative not in seen:
            seen.add(unit.relative)
            units.append(unit)
    return units


def _unit_bytes(source: ObjectStore, unit: _LandingUnit) -> bytes:
    if unit.kind is None:
        return source.get_bytes(unit.keys[0])
    header_key, image_key = unit.keys
    return pack_pair(PairedFiles(unit.kind, header_key.rsplit("/", 1)[-1],
                                 source.get_bytes(header_key), image_key.rsplit("/", 1)[-1],
                                 source.get_bytes(image_key)))


def _lone_partner(data: bytes, name: str) -> bytes | None:
    """A withheld record for the image file of a pair whose header is missing (an `.img`, `.REC`
    or `.BRIK` that is no format of its own), None for anything else."""
    role = pair_role(name)
    if role is None or role[1] != "image" or detect_format(data) is not None:
        return None
    return withheld_record(data, missing_partner_reason(name, role[0], role[1]))


NOT_RAW_NAMES = ("labels.csv", READY_MARKER, LANDED_LISTING)


def is_raw_file(relative: str) -> bool:
    """Ground-truth tables, markers and hidden files sit beside the scans but are not scans."""
    name = relative.split("/")[-1]
    return bool(name) and name not in NOT_RAW_NAMES and not name.startswith(".")


def _describe_source(source: ObjectStore, prefix: str) -> str:
    base = getattr(source, "root", None) or f"s3://{getattr(source, 'bucket', '?')}/" + (
        getattr(source, "prefix", "") or "")
    return f"{base.rstrip('/')}/{prefix.strip('/')}".rstrip("/")


def land_wave(
    source: ObjectStore,
    source_prefix: str,
    target: ObjectStore,
    wave: str,
    salt: str,
    on_file: Callable[[], None] | None = None,
    max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
) -> LandingReport:
    """Copy every raw file below `source_prefix` into `raw/WAVE/`, skip identical ones, mark ready.

    The two files of a paired format become one object (`listed` counts objects, not files);
    `on_file` is called once per object.

    Raises `LandingError` when the source holds no raw object (a missing folder, a wrong prefix).
    """
    prefix = raw_prefix(wave)
    base = source_prefix.strip("/")
    where = _describe_source(source, base)
    if isinstance(source, LocalObjectStore) and not (Path(source.root) / base).is_dir():
        raise LandingError(f"--source {where} is not a folder: nothing to land for wave {wave}; "
                           "give the folder or s3://bucket/prefix that holds the wave's files")
    infos = [info for info in source.list(base)
             if is_raw_file(info.key[len(base):].lstrip("/") if base else info.key)]
    if not infos:
        raise LandingError(f"--source {where} holds no raw files: nothing to land for wave {wave}; "
                           "check the path or prefix (labels.csv, _READY and hidden files "
                           "do not count)")
    marker_key, listing_key = landing_keys(wave)
    target.delete(marker_key)  # from now until the new marker, the wave is not complete
    existing = {info.key: info.size for info in target.list(prefix)}
    listing: list[tuple[str, int, str]] = []
    copied = skipped = deidentified = copied_bytes = withheld = 0
    for unit in _landing_units(infos, base):
        relative = unit.relative
        raw = _unit_bytes(source, unit)
        lone = _lone_partner(raw, relative) if unit.kind is None else None
        if lone is not None:
            data, changed = lone, False
        else:
            data, changed = landing_bytes(raw, salt, relative, max_unpacked_bytes)
        key = raw_key(wave, relative)
        digest = hashlib.sha256(data).hexdigest()
        if existing.get(key) == len(data) and target.sha256(key) == digest:
            skipped += 1
        else:
            target.put_bytes(key, data)
            copied += 1
            copied_bytes += len(data)
            deidentified += int(changed)
        withheld += int(read_withheld(data) is not None)
        listing.append((key, len(data), digest))
        if on_file is not None:
            on_file()
    frame = pl.DataFrame(listing, schema=LISTING_SCHEMA, orient="row").sort("key")
    buffer = io.BytesIO()
    frame.write_parquet(buffer, compression="zstd")
    target.put_bytes(listing_key, buffer.getvalue())
    marker = {
        "format": MARKER_FORMAT,
        "wave": wave,
        "objects": frame.height,
        "bytes": int(frame["size"].sum()),
        "listing": listing_key,
        "listing_sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
        "copied": copied,
        "skipped": skipped,
        "withheld": withheld,
        "landed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    target.put_bytes(marker_key, json.dumps(marker, sort_keys=True).encode())  # last
    return LandingReport(wave, len(listing), copied, skipped, deidentified, copied_bytes, withheld)


def landed_objects(store: ObjectStore, wave: str) -> pl.DataFrame:
    """The objects of the wave's complete landing (`key`, `size`, `sha256`), from its marker.

    Raises `LandingError`, saying what to run, when the marker is missing, is from an older
    version without checksums, or does not match its listing.
    """
    marker_key, listing_key = landing_keys(wave)
    rerun = (f"run `mri-assets ingest-wave {wave} --source PATH_OR_URI` with the wave's source "
             "(it resumes: objects already landed with the same checksum are not copied again)")
    if not store.exists(marker_key):
        raise LandingError(f"wave {wave} has no complete landing ({store.uri(marker_key)} is "
                           f"missing: the landing never ran or was interrupted); {rerun}")
    try:
        marker = json.loads(store.get_bytes(marker_key))
    except ValueError as error:
        raise LandingError(f"wave {wave}: landing marker {store.uri(marker_key)} is not JSON "
                           f"({error}); {rerun}") from error
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        raise LandingError(f"wave {wave}: landing marker {store.uri(marker_key)} is from an older "
                           f"version and lists no checksums; {rerun}")
    listing_bytes = store.get_bytes(marker.get("listing") or listing_key)
    if hashlib.sha256(listing_bytes).hexdigest() != marker.get("listing_sha256"):
        raise LandingError(f"wave {wave}: the landing listing {store.uri(listing_key)} does not "
                           f"match its marker (written by another landing?); {rerun}")
    frame = pl.read_parquet(io.BytesIO(listing_bytes))
    if frame.height != marker.get("objects"):
        raise LandingError(f"wave {wave}: the landing listing holds {frame.height} objects, its "
                           f"marker says {marker.get('objects')}; {rerun}")
    return frame.select([pl.col(name).cast(dtype) for name, dtype in LISTING_SCHEMA.items()])
