"""MRI as sites export it, built from files nibabel and pydicom ship: a Siemens MOSAIC with real
EPI pixels, anonymised exports, gzip-compressed DICOM, every nibabel volume format (pairs as two
files), non-images, and PNG/JPEG carrying a planted name in their metadata.

`write_site_exports(folder)` writes one file (or pair) per case and returns what each must give
once landed and decoded: how many `ok` slices, or the fragment of its quarantine reason.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from nibabel.externals.netcdf import netcdf_file
from PIL import Image, PngImagePlugin

from mri_assets_tests.core.bad_inputs import MR_SMALL

NIBABEL_PACKAGE = Path(nib.__file__).resolve().parent
NIBABEL_DATA = NIBABEL_PACKAGE / "tests" / "data"
NICOM_DATA = NIBABEL_PACKAGE / "nicom" / "tests" / "data"
GIFTI_DATA = NIBABEL_PACKAGE / "gifti" / "tests" / "data"
SIEMENS_DWI = NICOM_DATA / "siemens_dwi_1000.dcm.gz"  # MOSAIC header, pixels zeroed by nibabel
PHILIPS_MPRAGE = NICOM_DATA / "philips_mprage.dcm.gz"
EPI = NIBABEL_DATA / "example4d.nii.gz"  # 128 x 96 x 24 x 2 real EPI, int16
ANATOMICAL = NIBABEL_DATA / "anatomical.nii"  # 33 x 41 x 25

PLANTED_NAME = "Plantedsite^Margarethe"
PLANTED_ID = "SITE-PLANTED-90417"
PLANTED_BIRTH = "19470923"


def epi_slices() -> np.ndarray:
    """The 48 real EPI slices (2 volumes x 24) of nibabel's example4d, (48, 128, 96) uint16."""
    volume = np.asanyarray(nib.load(EPI).dataobj)
    return np.moveaxis(volume.reshape(128, 96, 48, order="F"), 2, 0).astype(np.uint16)


def mosaic_dataset(tiles: np.ndarray | None = None) -> pydicom.Dataset:
    """Siemens' DWI MOSAIC header (48 slices on a 7 x 7 grid of 128 px tiles, 896 x 896) with
    the 48 EPI slices (padded to 128 x 128) tiled into it row by row of tiles."""
    ds = pydicom.dcmread(io.BytesIO(gzip.decompress(SIEMENS_DWI.read_bytes())))
    tiles = epi_padded() if tiles is None else tiles
    frame = np.zeros((896, 896), np.uint16)
    for index, tile in enumerate(tiles):
        row, col = divmod(index, 7)
        frame[row * 128 : (row + 1) * 128, col * 128 : (col + 1) * 128] = tile
    ds.PixelData = frame.tobytes()
    return ds


def epi_padded() -> np.ndarray:
    tiles = np.zeros((48, 128, 128), np.uint16)
    tiles[:, :, :96] = epi_slices()
    return tiles


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def anonymised_export(**extra: str) -> bytes:
    """MR_small as an anonymising PACS export writes it: placeholders in every identifier, one
    of them copied into an element the basic profile does not clean."""
    ds = pydicom.dcmread(MR_SMALL)
    ds.PatientName = "Anon"
    ds.PatientID = "Anon"
    ds.InstitutionName = "Anon"
    ds.PatientBirthDate = "19000101"
    ds.DerivationDescription = "Anon"
    ds.PixelData = ds.pixel_array[::-1].tobytes()  # another slice than MR_small's own
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return dicom_bytes(ds)


def gzip_bomb(unpacked_mib: int = 1024) -> bytes:
    """A `.dcm.gz` of a few MB that starts as a real DICOM object (pydicom's MR_small) and then
    unpacks to `unpacked_mib` MiB of zeros: gzip members, one after the other."""
    member = gzip.compress(bytes(64 * 2**20), compresslevel=9, mtime=0)
    return gzip.compress(MR_SMALL.read_bytes(), mtime=0) + member * (unpacked_mib // 64)


def minc1_bytes(volume: np.ndarray, patient: dict[str, str] | None = None) -> bytes:
    """A MINC 1 (netCDF) file of an (x, y, z) volume, stored z, y, x as MINC does, with the
    patient attributes a scanner's converter writes."""
    buffer = io.BytesIO()
    nc = netcdf_file(buffer, "w")
    zyx = np.transpose(volume, (2, 1, 0)).astype(np.int16)
    for name, length in zip(("zspace", "yspace", "xspace"), zyx.shape, strict=True):
        nc.createDimension(name, length)
        axis = nc.createVariable(name, "d", ())
        axis.step, axis.start = 1.0, 0.0
        axis.spacing, axis.alignment = b"regular__", b"centre"
    image = nc.createVariable("image", "h", ("zspace", "yspace", "xspace"))
    image[:] = zyx
    image.signtype = b"signed__"
    image.valid_range = np.array([zyx.min(), zyx.max()], float)
    nc.createVariable("image-max", "d", ())[...] = float(zyx.max())
    nc.createVariable("image-min", "d", ())[...] = float(zyx.min())
    record = nc.createVariable("patient", "i", ())
    for key, value in (patient or {}).items():
        setattr(record, key, value.encode())
    nc.history = f"dicom_to_minc /scans/{(patient or {}).get('full_name', 'x')}/t1".encode()
    nc.flush()
    return buffer.getvalue()


def minc2_bytes(volume: np.ndarray, patient: dict[str, str] | None = None) -> bytes:
    """A MINC 2 (HDF5) file of an (x, y, z) volume in the layout of nibabel's MINC 2 test files
    (`minc2_1_scale.mnc`: `minc-2.0/dimensions`, `image/0` with its min and max, `info/patient`),
    stored z, y, x, with the patient attributes and history a scanner's converter writes. nibabel
    reads MINC 2 but does not write it, so h5py writes it here."""
    import h5py

    zyx = np.transpose(volume, (2, 1, 0)).astype(np.int16)
    standard = {"varid": b"MINC standard variable", "version": b"MINC Version    1.0"}
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as out:
        root = out.create_group("minc-2.0")
        root.attrs["history"] = np.bytes_(
            f"Thu Nov 14 13:30:45 2013>>> dcm2mnc /scans/{(patient or {}).get('full_name', 'x')}/t1")
        root.attrs["ident"] = np.bytes_("scanner-console:2013.11.14.13.30.45:69605:1")
        root.attrs["minc_version"] = np.bytes_("2.1.20")
        for axis, (name, length) in enumerate(zip(("xspace", "yspace", "zspace"),
                                                  volume.shape, strict=True)):
            dim = out.create_dataset(f"minc-2.0/dimensions/{name}", data=np.int32(0))
            cosines = np.zeros(3)
            cosines[axis] = 1.0
            for key, value in {**standard, "alignment": b"centre", "spacing": b"regular__",
                               "units": b"mm", "vartype": b"dimension____",
                               "comments": f"{name[0].upper()} increases along the scan".encode(),
                               "length": np.uint32(length), "start": np.float64(0.0),
                               "step": np.float64(1.0), "direction_cosines": cosines}.items():
                dim.attrs[key] = np.bytes_(value) if isinstance(value, bytes) else value
        image = out.create_dataset("minc-2.0/image/0/image", data=zyx, chunks=zyx.shape,
                                   compression="gzip")
        for key, value in {**standard, "dimorder": b"zspace,yspace,xspace",
                           "vartype": b"group________", "complete": b"true_"}.items():
            image.attrs[key] = np.bytes_(value)
        image.attrs["valid_range"] = np.array([zyx.min(), zyx.max()], float)
        for name, value in (("image-max", zyx.max()), ("image-min", zyx.min())):
            extreme = out.create_dataset(f"minc-2.0/image/0/{name}", data=np.float64(value))
            for key, text in {**standard, "vartype": b"var_attribute"}.items():
                extreme.attrs[key] = np.bytes_(text)
        record = out.create_dataset("minc-2.0/info/patient", data=np.int32(0))
        for key, value in {**standard, "vartype": b"group________", **{
                k: v.encode() for k, v in (patient or {}).items()}}.items():
            record.attrs[key] = np.bytes_(value)
    return buffer.getvalue()


def anatomical_volume() -> np.ndarray:
    return np.asanyarray(nib.load(ANATOMICAL).dataobj)


def analyze_pair(volume: np.ndarray, nifti: bool = False) -> tuple[bytes, bytes]:
    """(.hdr, .img) of an Analyze 7.5 pair (or a NIfTI-1 pair), with a planted name in the
    header's free text."""
    klass = nib.Nifti1Pair if nifti else nib.AnalyzeImage
    img = klass(volume, np.eye(4))
    img.header["descrip"] = PLANTED_NAME.encode()
    header, image = io.BytesIO(), io.BytesIO()
    img.to_file_map({"header": nib.FileHolder(fileobj=header),
                     "image": nib.FileHolder(fileobj=image)})
    return header.getvalue(), image.getvalue()


def png_with_text(pixels: np.ndarray) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("PatientName", PLANTED_NAME)
    info.add_text("Comment", f"exported for {PLANTED_NAME}", zip=True)
    info.add_itxt("Author", PLANTED_NAME, lang="en")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def jpeg_with_metadata(pixels: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x010E] = f"MR of {PLANTED_NAME}"  # ImageDescription
    exif[0x013B] = PLANTED_NAME  # Artist
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, exif=exif.tobytes(),
                                 comment=PLANTED_NAME.encode())
    return buffer.getvalue()


def mr_spectroscopy_dicom() -> bytes:
    ds = pydicom.dcmread(MR_SMALL)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.2"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return dicom_bytes(ds)


def nifti_mrs() -> bytes:
    img = nib.Nifti2Image(anatomical_volume(), np.eye(4))
    img.header["intent_name"] = b"mrs_v0_2"
    return img.to_bytes()


def anatomical_u8() -> np.ndarray:
    volume = anatomical_volume()[:, :, 12].astype(np.float32)
    return np.kron(np.clip(volume / volume.max() * 255, 0, 255).astype(np.uint8),
                   np.ones((2, 2), np.uint8))


@dataclass(frozen=True)
class SiteCase:
    """One landed object: its key below the wave, and either its `ok` slice count or the
    fragment its quarantine reason must contain (lower case)."""

    key: str
    ok_slices: int | None = None
    quarantined_slices: int = 0
    reason: str | None = None


def write_site_exports(folder: Path) -> list[SiteCase]:
    """One file or pair per case below `folder`; what each must give after landing and decoding."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = anatomical_volume()
    files: dict[str, bytes] = {
        "mosaic/dwi.dcm": dicom_bytes(mosaic_dataset()),
        "anon/export.dcm": anonymised_export(),
        "gz/mr_small.dcm.gz": gzip.compress(MR_SMALL.read_bytes(), mtime=0),
        "gz/siemens_dwi_1000.dcm.gz": SIEMENS_DWI.read_bytes(),
        "gz/bomb.dcm.gz": gzip_bomb(1024),
        "nifti1/anatomical.nii": ANATOMICAL.read_bytes(),
        "nifti2/anatomical.nii.gz": gzip.compress(
            nib.Nifti2Image(volume[::-1], np.eye(4)).to_bytes(), mtime=0),
        "mgh/anatomical.mgz": gzip.compress(
            nib.MGHImage(volume.astype(np.float32), np.eye(4)).to_bytes(), mtime=0),
        "minc1/anatomical.mnc": minc1_bytes(volume, {"full_name": PLANTED_NAME,
                                                     "identification": PLANTED_ID,
                                                     "birthdate": PLANTED_BIRTH}),
        "minc2/anatomical.mnc": minc2_bytes(volume[::-1, ::-1], {"full_name": PLANTED_NAME,
                                                                "identification": PLANTED_ID,
                                                                "birthdate": PLANTED_BIRTH}),
        "minc2/minc2_4d.mnc": (NIBABEL_DATA / "minc2_4d.mnc").read_bytes(),
        "parrec/phantom_EPI_asc_CLEAR_2_1.PAR":
            (NIBABEL_DATA / "phantom_EPI_asc_CLEAR_2_1.PAR").read_bytes(),
        "parrec/phantom_EPI_asc_CLEAR_2_1.REC":
            (NIBABEL_DATA / "phantom_EPI_asc_CLEAR_2_1.REC").read_bytes(),
        "afni/example4d+orig.HEAD": (NIBABEL_DATA / "example4d+orig.HEAD").read_bytes(),
        "afni/example4d+orig.BRIK.gz": (NIBABEL_DATA / "example4d+orig.BRIK.gz").read_bytes(),
        "alone/analyze.hdr": (NIBABEL_DATA / "analyze.hdr").read_bytes(),
        "alone/phantom_varscale.REC": (NIBABEL_DATA / "phantom_varscale.REC").read_bytes(),
        "cifti/row_major.dconn.nii": (NIBABEL_DATA / "row_major.dconn.nii").read_bytes(),
        "gifti/ascii.gii": (GIFTI_DATA / "ascii.gii").read_bytes(),
        "tracts/simple.trk": (NIBABEL_DATA / "simple.trk").read_bytes(),
        "tracts/simple.tck": (NIBABEL_DATA / "simple.tck").read_bytes(),
        "pet/tinypet.v": (NIBABEL_DATA / "tinypet.v").read_bytes(),
        "mrs/svs.dcm": mr_spectroscopy_dicom(),
        "mrs/svs.nii": nifti_mrs(),
        "viewer/slice.png": png_with_text(anatomical_u8()),
        "viewer/slice.jpg": jpeg_with_metadata(anatomical_u8()),
    }
    # each format its own variant of the volume, so no slice is a duplicate of another format's
    files["analyze/anatomical.hdr"], files["analyze/anatomical.img"] = analyze_pair(
        volume[:, ::-1])
    files["niftipair/anatomical.hdr"], files["niftipair/anatomical.img"] = analyze_pair(
        volume + 1, nifti=True)
    for relative, payload in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(payload)
    return [
        SiteCase("mosaic/dwi.dcm", ok_slices=48),
        SiteCase("anon/export.dcm", ok_slices=1),
        SiteCase("gz/mr_small.dcm.gz", ok_slices=1),
        SiteCase("gz/siemens_dwi_1000.dcm.gz", quarantined_slices=48, reason="constant slice"),
        SiteCase("gz/bomb.dcm.gz", reason="gzip stream unpacks to more than"),
        SiteCase("nifti1/anatomical.nii", ok_slices=25),
        SiteCase("nifti2/anatomical.nii.gz", ok_slices=25),
        SiteCase("mgh/anatomical.mgz", ok_slices=25),
        SiteCase("minc1/anatomical.mnc", ok_slices=25),
        SiteCase("minc2/anatomical.mnc", ok_slices=25),
        SiteCase("minc2/minc2_4d.mnc", reason="minc slice is 20x20 px"),  # read; too small
        SiteCase("parrec/phantom_EPI_asc_CLEAR_2_1.PAR", ok_slices=27),
        SiteCase("afni/example4d+orig.HEAD", ok_slices=75),
        SiteCase("analyze/anatomical.hdr", ok_slices=25),
        SiteCase("niftipair/anatomical.hdr", ok_slices=25),
        SiteCase("alone/analyze.hdr", reason="header file without its partner (alone/analyze.img"),
        SiteCase("alone/phantom_varscale.REC",
                 reason="image file without its partner (alone/phantom_varscale.par"),
        SiteCase("cifti/row_major.dconn.nii", reason="cifti-2"),
        SiteCase("gifti/ascii.gii", reason="gifti surface"),
        SiteCase("tracts/simple.trk", reason="trackvis .trk tractography"),
        SiteCase("tracts/simple.tck", reason="mrtrix .tck tractography"),
        SiteCase("pet/tinypet.v", reason="ecat 7 pet"),
        SiteCase("mrs/svs.dcm", reason="mr spectroscopy"),
        SiteCase("mrs/svs.nii", reason="mr spectroscopy"),
        SiteCase("viewer/slice.png", ok_slices=1),
        SiteCase("viewer/slice.jpg", ok_slices=1),
    ]
