"""The research volume formats nibabel opens beyond single-file NIfTI and MGH, paired files, gzip
with a bound, and the neuroimaging objects that are not images at all.

- MINC 1 (netCDF) is read through nibabel; MINC 2 (HDF5) through h5py (a dependency) and
  nibabel's MINC 2 reader, from memory: h5py opens the bytes as a file object, so no temporary
  file is written. Without h5py a MINC 2 object is refused saying so.
- A format written as two files (Analyze 7.5 or NIfTI `.hdr` + `.img`, Philips `.PAR` + `.REC`,
  AFNI `+orig.HEAD` + `.BRIK[.gz]`) is landed as one object: a *pair bundle* (`pack_pair`), a
  short JSON head naming both files followed by their bytes, kept under the header file's name.
- Objects that are not images (CIFTI-2 and GIFTI data, tractography, MR spectroscopy, PET) get a
  reason of their own (`non_image_reason`), never the generic "not an image".
"""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from mri_assets.core.unreadable import UnreadableImage

GZIP_SIGNATURE = b"\x1f\x8b"
DEFAULT_MAX_UNPACKED_BYTES = 2 * 1024**3
DEFAULT_MAX_SLICES = 4096

NETCDF_SIGNATURES = (b"CDF\x01", b"CDF\x02")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
PAIR_MAGIC = b"MRI-ASSETS-PAIR/1\n"

# kind -> (header suffixes, image suffixes), lower case; the first image suffix is the one named
PAIR_SUFFIXES = {
    "analyze": ((".hdr", ".hdr.gz"), (".img", ".img.gz")),
    "parrec": ((".par",), (".rec",)),
    "afni": ((".head",), (".brik", ".brik.gz")),
}
_PAIR_WORDS = {"analyze": "Analyze/NIfTI", "parrec": "Philips PAR/REC", "afni": "AFNI"}


# ---- gzip, with a bound on what it unpacks to -----------------------------------------------

def gunzip_bounded(data: bytes, limit: int, what: str = "object") -> bytes:
    """The content of a gzip stream (every member), refused once it passes `limit` bytes: a small
    file that unpacks to gigabytes (a gzip bomb) never fills the memory."""
    parts: list[bytes] = []
    total = 0
    pending = data
    while pending[:2] == GZIP_SIGNATURE:
        inflater = zlib.decompressobj(31)
        while not inflater.eof:
            try:
                chunk = inflater.decompress(pending, 1 << 20)
            except zlib.error as exc:
                raise UnreadableImage(f"truncated or corrupt gzip stream around the {what}: "
                                      f"{exc}; copy it again from its source, or re-export it") from exc
            total += len(chunk)
            if total > limit:
                raise UnreadableImage(
                    f"gzip stream unpacks to more than {limit // 2**20} MiB, the bound on one "
                    "object: a gzip bomb, or a volume too large for one object; leave it out of "
                    "the wave, or split the series")
            parts.append(chunk)
            pending = inflater.unconsumed_tail
            if not chunk and not pending:
                raise UnreadableImage(f"truncated or corrupt gzip stream around the {what}: it "
                                      "ends before its last block; copy it again from its source, or re-export it")
        pending = inflater.unused_data
    return b"".join(parts)


def gunzip_head(data: bytes, n: int) -> bytes | None:
    """The first `n` unpacked bytes of a gzip stream, or None when it does not inflate."""
    try:
        return zlib.decompressobj(31).decompress(data[: 256 * 1024], n)
    except zlib.error:
        return None


# ---- slices per object ------------------------------------------------------------------------

def slice_count(shape: tuple[int, ...], slice_dim: int | None = None) -> int:
    """How many 2-D slices a voxel array of `shape` gives: along `slice_dim` (else the third axis),
    times every volume beyond three dimensions."""
    if len(shape) < 3:
        return 1
    axis = slice_dim if slice_dim is not None and slice_dim < 3 else 2
    return int(shape[axis]) * int(math.prod(int(d) for d in shape[3:]))


def check_slice_count(count: int, limit: int, what: str) -> None:
    if count > limit:
        raise UnreadableImage(
            f"{what} holds {count} slices, more than the {limit} one object may give "
            "(ingest.max_slices_per_object): split the series, or raise the bound")


# ---- objects that are not images ----------------------------------------------------------------

_NOT_SLICES = "; leave it out of the wave"
NON_IMAGE_REASONS = {
    "cifti": "not an image: a CIFTI-2 file (data on surface vertices and grayordinates, or a "
             "connectivity matrix), not slices of a volume" + _NOT_SLICES,
    "gifti": "not an image: a GIFTI surface file (a mesh or data on its vertices), not slices of "
             "a volume" + _NOT_SLICES,
    "trk": "not an image: a TrackVis .trk tractography file (streamlines, not voxels)" + _NOT_SLICES,
    "tck": "not an image: an MRtrix .tck tractography file (streamlines, not voxels)" + _NOT_SLICES,
    "spectroscopy": "not an image: MR spectroscopy (spectra, not slices)" + _NOT_SLICES,
    "ecat": "not MR: an ECAT 7 PET volume; this pipeline ingests MR images only" + _NOT_SLICES,
}
_CIFTI_INTENTS = range(3000, 3100)
_NIFTI_ECODE_CIFTI = 32


def non_image_kind(data: bytes) -> str | None:
    """The kind of a recognised non-image object (see `NON_IMAGE_REASONS`), or None."""
    if data.startswith(b"TRACK") and len(data) >= 1000:
        return "trk"
    if data.startswith(b"mrtrix tracks"):
        return "tck"
    if data.startswith(b"MATRIX7"):
        return "ecat"
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"<?xml") and b"<GIFTI" in head:
        return "gifti"
    if head.startswith(b">>> Begin of header <<<"):  # Siemens .rda spectroscopy
        return "spectroscopy"
    return None


def nifti_non_image_kind(header: bytes) -> str | None:
    """CIFTI-2 (an intent code 3000-3099 or a CIFTI extension) or NIfTI-MRS (intent name mrs_v…)
    in the raw header bytes of a NIfTI-1 (348) or NIfTI-2 (540) file."""
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0] if len(header) >= 4 else None
        if size not in (348, 540) or len(header) < size:
            continue
        if size == 348:
            intent_code = struct.unpack_from(order + "h", header, 68)[0]
            intent_name = header[328:344]
        else:
            intent_code = struct.unpack_from(order + "i", header, 504)[0]
            intent_name = header[508:524]
        if intent_code in _CIFTI_INTENTS or _first_extension_code(header, size, order) == \
                _NIFTI_ECODE_CIFTI:
            return "cifti"
        if intent_name.lower().startswith(b"mrs_v"):
            return "spectroscopy"
        return None
    return None


def _first_extension_code(header: bytes, size: int, order: str) -> int | None:
    if len(header) < size + 12 or header[size] == 0:
        return None
    return struct.unpack_from(order + "i", header, size + 8)[0]


# ---- paired files ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PairedFiles:
    kind: str
    header_name: str
    header: bytes
    image_name: str
    image: bytes


def pair_role(name: str) -> tuple[str, str, str] | None:
    """(kind, "header" or "image", stem) when `name` is one file of a paired format."""
    lower = name.lower()
    for kind, (headers, images) in PAIR_SUFFIXES.items():
        for role, suffixes in (("header", headers), ("image", images)):
            for suffix in suffixes:
                if lower.endswith(suffix):
                    return kind, role, name[: len(name) - len(suffix)]
    return None


def missing_partner_reason(name: str, kind: str, role: str) -> str:
    stem = pair_role(name)[2] if pair_role(name) else name
    headers, images = PAIR_SUFFIXES[kind]
    wanted = images if role == "header" else headers
    partner = " or ".join(stem + suffix for suffix in wanted[:2])
    return (f"{_PAIR_WORDS[kind]} {role} file without its partner ({partner} is not beside it): "
            "the pair was not copied whole; copy the missing file into the same folder and "
            "re-run ingest-wave")


def pack_pair(pair: PairedFiles) -> bytes:
    """One object for two files: a JSON line naming them, then the header's and image's bytes."""
    head = {"kind": pair.kind, "files": [[pair.header_name, len(pair.header)],
                                        [pair.image_name, len(pair.image)]]}
    return PAIR_MAGIC + json.dumps(head, sort_keys=True).encode() + b"\n" + pair.header + pair.image


def unpack_pair(data: bytes) -> PairedFiles:
    if not data.startswith(PAIR_MAGIC):
        raise UnreadableImage("not a pair bundle")
    end = data.find(b"\n", len(PAIR_MAGIC))
    try:
        head = json.loads(data[len(PAIR_MAGIC):end])
        (header_name, header_size), (image_name, image_size) = head["files"]
        kind = head["kind"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UnreadableImage(f"corrupt pair bundle head: {exc}; land the wave again") from exc
    body = data[end + 1:]
    if kind not in PAIR_SUFFIXES or len(body) != header_size + image_size:
        raise UnreadableImage(f"corrupt pair bundle: {len(body)} bytes where its head names "
                              f"{header_size} + {image_size}; land the wave again")
    return PairedFiles(kind, header_name, body[:header_size], image_name, body[header_size:])


def bundle_kind(data: bytes) -> str | None:
    """The kind of a pair bundle ("analyze", "parrec", "afni"), None for other bytes."""
    if not data.startswith(PAIR_MAGIC):
        return None
    try:
        return unpack_pair(data).kind
    except UnreadableImage:
        return None


def is_minc(data: bytes) -> bool:
    if data[:4] in NETCDF_SIGNATURES:
        return True
    return data.startswith(HDF5_SIGNATURE) and b"minc-2.0" in data[: 1 << 20]


# ---- reading through nibabel --------------------------------------------------------------

@dataclass(frozen=True)
class VolumeRead:
    """A voxel array (2-D to N-D, spatial axes first) and the axis to slice along (None: the third)."""

    voxels: np.ndarray
    slice_dim: int | None
    format: str


def _file_map(klass, **fileobjs):
    from nibabel.fileholders import FileHolder

    return {role: FileHolder(fileobj=fileobj) for role, fileobj in fileobjs.items()}


def _load(img, what: str, max_slices: int, slice_dim: int | None = None) -> np.ndarray:
    shape = tuple(int(d) for d in img.shape)
    check_slice_count(slice_count(shape, slice_dim), max_slices, what)
    return np.asanyarray(img.dataobj)


def _unreadable(what: str, exc: Exception) -> UnreadableImage:
    detail = " ".join(str(exc).split())[:300]
    return UnreadableImage(f"unreadable or truncated {what}: {type(exc).__name__}: {detail}; "
                           "copy or export it again")


def read_minc(data: bytes, max_slices: int = DEFAULT_MAX_SLICES) -> VolumeRead:
    """MINC 1 or 2, voxels in (x, y, z[, t]) order: MINC stores them slowest axis first, so the
    file's dimension order is reversed."""
    import nibabel as nib

    if data.startswith(HDF5_SIGNATURE):
        voxels = _read_minc2(data, max_slices)
    else:
        try:
            img = nib.Minc1Image.from_file_map(_file_map(nib.Minc1Image, image=io.BytesIO(data)))
            shape = tuple(reversed([int(d) for d in img.shape]))
            check_slice_count(slice_count(shape), max_slices, "MINC volume")
            voxels = np.asanyarray(img.dataobj)
        except UnreadableImage:
            raise
        except Exception as exc:
            raise _unreadable("MINC volume", exc) from exc
    return VolumeRead(np.transpose(voxels, tuple(reversed(range(voxels.ndim)))), None, "minc")


def open_hdf5(data: bytes, what: str):
    """An h5py file reading `data` from memory (h5py takes a file object; nothing touches the
    disk), or UnreadableImage saying h5py is missing."""
    try:
        import h5py
    except ImportError:
        raise UnreadableImage(
            f"{what} (HDF5), but h5py, which nibabel needs to read it, is not installed: "
            "install the project's dependencies (make install), or convert it to MINC 1 or "
            "NIfTI (mincconvert / mnc2nii)"
        ) from None
    try:
        return h5py.File(io.BytesIO(data), "r")
    except Exception as exc:
        raise _unreadable(what, exc) from exc


def _read_minc2(data: bytes, max_slices: int) -> np.ndarray:
    """The scaled voxels of a MINC 2 file in its stored order, read by nibabel's `Minc2File`
    (what `Minc2Image` reads through, which itself only opens files by name)."""
    from nibabel.minc2 import Minc2File

    with open_hdf5(data, "MINC 2 volume") as handle:
        try:
            minc = Minc2File(handle)
            if minc.get_affine().shape != (4, 4):
                raise UnreadableImage("MINC 2 volume without 3 spatial dimensions (xspace, "
                                      "yspace, zspace): not a volume this pipeline slices; "
                                      "export it again")
            shape = tuple(reversed([int(d) for d in minc.get_data_shape()]))
            check_slice_count(slice_count(shape), max_slices, "MINC 2 volume")
            return np.asanyarray(minc.get_scaled_data())
        except UnreadableImage:
            raise
        except Exception as exc:
            raise _unreadable("MINC 2 volume", exc) from exc


def read_pair(data: bytes, max_unpacked: int = DEFAULT_MAX_UNPACKED_BYTES,
              max_slices: int = DEFAULT_MAX_SLICES) -> VolumeRead:
    """The volume of a pair bundle: Analyze 7.5 or NIfTI-1 pair, PAR/REC or AFNI BRIK/HEAD."""
    pair = unpack_pair(data)
    header, image = pair.header, pair.image
    if header[:2] == GZIP_SIGNATURE:
        header = gunzip_bounded(header, max_unpacked, "header")
    if image[:2] == GZIP_SIGNATURE:
        image = gunzip_bounded(image, max_unpacked, "image data")
    if pair.kind == "analyze":
        return _read_analyze(header, image, max_slices)
    if pair.kind == "parrec":
        return _read_parrec(header, image, max_slices)
    return _read_afni(header, image, max_slices)


def _read_analyze(header: bytes, image: bytes, max_slices: int) -> VolumeRead:
    import nibabel as nib

    magic = header[344:348] if len(header) >= 348 else b""
    klass, fmt = (nib.Nifti1Pair, "nifti") if magic[:3] == b"ni1" else (nib.AnalyzeImage, "analyze")
    if header[4:7] == b"ni2":
        klass, fmt = nib.Nifti2Pair, "nifti"
    try:
        img = klass.from_file_map(_file_map(klass, header=io.BytesIO(header),
                                            image=io.BytesIO(image)))
        slice_dim = img.header.get_dim_info()[2] if fmt == "nifti" else None
        voxels = _load(img, f"{fmt} volume", max_slices, slice_dim)
    except UnreadableImage:
        raise
    except Exception as exc:
        raise _unreadable("Analyze/NIfTI .hdr/.img pair", exc) from exc
    return VolumeRead(voxels, slice_dim, fmt)


def _read_parrec(header: bytes, image: bytes, max_slices: int) -> VolumeRead:
    from nibabel.parrec import PARRECImage

    try:
        text = io.StringIO(header.decode("latin-1"))
        img = PARRECImage.from_file_map(
            _file_map(PARRECImage, header=text, image=io.BytesIO(image)), strict_sort=True)
        voxels = _load(img, "PAR/REC volume", max_slices)
    except UnreadableImage:
        raise
    except Exception as exc:
        raise _unreadable("PAR/REC pair", exc) from exc
    return VolumeRead(voxels, None, "parrec")


def _read_afni(header: bytes, image: bytes, max_slices: int) -> VolumeRead:
    from nibabel.brikhead import AFNIImage

    try:
        text = io.StringIO(header.decode("latin-1"))
        img = AFNIImage.from_file_map(_file_map(AFNIImage, header=text, image=io.BytesIO(image)))
        voxels = _load(img, "AFNI volume", max_slices)
    except UnreadableImage:
        raise
    except Exception as exc:
        raise _unreadable("AFNI HEAD/BRIK pair", exc) from exc
    return VolumeRead(voxels, None, "afni")
