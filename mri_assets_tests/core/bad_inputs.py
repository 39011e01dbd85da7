"""Writes every kind of bad input the readers must refuse, and objects with bad slices inside.

Reused by the manifest and asset tests: `write_bad_inputs(folder)` returns, per file, the
fragment the `UnreadableImage.reason` must contain (compare lower-cased).
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image

PYDICOM_FILES = Path(pydicom.__file__).resolve().parent / "data" / "test_files"
MR_SMALL = PYDICOM_FILES / "MR_small.dcm"
MR_TRUNCATED = PYDICOM_FILES / "MR_truncated.dcm"


@dataclass(frozen=True)
class BadInput:
    relative_path: str
    kind: str
    reason_fragment: str


@dataclass(frozen=True)
class PartlyBadInput:
    relative_path: str
    n_slices: int
    bad_slice_reasons: dict[int, str]


def mr_small_pixels() -> np.ndarray:
    return pydicom.dcmread(MR_SMALL).pixel_array


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(pixels_u8: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels_u8).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def nifti_bytes(volume: np.ndarray, slice_dim: int | None = None, gz: bool = False) -> bytes:
    img = nib.Nifti1Image(volume, np.eye(4))
    if slice_dim is not None:
        img.header.set_dim_info(slice=slice_dim)
    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def _mr_small_u8() -> np.ndarray:
    pixels = mr_small_pixels().astype(np.float32)
    return np.clip(pixels / pixels.max() * 255, 0, 255).astype(np.uint8)


def write_bad_inputs(folder: Path) -> list[BadInput]:
    """One file per bad-input kind under `folder`; each must raise `UnreadableImage`."""
    folder.mkdir(parents=True, exist_ok=True)
    scan_u8 = _mr_small_u8()
    good_png = png_bytes(np.kron(scan_u8, np.ones((2, 2), np.uint8)))
    good_jpeg = jpeg_bytes(np.kron(scan_u8, np.ones((2, 2), np.uint8)))
    good_nifti = nifti_bytes(np.stack([scan_u8.astype(np.int16)] * 4, axis=-1))
    files = {
        "empty.png": (b"", "zero_byte", "empty object (0 bytes)"),
        "cut.png": (good_png[: len(good_png) // 2], "truncated_png", "truncated or corrupt png"),
        "cut.jpg": (
            good_jpeg[: len(good_jpeg) // 2],
            "truncated_jpeg",
            "truncated or corrupt jpeg",
        ),
        "MR_truncated.dcm": (
            MR_TRUNCATED.read_bytes(),
            "truncated_dicom",
            "truncated or corrupt dicom",
        ),
        "readme.txt": (b"scanner export notes, not an image\n" * 4, "non_image", "not an image"),
        "tiny.png": (png_bytes(scan_u8[:16, :16].copy()), "too_small", "16x16 px"),
        "huge.png": (png_bytes(np.zeros((40, 8200), np.uint8)), "too_large", "40x8200 px"),
        "notes.nii": (
            b"this text file only claims to be a NIfTI volume\n" * 8,
            "bad_nifti_header",
            "unreadable nifti header",
        ),
        "scan.dcm": (good_png, "wrong_extension", "the name says dicom but the content is png"),
        "cut.nii": (good_nifti[: len(good_nifti) // 2], "truncated_nifti", "truncated nifti"),
        "cut.nii.gz": (
            gzip.compress(good_nifti, mtime=0)[:300],
            "truncated_nifti_gz",
            "truncated or corrupt gzip",
        ),
        "complex.nii": (
            nifti_bytes(np.zeros((40, 40, 3), np.complex64)),
            "complex_nifti",
            "not a scalar intensity image",
        ),
    }
    written = []
    for name, (payload, kind, fragment) in files.items():
        (folder / name).write_bytes(payload)
        written.append(BadInput(name, kind, fragment))
    return written


def write_partly_bad_inputs(folder: Path) -> list[PartlyBadInput]:
    """Readable objects with some bad slices: NaN/inf slices, a constant slice, a constant image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    volume = rng.normal(100.0, 20.0, size=(40, 48, 6)).astype(np.float32)
    volume[3, 4, 1] = np.nan
    volume[:, :, 2] = np.inf
    volume[:, :, 4] = 7.0
    (folder / "volume-with-bad-slices.nii.gz").write_bytes(nifti_bytes(volume, gz=True))
    (folder / "blank.png").write_bytes(png_bytes(np.full((64, 64), 9, np.uint8)))
    return [
        PartlyBadInput(
            "volume-with-bad-slices.nii.gz",
            6,
            {1: "non-finite", 2: "non-finite", 4: "constant slice"},
        ),
        PartlyBadInput("blank.png", 1, {0: "constant slice"}),
    ]
