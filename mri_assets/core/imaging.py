"""Decode one raw object (PNG, JPEG, DICOM, NIfTI, FreeSurfer MGH, MINC, and the paired formats
Analyze, PAR/REC and AFNI) into windowed, 256 px uint8 slices.

The format comes from the content (PNG/JPEG signatures, the DICM preamble or a run of
well-formed data elements for legacy DICOM without one, the NIfTI, MGH and MINC headers, a pair
bundle's head), never from the name alone; the name's extension is only checked against it. A
gzip-compressed object is recognised by what it holds once unpacked, up to a bound on its
unpacked size. A 2-D file is one slice windowed on its own; a volume (NIfTI, MGH, MINC, the
paired formats, multi-frame DICOM, a Siemens MOSAIC unpacked into its slices) is windowed once
over all its voxels so its slices keep their relative contrast. A 4-D volume gives every
volume's slices, volume-major, up to a bound on slices per object. DICOM objects must be of an
allowed modality (MR by default). Objects that are not images (CIFTI, GIFTI, tractography,
spectroscopy, PET) are refused with a reason of their own.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mri_assets.core.unreadable import UnreadableImage
from mri_assets.core.volume_formats import (
    DEFAULT_MAX_SLICES,
    DEFAULT_MAX_UNPACKED_BYTES,
    GZIP_SIGNATURE,
    NON_IMAGE_REASONS,
    PAIR_SUFFIXES,
    bundle_kind,
    check_slice_count,
    gunzip_bounded,
    gunzip_head,
    is_minc,
    missing_partner_reason,
    nifti_non_image_kind,
    non_image_kind,
    pair_role,
    read_minc,
    read_pair,
    slice_count,
)

MIN_SIDE = 32
MAX_SIDE = 8192

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"

_EXTENSION_FORMATS = (
    (".nii.gz", "nifti"),
    (".nii", "nifti"),
    (".png", "png"),
    (".jpg", "jpeg"),
    (".jpeg", "jpeg"),
    (".jpe", "jpeg"),
    (".dcm", "dicom"),
    (".dicom", "dicom"),
    (".ima", "dicom"),
    (".mgz", "mgh"),
    (".mgh", "mgh"),
    (".mnc", "minc"),
    (".hdr", "analyze"),
    (".par", "parrec"),
    (".head", "afni"),
)

_SUGGESTED_EXTENSION = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm", "nifti": ".nii / .nii.gz",
                        "mgh": ".mgz / .mgh", "minc": ".mnc", "analyze": ".hdr + .img",
                        "parrec": ".PAR + .REC", "afni": ".HEAD + .BRIK"}
IMAGE_FORMATS = ("png", "jpeg", "dicom", "nifti", "mgh", "minc", "analyze", "parrec", "afni")

DEFAULT_MODALITIES = ("MR",)
# Secondary Capture SOP classes: screen grabs and scanned films, which may show burned-in text
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
# MR Spectroscopy Storage, Siemens CSA Non-Image (spectroscopy raw data and other non-images)
_SPECTROSCOPY_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.4.2", "1.3.12.2.1107.5.9.1")

_INTEGER_HISTOGRAM_MAX_RANGE = 1 << 20
_HISTOGRAM_RANGE_ALWAYS = 1 << 17


@dataclass(frozen=True)
class ProcessedSlice:
    slice_index: int
    pixels: np.ndarray
    pixel_sha256: str
    height: int
    width: int
    window_low: float
    window_high: float


@dataclass(frozen=True)
class ProcessedObject:
    format: str
    patient_id: str | None
    slices: tuple[ProcessedSlice, ...]
    quarantined_slices: tuple[tuple[int, str], ...]
    normalization: str


@dataclass(frozen=True)
class _DecodedStack:
    """Raw decoded slices, shape (n, rows, cols), native byte order. NIfTI slices are stored
    (i, j) and shown transposed with rows flipped, so anterior/superior is at the top."""

    stack: np.ndarray
    is_volume: bool
    patient_id: str | None
    nifti_display: bool


def format_from_extension(name: str) -> str | None:
    """The format a name claims; `X.gz` claims what `X` does (`.nii.gz` and `.mgz` included)."""
    lower = name.lower()
    for suffix, fmt in _EXTENSION_FORMATS:
        if lower.endswith(suffix):
            return fmt
    if lower.endswith(".gz"):
        return format_from_extension(lower[:-3])
    return None


def _nifti_sizeof_hdr(data: bytes) -> int | None:
    if len(data) < 4:
        return None
    for order in ("<", ">"):
        (size,) = struct.unpack(order + "i", data[:4])
        if size in (348, 540):
            return size
    return None


_MGH_HEADER_BYTES = 284
_MGH_TYPES = {0: 1, 1: 4, 3: 4, 4: 2}  # MGH data type code -> bytes per voxel


def _is_mgh_header(head: bytes) -> bool:
    """FreeSurfer MGH: big-endian int32 version 1, four positive dimensions, a known data type."""
    if len(head) < 24:
        return False
    version, *dims, kind = struct.unpack(">6i", head[:24])
    return version == 1 and all(0 < d < 1 << 20 for d in dims) and kind in _MGH_TYPES


_EXPLICIT_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
    b"UR US UT UV".split()
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())


def _walks_as_elements(data: bytes, explicit: bool, wanted: int = 3) -> bool:
    """True when `data` starts with `wanted` well-formed little-endian data elements (group 0002
    or 0008 first, tags ascending, lengths inside the data): a DICOM data set written without the
    128-byte preamble and file meta, as old archives and ACR-NEMA era tools do."""
    offset, previous, seen = 0, -1, 0
    while seen < wanted:
        if offset + 8 > len(data):
            return seen > 0 and offset == len(data)
        group, element = struct.unpack_from("<HH", data, offset)
        tag = group << 16 | element
        if tag <= previous or (seen == 0 and group not in (0x0002, 0x0008)):
            return False
        if explicit:
            vr = data[offset + 4 : offset + 6]
            if vr not in _EXPLICIT_VRS:
                return False
            if vr in _LONG_VRS:
                if offset + 12 > len(data):
                    return False
                header, length = 12, struct.unpack_from("<I", data, offset + 8)[0]
            else:
                header, length = 8, struct.unpack_from("<H", data, offset + 6)[0]
        else:
            header, length = 8, struct.unpack_from("<I", data, offset + 4)[0]
        if length == 0xFFFFFFFF:  # a sequence of undefined length: the elements so far suffice
            return seen > 0
        if offset + header + length > len(data):
            return False
        offset += header + length
        previous, seen = tag, seen + 1
    return True


def is_headerless_dicom(data: bytes) -> bool:
    """A DICOM data set without preamble and file meta (explicit or implicit VR little endian)."""
    return _walks_as_elements(data, explicit=True) or _walks_as_elements(data, explicit=False)


def detect_format(data: bytes) -> str | None:
    """The format the bytes hold: one of `IMAGE_FORMATS`, a non-image kind of
    `NON_IMAGE_REASONS` ("cifti", "trk", ...), or None. Gzip is looked through."""
    if data.startswith(GZIP_SIGNATURE):
        head = gunzip_head(data, 64 * 1024)
        if not head or head.startswith(GZIP_SIGNATURE):
            return None
        return detect_format(head)
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SIGNATURE):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if _nifti_sizeof_hdr(data):
        return nifti_non_image_kind(data[:4096]) or "nifti"
    if _is_mgh_header(data[:24]):
        return "mgh"
    if is_minc(data):
        return "minc"
    kind = bundle_kind(data) or non_image_kind(data)
    if kind is not None:
        return kind
    if is_headerless_dicom(data):
        return "dicom"
    return None


def is_dicom(data: bytes) -> bool:
    return detect_format(data) == "dicom"


def _check_side_lengths(rows: int, cols: int, what: str) -> None:
    for side in (rows, cols):
        if side < MIN_SIDE or side > MAX_SIDE:
            raise UnreadableImage(
                f"{what} is {rows}x{cols} px (height x width); every side must be between "
                f"{MIN_SIDE} and {MAX_SIDE} px: leave thumbnails out, tile or downsample larger images"
            )


def _native(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.byteorder not in ("=", "|") and arr.dtype.byteorder != _NATIVE_ORDER:
        return arr.astype(arr.dtype.newbyteorder("="))
    return arr


_NATIVE_ORDER = "<" if np.little_endian else ">"


def _decode_pil(data: bytes, fmt: str) -> _DecodedStack:
    label = fmt.upper()
    try:
        img = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"unreadable {label}: {exc}; re-export the image") from exc
    width, height = img.size
    _check_side_lengths(height, width, f"{label} image")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UnreadableImage(
            f"truncated or corrupt {label}: {exc}; copy the file again from its source"
        ) from exc
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L"):
        arr = np.asarray(img)
    else:
        arr = np.asarray(img.convert("L"))
    return _DecodedStack(
        _native(arr)[np.newaxis], is_volume=False, patient_id=None, nifti_display=False
    )


def _transfer_syntax(ds, has_preamble: bool):
    """The data set's transfer syntax; for a legacy object without file meta, the encoding pydicom
    found while reading it (so pixel decoding knows the byte order)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    file_meta = getattr(ds, "file_meta", None)
    tsuid = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if tsuid is not None or has_preamble:
        return tsuid
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return None
    tsuid = (ImplicitVRLittleEndian if implicit
             else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if file_meta is None:
        ds.file_meta = file_meta = FileMetaDataset()
    file_meta.TransferSyntaxUID = tsuid
    return tsuid


def check_dicom_admissible(ds, modalities: tuple[str, ...] = DEFAULT_MODALITIES) -> None:
    """Refuse (with what to do) a DICOM object that is not an acquired image of an allowed modality."""
    allowed = " or ".join(modalities)
    if str(ds.get("SOPClassUID", "") or "") in _SPECTROSCOPY_SOP_CLASSES:
        raise UnreadableImage(NON_IMAGE_REASONS["spectroscopy"] + " (DICOM spectroscopy or "
                              "non-image SOP class)")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if not modality:
        raise UnreadableImage(
            f"DICOM object names no Modality (0008,0060), so it cannot be shown to be {allowed}: "
            f"set Modality at the source if it is {allowed}, otherwise leave it out of the wave"
        )
    if modality not in modalities:
        raise UnreadableImage(
            f"DICOM modality {modality} is not {allowed}: this pipeline ingests {allowed} images "
            f"only; leave it out of the wave (or add {modality} to ingest.allowed_modalities "
            "if it belongs here)"
        )
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class.startswith(_SECONDARY_CAPTURE_PREFIX):
        raise UnreadableImage(
            f"DICOM secondary capture (SOP class {sop_class}), a screen grab or scanned film that "
            "may show burned-in patient data, not an acquired image: export the original series"
        )
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        raise UnreadableImage(
            "DICOM BurnedInAnnotation is YES: the pixels may show patient data that header "
            "de-identification cannot remove; export the series without annotations"
        )


def _decode_dicom(data: bytes, modalities: tuple[str, ...] = DEFAULT_MODALITIES,
                  max_slices: int = DEFAULT_MAX_SLICES) -> _DecodedStack:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import get_decoder

    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, struct.error) as exc:
        raise UnreadableImage(
            f"unreadable DICOM header: {exc}; re-export the object from the archive"
        ) from exc
    check_dicom_admissible(ds, modalities)
    if "PixelData" not in ds:
        raise UnreadableImage(
            "DICOM object has no Pixel Data element: it is not an image; leave it out of the wave"
        )
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_side_lengths(rows, cols, "DICOM image")
    tsuid = _transfer_syntax(ds, has_preamble)
    if tsuid is not None and tsuid.is_compressed:
        decoder = get_decoder(tsuid)
        if not decoder.is_available:
            raise UnreadableImage(
                f"no decoder installed for DICOM transfer syntax {tsuid.name} ({tsuid}); "
                f"install one of: {'; '.join(decoder.missing_dependencies)}"
            )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    check_slice_count(frames, max_slices, "DICOM object")
    mosaic = is_mosaic(ds) and frames == 1
    if mosaic:
        tiles = mosaic_tiles(ds, rows, cols)
        check_slice_count(tiles, max_slices, "Siemens MOSAIC")
    arr = _native_little_endian_pixels(ds, tsuid, rows, cols, frames, samples)
    if arr is None:
        arr = _pydicom_pixels(ds)
        if samples > 1:
            arr = _luminance(arr)
        if frames == 1:
            arr = arr[np.newaxis]
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        arr = arr.max() - arr
    if mosaic:
        arr = unpack_mosaic(arr[0], tiles)
    patient_id = str(ds.get("PatientID", "") or "").strip() or None
    return _DecodedStack(
        _native(arr), is_volume=frames > 1 or mosaic, patient_id=patient_id, nifti_display=False
    )


SIEMENS_MR_HEADER = "SIEMENS MR HEADER"  # private creator of (0019,xx0A) NumberOfImagesInMosaic


def is_mosaic(ds) -> bool:
    image_type = ds.get("ImageType", None)
    values = [image_type] if isinstance(image_type, str) else list(image_type or [])
    return any(str(value).strip().upper() == "MOSAIC" for value in values)


def mosaic_count(ds) -> int | None:
    """NumberOfImagesInMosaic: from the CSA image header (read by nibabel's `nicom`), else from
    the Siemens private element (0019,xx0A) that de-identification keeps; None when neither
    gives a positive whole number."""
    candidates = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from nibabel.nicom import csareader

            csa = csareader.get_csa_header(ds, "image")
            if csa is not None:
                candidates.append(csareader.get_n_mosaic(csa))
    except Exception:  # noqa: BLE001,S110 - a broken CSA header: the private element may remain
        pass
    try:
        candidates.append(ds.private_block(0x0019, SIEMENS_MR_HEADER)[0x0A].value)
    except (KeyError, ValueError, AttributeError):
        pass
    for value in candidates:
        try:
            count = int(value)
        except (TypeError, ValueError):
            continue
        if count > 0:
            return count
    return None


def mosaic_tiles(ds, rows: int, cols: int) -> int:
    """How many slices a Siemens MOSAIC frame tiles (checked against its size), or why not."""
    count = mosaic_count(ds)
    if count is None:
        raise UnreadableImage(
            f"Siemens MOSAIC ({rows}x{cols} px frame tiling many slices) whose number of slices "
            "cannot be read (no NumberOfImagesInMosaic in its CSA header or (0019,xx0A)): it "
            "cannot be cut into its slices; export the series again with its Siemens header")
    grid = math.ceil(math.sqrt(count))
    if rows % grid or cols % grid or rows // grid < MIN_SIDE or cols // grid < MIN_SIDE:
        raise UnreadableImage(
            f"Siemens MOSAIC of {count} slices cannot tile its {rows}x{cols} px frame on a "
            f"{grid}x{grid} grid: NumberOfImagesInMosaic does not fit the image; export the "
            "series again")
    return count


def unpack_mosaic(frame: np.ndarray, count: int) -> np.ndarray:
    """(count, rows/grid, cols/grid) slices of a MOSAIC frame, read row by row of tiles from
    the top left, grid = ceil(sqrt(count))."""
    grid = math.ceil(math.sqrt(count))
    tile_rows, tile_cols = frame.shape[0] // grid, frame.shape[1] // grid
    tiles = frame.reshape(grid, tile_rows, grid, tile_cols).swapaxes(1, 2)
    return np.ascontiguousarray(tiles.reshape(grid * grid, tile_rows, tile_cols)[:count])


_UNCOMPRESSED_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def _native_little_endian_pixels(
    ds, tsuid, rows: int, cols: int, frames: int, samples: int
) -> np.ndarray | None:
    """(frames, rows, cols) straight from the Pixel Data bytes for uncompressed little-endian
    grey images whose stored bits fill the allocated bits; None for anything else."""
    if tsuid not in _UNCOMPRESSED_LITTLE_ENDIAN or samples != 1:
        return None
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in (8, 16, 32) or int(ds.get("BitsStored", bits) or bits) != bits:
        return None
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    raw = ds.PixelData
    count = frames * rows * cols
    if len(raw) < count * dtype.itemsize:
        raise UnreadableImage(
            f"truncated or corrupt DICOM pixel data: {len(raw)} bytes, "
            f"{count * dtype.itemsize} expected for {frames}x{rows}x{cols} at {bits} bits; "
            "copy the file again from the archive"
        )
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(frames, rows, cols)


def _pydicom_pixels(ds) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*excess padding.*", category=UserWarning)
            return ds.pixel_array
    except (
        ValueError,
        EOFError,
        OSError,
        KeyError,
        struct.error,
        RuntimeError,
        NotImplementedError,
    ) as exc:
        raise UnreadableImage(
            f"truncated or corrupt DICOM pixel data: {exc}; copy the file again from the archive"
        ) from exc


def _luminance(rgb: np.ndarray) -> np.ndarray:
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return (rgb[..., :3].astype(np.float32) @ weights).astype(np.float32)


def _decode_nifti(data: bytes, max_slices: int = DEFAULT_MAX_SLICES) -> _DecodedStack:
    import nibabel as nib

    if data.startswith(GZIP_SIGNATURE):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise UnreadableImage(
                f"truncated or corrupt gzip stream around NIfTI: {exc}; copy the file again"
            ) from exc
    size = _nifti_sizeof_hdr(data)
    if size is None:
        found = struct.unpack("<i", data[:4])[0] if len(data) >= 4 else None
        raise UnreadableImage(
            f"unreadable NIfTI header: sizeof_hdr is {found}, expected 348 (NIfTI-1) or "
            "540 (NIfTI-2); export the volume again"
        )
    magic = data[344:348] if size == 348 else data[4:8]
    if magic[:3] in (b"ni1", b"ni2"):
        raise UnreadableImage(
            "NIfTI header of a .hdr/.img pair: land it beside its .img (same name), or upload "
            "a single-file .nii or .nii.gz"
        )
    image_class = nib.Nifti1Image if size == 348 else nib.Nifti2Image
    try:
        img = image_class.from_bytes(data)
        slice_dim = img.header.get_dim_info()[2] if len(img.shape) > 2 else None
        check_slice_count(slice_count(img.shape, slice_dim), max_slices, "NIfTI volume")
        arr = np.asanyarray(img.dataobj)
    except UnreadableImage:
        raise
    except (ValueError, EOFError, OSError, nib.filebasedimages.ImageFileError, TypeError) as exc:
        detail = " ".join(str(exc).split())
        raise UnreadableImage(
            f"unreadable or truncated NIfTI: {detail}; copy or export the volume again"
        ) from exc
    return _voxel_stack(arr, slice_dim, "NIfTI")


def _voxel_stack(arr: np.ndarray, slice_dim: int | None, what: str) -> _DecodedStack:
    if arr.ndim < 2:
        raise UnreadableImage(
            f"{what} data has {arr.ndim} dimension(s); an image needs at least 2: leave it out"
        )
    if arr.dtype.kind not in "uifb":
        raise UnreadableImage(
            f"{what} data type {arr.dtype} (complex or RGB) is not a scalar intensity image; "
            "store magnitude or grey values"
        )
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    return _volume_stack(arr, slice_dim, f"{what} slice")


def _volume_stack(arr: np.ndarray, slice_dim: int | None, what: str) -> _DecodedStack:
    """(n, i, j) slices of a 2-D to N-D voxel array: along `slice_dim` (else the third axis),
    volume-major beyond three dimensions (`t * n_slices + z`)."""
    if arr.ndim == 2:
        stack = arr[np.newaxis]
    else:
        axis = slice_dim if slice_dim is not None and slice_dim < 3 else 2
        extra = int(np.prod(arr.shape[3:])) if arr.ndim > 3 else 1
        spatial = arr.reshape(arr.shape[:3] + (extra,))
        moved = np.moveaxis(spatial, (3, axis), (0, 1))
        stack = moved.reshape((extra * moved.shape[1],) + moved.shape[2:])
    _check_side_lengths(stack.shape[1], stack.shape[2], what)
    stack = np.ascontiguousarray(stack, dtype=stack.dtype.newbyteorder("="))
    return _DecodedStack(stack, is_volume=stack.shape[0] > 1, patient_id=None, nifti_display=True)


def _decode_mgh(data: bytes, max_slices: int = DEFAULT_MAX_SLICES) -> _DecodedStack:
    """A FreeSurfer `.mgh` volume, or `.mgz` (the same, gzip-compressed), through nibabel."""
    from nibabel.freesurfer.mghformat import MGHImage

    if data.startswith(GZIP_SIGNATURE):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise UnreadableImage(
                f"truncated or corrupt gzip stream around MGH (.mgz): {exc}; re-export the volume"
            ) from exc
    try:
        img = MGHImage.from_bytes(data)
        check_slice_count(slice_count(img.shape), max_slices, "MGH volume")
        arr = np.asanyarray(img.dataobj)
    except UnreadableImage:
        raise
    except (ValueError, EOFError, OSError, TypeError, struct.error) as exc:
        detail = " ".join(str(exc).split())
        raise UnreadableImage(
            f"unreadable or truncated MGH volume: {detail}; re-export it (mri_convert)"
        ) from exc
    return _volume_stack(arr, None, "MGH slice")


def _decode(data: bytes, fmt: str, modalities: tuple[str, ...] = DEFAULT_MODALITIES,
            max_slices: int = DEFAULT_MAX_SLICES,
            max_unpacked: int = DEFAULT_MAX_UNPACKED_BYTES) -> tuple[_DecodedStack, str]:
    """The decoded slices and the format they were read as (a .hdr/.img pair may be NIfTI)."""
    if fmt in ("png", "jpeg"):
        return _decode_pil(data, fmt), fmt
    if fmt == "dicom":
        return _decode_dicom(data, modalities, max_slices), fmt
    if fmt == "mgh":
        return _decode_mgh(data, max_slices), fmt
    if fmt == "minc":
        volume = read_minc(data, max_slices)
    elif fmt in ("analyze", "parrec", "afni"):
        volume = read_pair(data, max_unpacked, max_slices)
    else:
        return _decode_nifti(data, max_slices), fmt
    return _voxel_stack(volume.voxels, volume.slice_dim, _FORMAT_WORDS[volume.format]), volume.format


_FORMAT_WORDS = {"mgh": "MGH (.mgz)", "dicom": "DICOM", "minc": "MINC", "analyze": "Analyze", "nifti": "NIfTI", "parrec": "PAR/REC",
                 "afni": "AFNI"}


UNRECOGNISED = ("the content matches no PNG, JPEG, DICOM, NIfTI, Analyze, MGH, MINC, PAR/REC or "
                "AFNI signature")


def _resolve_format(data: bytes, name: str) -> str:
    if len(data) == 0:
        raise UnreadableImage(f"empty object (0 bytes): {name}; copy it again from its source")
    claimed = format_from_extension(name)
    found = detect_format(data)
    if found in NON_IMAGE_REASONS:
        raise UnreadableImage(NON_IMAGE_REASONS[found])
    role = pair_role(name)
    if role is not None and found not in PAIR_SUFFIXES and (role[1] == "header" or found is None):
        raise UnreadableImage(missing_partner_reason(name, role[0], role[1]))
    if found is None:
        if claimed == "nifti":
            size = struct.unpack("<i", data[:4])[0] if len(data) >= 4 else None
            raise UnreadableImage(
                f"unreadable NIfTI header: sizeof_hdr is {size}, expected 348 (NIfTI-1) or "
                "540 (NIfTI-2); export the volume again or fix its name"
            )
        if claimed is not None:
            raise UnreadableImage(
                f"not a {claimed.upper()} file: the extension says {claimed} but the content has no "
                f"{claimed.upper()} signature (first bytes {data[:8]!r}); copy it again or "
                "leave it out of the wave"
            )
        raise UnreadableImage(
            f"not an image: {UNRECOGNISED} (first bytes {data[:8]!r}); leave it out of the wave"
        )
    if claimed is not None and claimed != found and {claimed, found} != {"analyze", "nifti"}:
        raise UnreadableImage(
            f"wrong extension: the name says {claimed} but the content is {found}; "
            f"rename it to {_SUGGESTED_EXTENSION[found]}"
        )
    return found


def _small_integer_range(
    arr: np.ndarray, extremes: tuple[int, int] | None = None
) -> tuple[int, int] | None:
    """(min, max) of an integer array whose value range is small enough for a histogram/LUT;
    `extremes` is the (min, max) when the caller already has it."""
    if arr.dtype.kind not in "ui" or arr.size == 0:
        return None
    lo_val, hi_val = extremes if extremes is not None else (int(arr.min()), int(arr.max()))
    if hi_val - lo_val >= max(_HISTOGRAM_RANGE_ALWAYS, min(_INTEGER_HISTOGRAM_MAX_RANGE, arr.size)):
        return None
    return lo_val, hi_val


def _offset_values(arr: np.ndarray, lo_val: int) -> tuple[np.ndarray, int]:
    """(indices, base): `arr - base` as non-negative integers; base is 0 (no copy) when possible."""
    if lo_val >= 0 and arr.dtype.itemsize <= 2:
        return arr, 0
    return arr.astype(np.int64) - lo_val, lo_val


def _integer_percentiles(
    arr: np.ndarray, value_range: tuple[int, int], pcts: tuple[float, float]
) -> tuple[float, float]:
    """Exact linear-interpolated percentiles (as np.percentile) from a value histogram."""
    lo_val, hi_val = value_range
    if lo_val == hi_val:
        return float(lo_val), float(hi_val)
    indices, base = _offset_values(arr, lo_val)
    counts = np.bincount(indices.ravel(), minlength=hi_val - base + 1)[lo_val - base :]
    cumulative = np.cumsum(counts)
    total = int(cumulative[-1])
    result = []
    for pct in pcts:
        position = pct / 100.0 * (total - 1)
        rank = int(np.floor(position))
        frac = position - rank
        below = int(np.searchsorted(cumulative, rank, side="right"))
        above = int(np.searchsorted(cumulative, min(rank + 1, total - 1), side="right"))
        result.append(lo_val + below + frac * (above - below))
    return float(result[0]), float(result[1])


@dataclass(frozen=True)
class _Window:
    low: float
    high: float
    finite: np.ndarray | None
    value_range: tuple[int, int] | None


def _window(
    arr: np.ndarray, low_pct: float, high_pct: float, extremes: tuple[int, int] | None = None
) -> _Window:
    """Percentile window over the finite values, plus what `_apply_window` can reuse."""
    value_range = _small_integer_range(arr, extremes)
    if value_range is not None:
        return _Window(
            *_integer_percentiles(arr, value_range, (low_pct, high_pct)), None, value_range
        )
    finite = None
    values = arr
    if arr.dtype.kind == "f":
        finite_mask = np.isfinite(arr)
        if not finite_mask.all():
            finite = finite_mask
            values = arr[finite_mask]
    if values.size == 0:
        return _Window(0.0, 0.0, finite, None)
    low, high = np.percentile(values, (low_pct, high_pct))
    return _Window(float(low), float(high), finite, None)


def _apply_window(arr: np.ndarray, window: _Window) -> np.ndarray:
    low, high = window.low, window.high
    scale = 255.0 / (high - low) if high > low else 0.0
    if window.value_range is not None and window.value_range[1] - window.value_range[0] <= arr.size:
        lo_val, hi_val = window.value_range
        indices, base = _offset_values(arr, lo_val)
        levels = np.arange(base, hi_val + 1, dtype=np.float64)
        lut = np.clip((levels - low) * scale + 0.5, 0, 255).astype(np.uint8)
        return lut[indices]
    scaled = arr.astype(np.float32)
    scaled -= np.float32(low)
    scaled *= np.float32(scale)
    scaled += np.float32(0.5)
    if window.finite is not None:
        scaled[~window.finite] = 0
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def normalize_to_uint8(
    arr: np.ndarray, low_pct: float, high_pct: float
) -> tuple[np.ndarray, float, float]:
    """Map `arr` to uint8 through its [low_pct, high_pct] percentile window (finite values only)."""
    arr = _native(np.asarray(arr))
    window = _window(arr, low_pct, high_pct)
    return _apply_window(arr, window), window.low, window.high


def resize_to_square(img_u8: np.ndarray, size: int = 256) -> np.ndarray:
    """Scale the longer side to `size` (aspect kept, bilinear) and centre on a zero square."""
    height, width = img_u8.shape
    if height == size and width == size:
        return np.ascontiguousarray(img_u8)
    scale = size / max(height, width)
    new_h = max(1, min(size, round(height * scale)))
    new_w = max(1, min(size, round(width * scale)))
    resized = np.asarray(
        Image.fromarray(np.ascontiguousarray(img_u8)).resize((new_w, new_h), Image.BILINEAR)
    )
    if new_h == size and new_w == size:
        return resized
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def _slice_sha256(raw_slice: np.ndarray) -> str:
    digest = hashlib.sha256(f"{raw_slice.dtype.str}:{raw_slice.shape}:".encode())
    digest.update(np.ascontiguousarray(raw_slice).data)
    return digest.hexdigest()


def _slice_problems(stack: np.ndarray, lows: np.ndarray, highs: np.ndarray) -> dict[int, str]:
    problems: dict[int, str] = {}
    if stack.dtype.kind == "f":
        non_finite = (~np.isfinite(stack)).sum(axis=(1, 2))
        for index in np.flatnonzero(non_finite):
            problems[int(index)] = (
                f"slice has {int(non_finite[index])} non-finite values (NaN/inf); fix or mask the source data"
            )
    for index in np.flatnonzero(lows == highs):
        if int(index) not in problems:
            problems[int(index)] = (
                f"constant slice (every pixel is {lows[index].item()}): no image content, "
                "nothing to label; re-export the scan if it should show anatomy"
            )
    return problems


def process_object(
    data: bytes,
    name: str,
    size: int = 256,
    window: tuple[float, float] = (0.5, 99.5),
    modalities: tuple[str, ...] = DEFAULT_MODALITIES,
    max_slices: int = DEFAULT_MAX_SLICES,
    max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
) -> ProcessedObject:
    """Decode one raw object into windowed `size` px uint8 slices plus the slices it had to quarantine.

    Raises `UnreadableImage` when the object as a whole cannot be read, is not an image, is a
    DICOM object of a modality outside `modalities`, gives more than `max_slices` slices, or is
    gzip that unpacks to more than `max_unpacked_bytes`.
    """
    fmt = _resolve_format(data, name)
    if data.startswith(GZIP_SIGNATURE):
        data = gunzip_bounded(data, max_unpacked_bytes, _FORMAT_WORDS.get(fmt, fmt.upper()))
    decoded, fmt = _decode(data, fmt, tuple(m.upper() for m in modalities), max_slices,
                           max_unpacked_bytes)
    stack = decoded.stack
    low_pct, high_pct = window
    lows, highs = stack.min(axis=(1, 2)), stack.max(axis=(1, 2))
    problems = _slice_problems(stack, lows, highs)
    integer = stack.dtype.kind in "ui"
    if decoded.is_volume:
        extremes = (int(lows.min()), int(highs.max())) if integer else None
        volume_window = _window(stack, low_pct, high_pct, extremes)
        stack_u8 = _apply_window(stack, volume_window)
        windows = [(volume_window.low, volume_window.high)] * stack.shape[0]
        scope = "per volume"
    else:
        stack_u8 = np.zeros(stack.shape, dtype=np.uint8)
        windows = [(0.0, 0.0)] * stack.shape[0]
        for index in range(stack.shape[0]):
            if index in problems:
                continue
            extremes = (int(lows[index]), int(highs[index])) if integer else None
            image_window = _window(stack[index], low_pct, high_pct, extremes)
            stack_u8[index] = _apply_window(stack[index], image_window)
            windows[index] = (image_window.low, image_window.high)
        scope = "per image"
    slices = []
    for index in range(stack.shape[0]):
        if index in problems:
            continue
        shown = stack_u8[index].T[::-1] if decoded.nifti_display else stack_u8[index]
        slices.append(
            ProcessedSlice(
                slice_index=index,
                pixels=resize_to_square(shown, size),
                pixel_sha256=_slice_sha256(stack[index]),
                height=int(shown.shape[0]),
                width=int(shown.shape[1]),
                window_low=windows[index][0],
                window_high=windows[index][1],
            )
        )
    return ProcessedObject(
        format=fmt,
        patient_id=decoded.patient_id,
        slices=tuple(slices),
        quarantined_slices=tuple(sorted(problems.items())),
        normalization=f"percentile {low_pct:g}/{high_pct:g} {scope} -> uint8, bilinear resize to {size} px, zero-padded",
    )
