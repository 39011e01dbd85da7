"""Synthetic sample waves built from the real MRI scans that ship with nilearn, nibabel and pydicom.

Each synthetic patient is one source volume with one random augmentation applied to the whole
volume (small affine, smooth multiplicative bias field, gamma, Rician noise). From it we export
up to three file groups, one orientation per group, each written in one of four formats:
NIfTI volume (`.nii.gz`, slice axis = acquisition axis), DICOM series (one file per slice, built
on pydicom's MR_small.dcm with planted fake PHI), 16-bit PNG slices, JPEG slices.

Ground truth (`labels.csv`) comes from slice geometry: axial slices below the mid-height of the
head's axial extent are `axial_inferior`, above it `axial_superior` (a band of slices around the
middle is not exported), coronal and sagittal by orientation. Near-empty edge slices are skipped.
With `levels=True` a second, harder class set is written beside it (`labels.csv` column `level`,
`LEVEL_CLASSES`): the anatomical level of each slice within the head's extent along its axis
(`anatomical_level`): ten axial levels, ten coronal, five sagittal bands by the distance from the
midline, 25 classes. It is computed from the same slice positions, so it never changes a stored
image or the `label` column.
The same seed gives byte-identical files: PNG/JPEG/DICOM carry no timestamps and gzip mtime is 0.

The stored integers are the same on every CPU: the volumes are computed in float64 with
operations whose results IEEE 754 fixes to the last bit (add, multiply, divide, square root,
comparisons, sorting) in a fixed order. The library calls whose last bit depends on the CPU's
vector unit or on the BLAS (numpy's SIMD `exp`/`power`/`sin`, `tensordot`) are replaced by
`exact_exp`, `exact_log` and explicit contractions; scipy's `ndimage` interpolation is plain C
with one code path. Before the final scaling each value is rounded to a grid of 2**-16
(`to_grid`), and the writers scale those integers with integer arithmetic, so only a change of
more than ~1e-5 in a value could move a stored integer.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

CLASSES = ("axial_inferior", "axial_superior", "coronal", "sagittal")
# The harder class set (`levels=True`): where the slice lies within the head's extent along its
# own axis, as a fraction f of the usable range (0 = first usable slice, 1 = last), in equal
# bins. Axial: tenths from the skull base (axial_01) to the vertex (axial_10); the count is even,
# so axial_01..05 are exactly the `axial_inferior` slices and axial_06..10 the `axial_superior`
# ones. Coronal: tenths from posterior (coronal_01) to anterior (coronal_10). Sagittal: fifths of
# the distance from the midline, 2 |f - 0.5|, either hemisphere (left and right slices at the
# same distance look alike), from `sagittal_medial` to `sagittal_far_lateral`. Neighbouring
# levels share anatomy near their border, so a classifier needs many labels to separate them.
# Measured with `benchmarks/active_learning.py --seeds 2` on a demo's bf16 pretrained backbone:
# with 13 levels (axial sixths, coronal quarters, sagittal thirds) random selection reached 0.96
# macro-F1 at 500 labels, too easy to show headroom; with these 25 it reaches 0.88, and model
# entropy + diversity matches that with 246 labels.
AXIAL_LEVELS = 10
CORONAL_LEVELS = 10
SAGITTAL_BANDS = (
    "sagittal_medial", "sagittal_paramedial", "sagittal_intermediate", "sagittal_lateral",
    "sagittal_far_lateral",
)
LEVEL_CLASSES = (
    *(f"axial_{n:02d}" for n in range(1, AXIAL_LEVELS + 1)),
    *(f"coronal_{n:02d}" for n in range(1, CORONAL_LEVELS + 1)),
    *SAGITTAL_BANDS,
)
ORIENTATIONS = ("axial", "coronal", "sagittal")
FORMATS = ("nifti", "dicom", "png16", "jpeg")
# `t1_new_site`: a new site joins with its own scanner and exporter. Half of the patients (drawn
# per patient) come from it: T2-like contrast (intensities inverted inside the head, so fluid is
# bright and white matter dark) and rows and columns swapped on export (a transposed in-plane
# orientation, as a wrong orientation tag gives). The anatomy and its labels are the same; the
# features are not. Either change alone moved ARI at k = 4 by -8 % to +3 % on some samples; both
# together dropped it by 34-49 % on every sample tried (the demo's drift wave).
WAVE_STYLES = ("t1", "epi", "mixed", "t1_new_site")

GRID_BITS = 16
AXIAL_BORDER_HALF_WIDTH = 2
FOREGROUND_FRACTION = 0.15
MIN_SLICE_AREA_FRACTION = 0.3
MAX_SLICES_PER_GROUP_AND_CLASS = 16
PLANTED_PATIENT_NAME = "Testpatient^Planted{n}"

_ORIENTATION_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
_DISPLAY_ORDER = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}


@dataclass(frozen=True)
class SourceVolume:
    name: str
    kind: str
    voxels: np.ndarray


@dataclass(frozen=True)
class SampleSummary:
    out_dir: Path
    n_slices: int
    n_patients: int
    slices_per_class: dict[str, int]
    slices_per_format: dict[str, int]
    files_per_format: dict[str, int]
    labels_csv: Path
    image_paths: tuple[Path, ...]
    bad_paths: tuple[Path, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        """A few lines for a person: counts, where the files and the ground truth are (never the
        list of files: a 100,000-slice sample has tens of thousands)."""
        def counts(by_name: dict[str, int]) -> str:
            return ", ".join(f"{name} {count:,}" for name, count in by_name.items())

        files = sum(self.files_per_format.values())
        head = f"{self.n_slices:,} slices of {self.n_patients:,} patients in {files:,} files"
        lines = [f"{head} under {self.out_dir}",
                 f"  per class: {counts(self.slices_per_class)}",
                 f"  per format (slices): {counts(self.slices_per_format)}",
                 f"  ground truth: {self.labels_csv}"]
        if self.bad_paths:
            lines.append(f"  {len(self.bad_paths)} broken or non-image files in "
                         f"{self.bad_paths[0].parent.name}/ (ingestion quarantines them): "
                         + ", ".join(path.name for path in self.bad_paths))
        return "\n".join(lines)


@dataclass(frozen=True)
class _ExportedGroup:
    orientation: str
    fmt: str
    slice_positions: tuple[int, ...]
    labels: tuple[str, ...]


def _site_packages() -> Path:
    import nibabel

    return Path(nibabel.__file__).resolve().parent.parent


def source_paths() -> dict[str, Path]:
    site = _site_packages()
    return {
        "mni_t1": site / "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "anatomical": site / "nibabel/tests/data/anatomical.nii",
        "epi_4d": site / "nibabel/tests/data/example4d.nii.gz",
        "dicom_template": site / "pydicom/data/test_files/MR_small.dcm",
        "truncated_dicom": site / "pydicom/data/test_files/MR_truncated.dcm",
    }


def _canonical(path: Path) -> np.ndarray:
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj, dtype=np.float64)


def _block_mean_2x(vol: np.ndarray) -> np.ndarray:
    """Mean of each 2x2x2 block, summed in a fixed order (no SIMD-width-dependent reduction)."""
    x, y, z = (s - s % 2 for s in vol.shape)
    vol = vol[:x, :y, :z]
    total = np.zeros((x // 2, y // 2, z // 2), dtype=np.float64)
    for i in (0, 1):
        for j in (0, 1):
            for k in (0, 1):
                total += vol[i::2, j::2, k::2]
    return total * 0.125


def _unit_scaled(vol: np.ndarray) -> np.ndarray:
    top = float(np.percentile(vol, 99.5)) or 1.0
    return np.clip(vol / top, 0.0, 1.2)


_LN2 = 0.6931471805599453


def exact_exp(x: np.ndarray) -> np.ndarray:
    """exp(x) from IEEE-exact operations only, so every CPU gives the same last bit.

    x = k ln2 + r with |r| <= ln2/2; exp(r) by its Taylor series (18 terms, Horner); times 2**k
    with `ldexp` (exact). Accurate to a few ulp, which is all a sample generator needs.
    """
    x = np.asarray(x, dtype=np.float64)
    k = np.rint(x / _LN2)
    r = x - k * _LN2
    series = np.ones_like(r)
    for n in range(18, 0, -1):
        series = 1.0 + series * r / n
    return np.ldexp(series, k.astype(np.int64))


def exact_log(x: np.ndarray) -> np.ndarray:
    """ln(x) for x > 0 from IEEE-exact operations: x = m 2**e (`frexp`, exact), ln m = 2 atanh(s)
    with s = (m - 1) / (m + 1), |s| <= 1/3, by its series (20 terms)."""
    mantissa, exponent = np.frexp(np.asarray(x, dtype=np.float64))
    s = (mantissa - 1.0) / (mantissa + 1.0)
    s2 = s * s
    series = np.zeros_like(s)
    for n in range(39, 0, -2):
        series = 1.0 / n + s2 * series
    return 2.0 * s * series + exponent * _LN2


def exact_power(x: np.ndarray, gamma: float) -> np.ndarray:
    """x ** gamma for x >= 0 (0 stays 0) through `exact_exp` and `exact_log`."""
    positive = x > 0
    out = np.zeros_like(x, dtype=np.float64)
    out[positive] = exact_exp(gamma * exact_log(x[positive]))
    return out


def to_grid(values: np.ndarray) -> np.ndarray:
    """int64 multiples of 2**-GRID_BITS nearest to `values` (the platform-independent stored form)."""
    return np.rint(np.asarray(values, dtype=np.float64) * (1 << GRID_BITS)).astype(np.int64)


def grid_to_int(grid: np.ndarray, scale: int, top: int, dtype: str) -> np.ndarray:
    """round(grid * 2**-GRID_BITS * scale), clipped to [0, top], in integer arithmetic."""
    half = 1 << (GRID_BITS - 1)
    scaled = (np.maximum(grid, 0) * scale + half) >> GRID_BITS
    return np.minimum(scaled, top).astype(dtype)


def load_source_volumes(paths: dict[str, Path]) -> dict[str, list[SourceVolume]]:
    """The real scans resampled to roughly 2 mm and scaled so the 99.5th percentile is 1, by kind."""
    mni = _block_mean_2x(_canonical(paths["mni_t1"]))
    anatomical = ndimage.zoom(_canonical(paths["anatomical"]), 2.4, order=1)
    epi = _canonical(paths["epi_4d"])
    epi_volumes = []
    for t in range(epi.shape[3]):
        coarse = ndimage.zoom(epi[..., t], (0.5, 0.5, 1.0), order=1)
        epi_volumes.append(
            SourceVolume(
                f"epi_4d[{t}]", "epi", _unit_scaled(ndimage.zoom(coarse, (1.5, 1.5, 2.0), order=1))
            )
        )
    return {
        "t1": [
            SourceVolume("mni_t1", "t1", _unit_scaled(mni)),
            SourceVolume("anatomical", "t1", _unit_scaled(anatomical)),
        ],
        "epi": epi_volumes,
    }


@functools.lru_cache(maxsize=1)
def shipped_source_volumes() -> dict[str, list[SourceVolume]]:
    """`load_source_volumes` of the installed packages' scans, loaded once per process."""
    return load_source_volumes(source_paths())


def _choose_source(
    volumes: dict[str, list[SourceVolume]], wave_style: str, rng: np.random.Generator
) -> SourceVolume:
    if wave_style == "mixed":
        kind = "t1" if rng.random() < 0.5 else "epi"
    else:
        kind = "t1" if wave_style.startswith("t1") else wave_style
    if kind == "t1":
        return volumes["t1"][0] if rng.random() < 0.85 else volumes["t1"][1]
    return volumes["epi"][int(rng.integers(len(volumes["epi"])))]


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    cx, cy, cz = (math.cos(float(a)) for a in angles_rad)
    sx, sy, sz = (math.sin(float(a)) for a in angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _interpolation_matrix(n_out: int, n_knots: int) -> np.ndarray:
    """(n_out, n_knots) weights that linearly interpolate knots spread over n_out samples."""
    knots = np.linspace(0, n_out - 1, n_knots)
    return np.stack(
        [np.interp(np.arange(n_out), knots, np.eye(n_knots)[k]) for k in range(n_knots)], axis=1
    )


def smooth_bias_field(
    shape: tuple[int, int, int], rng: np.random.Generator, knots: int = 4, sd: float = 0.15
) -> np.ndarray:
    """exp of a random knots^3 grid interpolated trilinearly to `shape` (separable, no zoom).

    The three contractions are explicit sums over the knots in a fixed order (a BLAS call would
    sum in an order that depends on the CPU)."""
    grid = rng.normal(0.0, sd, size=(knots, knots, knots))
    wx, wy, wz = (_interpolation_matrix(n, knots) for n in shape)
    along_x = sum_terms(wx[:, a, None, None] * grid[a][None, :, :] for a in range(knots))
    along_y = sum_terms(wy[None, :, b, None] * along_x[:, b, None, :] for b in range(knots))
    field = sum_terms(wz[None, None, :, c] * along_y[:, :, c, None] for c in range(knots))
    return exact_exp(field)


def sum_terms(terms) -> np.ndarray:
    """Elementwise sum of arrays in the order given."""
    total = None
    for term in terms:
        total = term.copy() if total is None else total + term
    return total


def augment_volume(unit: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random augmentation of a volume scaled to about [0, 1]; returns (augmented, foreground).

    Affine (rotation up to 4 degrees per axis, scale 0.93-1.07, shift up to 3 voxels), then the
    foreground mask (> 0.15), gamma 0.8-1.25, smooth multiplicative bias field, Rician noise (sd 1-4 %).
    """
    matrix = _rotation(np.deg2rad(rng.uniform(-4, 4, size=3))) / rng.uniform(0.93, 1.07)
    centre = (np.array(unit.shape) - 1) / 2
    offset = centre - matrix @ centre + rng.uniform(-3, 3, size=3)
    moved = ndimage.affine_transform(
        unit, matrix, offset=offset, order=1, mode="constant", cval=0.0
    )
    np.clip(moved, 0.0, None, out=moved)
    foreground = moved > FOREGROUND_FRACTION
    moved = exact_power(moved, float(rng.uniform(0.8, 1.25)))
    moved *= smooth_bias_field(unit.shape, rng)
    sigma = float(rng.uniform(0.01, 0.04))
    real = moved + sigma * rng.standard_normal(moved.shape)
    imaginary = sigma * rng.standard_normal(moved.shape)
    return np.sqrt(real * real + imaginary * imaginary), foreground


def t2_like(volume: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """T2-like contrast from a T1-like volume: inside the head `1.1 - value` (floored at 0), so
    dark fluid turns bright and bright white matter dark; background stays as it is."""
    return np.where(foreground, np.clip(1.1 - volume, 0.0, None), volume)


def usable_slice_positions(foreground: np.ndarray, orientation: str) -> np.ndarray:
    """Positions along the orientation's axis whose head area is at least 30 % of the largest."""
    axis = _ORIENTATION_AXIS[orientation]
    other = tuple(a for a in range(3) if a != axis)
    area = foreground.sum(axis=other)
    if area.max() == 0:
        return np.array([], dtype=int)
    return np.flatnonzero(area >= MIN_SLICE_AREA_FRACTION * area.max())


def _evenly_spaced(candidates: np.ndarray, count: int) -> list[int]:
    if count <= 0 or len(candidates) == 0:
        return []
    count = min(count, len(candidates))
    picks = (
        np.linspace(0, len(candidates) - 1, count + 2)[1:-1]
        if len(candidates) > count
        else np.arange(count)
    )
    return [int(candidates[round(p)]) for p in picks]


def select_slices(
    foreground: np.ndarray, orientation: str, wanted: dict[str, int]
) -> tuple[list[int], list[str]]:
    """Slice positions (sorted, evenly spread over the usable range) and their labels for one group."""
    usable = usable_slice_positions(foreground, orientation)
    if orientation != "axial":
        positions = _evenly_spaced(usable, wanted[orientation])
        return positions, [orientation] * len(positions)
    if len(usable) == 0:
        return [], []
    mid = (usable[0] + usable[-1]) / 2
    inferior = usable[usable < mid - AXIAL_BORDER_HALF_WIDTH]
    superior = usable[usable > mid + AXIAL_BORDER_HALF_WIDTH]
    picked = [(p, "axial_inferior") for p in _evenly_spaced(inferior, wanted["axial_inferior"])]
    picked += [(p, "axial_superior") for p in _evenly_spaced(superior, wanted["axial_superior"])]
    picked.sort()
    return [p for p, _ in picked], [label for _, label in picked]


def anatomical_level(foreground: np.ndarray, orientation: str, position: int) -> str:
    """The `LEVEL_CLASSES` class of the slice at `position` along the orientation's axis: its
    place within the usable range (`usable_slice_positions`) of the same foreground mask, binned
    in integer arithmetic (a slice exactly on a border belongs to the level above it)."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    usable = usable_slice_positions(foreground, orientation)
    if len(usable) == 0:
        raise ValueError(f"no usable {orientation} slice in this volume")
    first, span = int(usable[0]), int(usable[-1] - usable[0])
    if span == 0:  # a single usable slice: it is the middle of the range
        offset, span = 1, 2
    else:
        offset = int(position) - first
    if orientation == "axial":
        return f"axial_{_bin(offset, span, AXIAL_LEVELS) + 1:02d}"
    if orientation == "coronal":
        return f"coronal_{_bin(offset, span, CORONAL_LEVELS) + 1:02d}"
    return SAGITTAL_BANDS[_bin(abs(2 * offset - span), span, len(SAGITTAL_BANDS))]


def _bin(offset: int, span: int, count: int) -> int:
    """Which of `count` equal bins of [0, span] holds `offset` (0-based; span itself in the last)."""
    return min(offset * count // span, count - 1)


def _display_slices(volume: np.ndarray, orientation: str, positions: list[int]) -> np.ndarray:
    """Stored slices (n, a, b) in NIfTI order for the orientation; display form is `s.T[::-1]`."""
    ordered = np.transpose(volume, _DISPLAY_ORDER[orientation])
    return np.stack([ordered[..., p] for p in positions])


def _class_targets(n_slices: int) -> dict[str, int]:
    base, extra = divmod(n_slices, len(CLASSES))
    return {label: base + (1 if i < extra else 0) for i, label in enumerate(CLASSES)}


def _uid(*parts: object) -> str:
    return "2.25." + str(
        int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:32], 16)
    )


def _write_nifti(path: Path, stored: np.ndarray, voxel_mm: float) -> None:
    import nibabel as nib

    data = np.ascontiguousarray(np.moveaxis(grid_to_int(stored, 3000, 32767, "<i2"), 0, -1))
    img = nib.Nifti1Image(data, np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0]))
    img.header.set_dim_info(slice=2)
    img.header.set_xyzt_units("mm")
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def _write_png16(path: Path, display: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(grid_to_int(display, 40000, 65535, "uint16")).save(
        buffer, format="PNG"
    )
    path.write_bytes(buffer.getvalue())


def _write_jpeg(path: Path, display: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(grid_to_int(display, 200, 255, "uint8")).save(
        buffer, format="JPEG", quality=92
    )
    path.write_bytes(buffer.getvalue())


def planted_phi(
    patient_number: int, patient_folder: str, rng: np.random.Generator
) -> dict[str, str]:
    """Fake identifiers planted in DICOM headers so de-identification has something to remove."""
    return {
        "PatientName": PLANTED_PATIENT_NAME.format(n=patient_number),
        "PatientID": patient_folder,
        "PatientBirthDate": f"19{int(rng.integers(30, 99)):02d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        "InstitutionName": f"Planted Test Clinic {patient_number}",
        "ReferringPhysicianName": f"Testdoctor^Planted{patient_number}",
        "AccessionNumber": f"ACC{patient_number:06d}",
        "StudyDate": f"2025{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
    }


def _write_dicom_series(
    folder: Path,
    template_bytes: bytes,
    displays: list[np.ndarray],
    phi: dict[str, str],
    series_uid_parts: tuple,
) -> list[Path]:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(template_bytes))
    for keyword in (
        "SmallestImagePixelValue",
        "LargestImagePixelValue",
        "WindowCenter",
        "WindowWidth",
        "ImageComments",
    ):
        if keyword in ds:
            delattr(ds, keyword)
    for keyword, value in phi.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = _uid("study", *series_uid_parts[:-1])
    ds.SeriesInstanceUID = _uid("series", *series_uid_parts)
    ds.FrameOfReferenceUID = _uid("frame", *series_uid_parts[:-1])
    ds.SeriesNumber = int(series_uid_parts[-1]) + 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelSpacing = [2.0, 2.0]
    ds.SliceThickness = 2.0
    paths = []
    for index, display in enumerate(displays):
        pixels = np.ascontiguousarray(grid_to_int(display, 3000, 32767, "<i2"))
        sop_uid = _uid("sop", *series_uid_parts, index)
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = index + 1
        ds.SliceLocation = float(2 * index)
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        path = folder / f"slice-{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_bad_files(folder: Path, truncated_dicom: Path) -> list[Path]:
    """The bad inputs a real wave brings: truncated DICOM, empty PNG, text named .nii, 16x16 PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    truncated = folder / "MR_truncated.dcm"
    shutil.copyfile(truncated_dicom, truncated)
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    text = folder / "notes.nii"
    text.write_bytes(b"scanner export log: this is not a NIfTI volume\n")
    tiny = folder / "tiny.png"
    buffer = io.BytesIO()
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(buffer, format="PNG")
    tiny.write_bytes(buffer.getvalue())
    return [truncated, empty, text, tiny]


def _export_group(
    patient_dir: Path,
    group_number: int,
    fmt: str,
    stored: np.ndarray,
    template_bytes: bytes,
    phi: dict[str, str],
    uid_parts: tuple,
) -> tuple[list[tuple[Path, int]], list[Path]]:
    """Write one group; returns ((file, slice_index) per slice in order, files written)."""
    displays = [s.T[::-1] for s in stored]
    if fmt == "nifti":
        path = patient_dir / f"series-{group_number:02d}.nii.gz"
        _write_nifti(path, stored, 2.0)
        return [(path, i) for i in range(len(stored))], [path]
    folder = patient_dir / f"series-{group_number:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "dicom":
        paths = _write_dicom_series(
            folder, template_bytes, displays, phi, uid_parts + (group_number,)
        )
    else:
        suffix, writer = (".png", _write_png16) if fmt == "png16" else (".jpg", _write_jpeg)
        paths = []
        for index, display in enumerate(displays):
            path = folder / f"slice-{index:03d}{suffix}"
            writer(path, display)
            paths.append(path)
    return [(p, 0) for p in paths], paths


def build_sample_data(
    out_dir: Path,
    n_slices: int,
    seed: int,
    wave_style: str = "t1",
    include_bad: bool = True,
    progress: bool = False,
    levels: bool = False,
) -> SampleSummary:
    """Write a synthetic wave of about `n_slices` labelled slices under `out_dir`.

    Layout: `out_dir/patient-XXXX/series-NN.nii.gz` or `out_dir/patient-XXXX/series-NN/slice-NNN.{dcm,png,jpg}`,
    `out_dir/labels.csv` (`relative_path,slice_index,label`), and with `include_bad` the unreadable
    files in `out_dir/incoming-unsorted/` (not in labels.csv). `levels=True` adds the column
    `level` (`LEVEL_CLASSES`, the harder task) to labels.csv; the images are the same bytes.
    """
    if wave_style not in WAVE_STYLES:
        raise ValueError(f"wave_style must be one of {WAVE_STYLES}, got {wave_style!r}")
    if n_slices < len(CLASSES):
        raise ValueError(
            f"n_slices must be at least {len(CLASSES)} (one per class), got {n_slices}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = source_paths()
    volumes = shipped_source_volumes()
    template_bytes = paths["dicom_template"].read_bytes()
    remaining = _class_targets(n_slices)
    per_group = max(2, min(MAX_SLICES_PER_GROUP_AND_CLASS, math.ceil(n_slices / len(CLASSES) / 4)))
    format_offset = int(np.random.default_rng([seed, 0]).integers(len(FORMATS)))

    rows: list[tuple[str, int, str]] = []
    level_column: list[str] = []
    image_paths: list[Path] = []
    slices_per_format = {fmt: 0 for fmt in FORMATS}
    files_per_format = {fmt: 0 for fmt in FORMATS}
    group_counter = 0
    patient_number = 0
    bar = tqdm(total=n_slices, unit="slice", desc="sample data", disable=not progress)
    while sum(remaining.values()) > 0:
        patient_number += 1
        rng = np.random.default_rng([seed, patient_number])
        source = _choose_source(volumes, wave_style, rng)
        volume, foreground = augment_volume(source.voxels, rng)
        new_site = wave_style == "t1_new_site" and rng.random() < 0.5
        if new_site:
            volume = t2_like(volume, foreground)
        patient_folder = f"patient-{patient_number:04d}"
        patient_dir = out_dir / patient_folder
        phi = planted_phi(patient_number, patient_folder, rng)
        produced = 0
        for group_number, orientation in enumerate(ORIENTATIONS, start=1):
            wanted = {label: min(per_group, count) for label, count in remaining.items()}
            positions, labels = select_slices(foreground, orientation, wanted)
            if not positions:
                continue
            fmt = FORMATS[(group_counter + format_offset) % len(FORMATS)]
            group_counter += 1
            patient_dir.mkdir(parents=True, exist_ok=True)
            stored = _display_slices(to_grid(volume), orientation, positions)
            if new_site:
                stored = np.ascontiguousarray(stored.transpose(0, 2, 1))
            slice_files, written = _export_group(
                patient_dir, group_number, fmt, stored, template_bytes, phi, (seed, patient_number)
            )
            for (path, slice_index), label in zip(slice_files, labels):
                rows.append((path.relative_to(out_dir).as_posix(), slice_index, label))
                remaining[label] -= 1
            if levels:
                level_column += [anatomical_level(foreground, orientation, p) for p in positions]
            image_paths.extend(written)
            slices_per_format[fmt] += len(positions)
            files_per_format[fmt] += len(written)
            produced += len(positions)
            bar.update(len(positions))
        if produced == 0:
            raise RuntimeError(f"source volume {source.name} gave no usable slice for {remaining}")
    bar.close()

    labels_csv = out_dir / "labels.csv"
    with labels_csv.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        if levels:
            writer.writerow(["relative_path", "slice_index", "label", "level"])
            writer.writerows(row + (level,) for row, level in zip(rows, level_column, strict=True))
        else:
            writer.writerow(["relative_path", "slice_index", "label"])
            writer.writerows(rows)
    bad_paths = (
        write_bad_files(out_dir / "incoming-unsorted", paths["truncated_dicom"])
        if include_bad
        else []
    )
    slices_per_class = {label: sum(1 for _, _, lab in rows if lab == label) for label in CLASSES}
    return SampleSummary(
        out_dir=out_dir,
        n_slices=len(rows),
        n_patients=patient_number,
        slices_per_class=slices_per_class,
        slices_per_format=slices_per_format,
        files_per_format=files_per_format,
        labels_csv=labels_csv,
        image_paths=tuple(image_paths),
        bad_paths=tuple(bad_paths),
    )
