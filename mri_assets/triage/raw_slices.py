"""One slice at its original resolution and values, read from the de-identified raw object that
the wave's manifest points to (DICOM, NIfTI, MGH, PNG, JPEG), for the viewer.

The manifest (`manifests/{wave}/manifest.parquet`) gives each image id its `source_key`, the
object's `source_version` and `sha256`, and its `slice_index`; the object is read at that version,
must still have that sha256, and is decoded by the same decoder as ingest (`core.imaging`), with
the same display orientation (NIfTI/MGH slices transposed with rows flipped). Orientation
markers come from the NIfTI affine or the DICOM Image Orientation (Patient) when the file says
them. Slices larger than `max_side` are subsampled by an integer step for the browser.

`RawSlice.encode()` is what `/image/{id}.raw` sends: little-endian float32 values, row-major,
with the size, value range, format and markers in `X-Slice-*` headers.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import polars as pl

from mri_assets.core import imaging
from mri_assets.core.slice_shards import manifest_key
from mri_assets.core.volume_formats import gunzip_bounded
from mri_assets.resources.object_store import ObjectStore, ObjectStoreError

_WAVE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
_LPS = (("L", "R"), ("P", "A"), ("S", "I"))  # DICOM patient axes: + and - directions


class NoRawSlice(LookupError):
    pass


@dataclass(frozen=True)
class RawSlice:
    values: np.ndarray  # 2-D float32, rows top to bottom as shown
    source_format: str
    orientation: dict[str, str] | None = None
    step: int = 1

    def encode(self) -> tuple[bytes, dict[str, str]]:
        values = np.ascontiguousarray(self.values, dtype="<f4")
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        markers = ",".join(f"{side}={letter}" for side, letter in (self.orientation or {}).items())
        headers = {
            "X-Slice-Width": str(values.shape[1]),
            "X-Slice-Height": str(values.shape[0]),
            "X-Slice-Min": repr(low),
            "X-Slice-Max": repr(high),
            "X-Slice-Format": self.source_format,
            "X-Slice-Orientation": markers,
            "X-Slice-Step": str(self.step),
        }
        return np.nan_to_num(values, nan=low, posinf=high, neginf=low).tobytes(), headers


def _letter(vector) -> str | None:
    """The patient direction a DICOM (LPS) direction cosine vector mostly points to."""
    axis = int(np.argmax(np.abs(vector)))
    if abs(float(vector[axis])) < 0.5:
        return None
    plus, minus = _LPS[axis]
    return plus if vector[axis] > 0 else minus


def _dicom_orientation(data: bytes) -> dict[str, str] | None:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        cosines = [float(v) for v in ds.ImageOrientationPatient]
    except Exception:  # noqa: BLE001 - no or unreadable orientation: no markers
        return None
    right, down = _letter(cosines[:3]), _letter(cosines[3:])
    if right is None or down is None:
        return None
    return {"top": _OPPOSITE[down], "bottom": down, "left": _OPPOSITE[right], "right": right}


def _volume_orientation(image, slice_dim: int | None, ndim: int) -> dict[str, str] | None:
    """Markers of a NIfTI/MGH slice shown as `slice.T[::-1]` (see `imaging._volume_stack`)."""
    import nibabel as nib

    if ndim < 3:
        return None
    try:
        codes = nib.aff2axcodes(image.affine)
    except Exception:  # noqa: BLE001 - an affine without a direction: no markers
        return None
    axis = slice_dim if slice_dim is not None and slice_dim < 3 else 2
    across, up = [a for a in range(3) if a != axis]
    if codes[across] is None or codes[up] is None:
        return None
    return {"top": codes[up], "bottom": _OPPOSITE[codes[up]],
            "left": _OPPOSITE[codes[across]], "right": codes[across]}


def _orientation(data: bytes, fmt: str, ndim: int) -> dict[str, str] | None:
    if fmt == "dicom":
        return _dicom_orientation(data)
    if fmt not in ("nifti", "mgh"):
        return None
    import gzip

    import nibabel as nib
    from nibabel.freesurfer.mghformat import MGHImage

    try:
        raw = gzip.decompress(data) if data.startswith(imaging.GZIP_SIGNATURE) else data
        if fmt == "mgh":
            return _volume_orientation(MGHImage.from_bytes(raw), None, ndim)
        image_class = nib.Nifti1Image if imaging._nifti_sizeof_hdr(raw) == 348 else nib.Nifti2Image
        image = image_class.from_bytes(raw)
        return _volume_orientation(image, image.header.get_dim_info()[2], ndim)
    except Exception:  # noqa: BLE001 - markers are optional
        return None


def _decode_as_ingest(data: bytes, key: str):
    """The object's slices, read the way `imaging.process_object` reads them: format from the
    content, a gzip stream unpacked within the same bound, then the same decoder; with the
    unpacked bytes (for the orientation markers)."""
    fmt = imaging._resolve_format(data, key)
    if data.startswith(imaging.GZIP_SIGNATURE):
        data = gunzip_bounded(data, imaging.DEFAULT_MAX_UNPACKED_BYTES, fmt)
    decoded, _read_as = imaging._decode(data, fmt)
    return decoded, data


class RawSliceReader:
    """`reader(wave, image_id) -> RawSlice`; keeps the last few decoded objects."""

    def __init__(self, store: ObjectStore, max_side: int = 1024, cached_objects: int = 4):
        self._store = store
        self._max_side = max_side
        self._manifests: dict[str, dict[str, tuple]] = {}
        self._objects: OrderedDict[tuple, tuple] = OrderedDict()
        self._cached_objects = cached_objects
        self._lock = threading.Lock()

    def _rows(self, wave: str) -> dict[str, tuple]:
        if wave not in self._manifests:
            try:
                path = self._store.local_path(manifest_key(wave))
                frame = pl.read_parquet(
                    path,
                    columns=["image_id", "source_key", "source_version", "sha256",
                             "slice_index", "format", "status"],
                )
            except (ObjectStoreError, OSError, pl.exceptions.PolarsError) as error:
                raise NoRawSlice(f"wave {wave!r} has no readable manifest: {error}") from error
            self._manifests[wave] = {
                row[0]: row[1:] for row in frame.filter(pl.col("status") != "quarantined")
                .select("image_id", "source_key", "source_version", "sha256", "slice_index",
                        "format").iter_rows()
            }
        return self._manifests[wave]

    def _decoded(self, key: str, version: str | None, sha256: str, fmt: str):
        cache_key = (key, version, sha256)
        if cache_key in self._objects:
            self._objects.move_to_end(cache_key)
            return self._objects[cache_key]
        try:
            data = self._store.get_bytes(key, version)
        except (ObjectStoreError, OSError) as error:
            raise NoRawSlice(f"raw object {key} cannot be read: {error}") from error
        if hashlib.sha256(data).hexdigest() != sha256:
            raise NoRawSlice(f"raw object {key} changed since the manifest was built")
        try:
            decoded, data = _decode_as_ingest(data, key)
        except imaging.UnreadableImage as error:
            raise NoRawSlice(f"raw object {key} no longer decodes: {error}") from error
        entry = (decoded, _orientation(data, fmt, 3 if decoded.is_volume else 2))
        self._objects[cache_key] = entry
        while len(self._objects) > self._cached_objects:
            self._objects.popitem(last=False)
        return entry

    def __call__(self, wave: str, image_id: str) -> RawSlice:
        if not _WAVE.match(wave):
            raise NoRawSlice(f"not a valid wave: {wave!r}")
        with self._lock:
            row = self._rows(wave).get(image_id)
            if row is None:
                raise NoRawSlice(f"image {image_id!r} is not in wave {wave!r}'s manifest")
            key, version, sha256, slice_index, fmt = row
            decoded, orientation = self._decoded(key, version, sha256, fmt)
        stack = decoded.stack
        if not 0 <= slice_index < stack.shape[0]:
            raise NoRawSlice(f"{key} has no slice {slice_index}")
        plane = stack[slice_index]
        if plane.ndim == 3:  # colour PNG/JPEG
            plane = imaging._luminance(plane)
        shown = plane.T[::-1] if decoded.nifti_display else plane
        step = max(1, -(-max(shown.shape) // self._max_side))
        values = np.asarray(shown[::step, ::step], dtype=np.float32)
        return RawSlice(values, fmt, orientation if decoded.is_volume or fmt == "dicom" else None,
                        step)
