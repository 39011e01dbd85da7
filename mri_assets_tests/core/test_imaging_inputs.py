"""Only MRI in: real non-MR DICOM refused with its modality named, legacy DICOM without preamble
read and de-identified, JPEG-LS / JPEG 2000 MR equal to their uncompressed twin, FreeSurfer MGH."""

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from mri_assets.core.deid import deidentify_dicom, read_withheld, withheld_record
from mri_assets.core.imaging import UnreadableImage, detect_format, process_object
from mri_assets_tests.core.bad_inputs import MR_SMALL, PYDICOM_FILES

NIBABEL_DATA = Path(nib.__file__).resolve().parent / "tests" / "data"
LEGACY_PHI = {
    "PatientName": "Legacyarchive^Plantedname",
    "PatientID": "LEGACY-PLANTED-7731",
    "PatientBirthDate": "19380517",
    "InstitutionName": "Planted Legacy Infirmary",
}

# real files shipped by pydicom, none of them MR: (file, modality)
NON_MR = [
    ("CT_small.dcm", "CT"),
    ("examples_ybr_color.dcm", "US"),
    ("examples_jpeg2k.dcm", "US"),
    ("examples_palette.dcm", "US"),
    ("SC_rgb_jpeg.dcm", "OT"),
    ("liver_1frame.dcm", "SEG"),
    ("JPEG2000.dcm", "NM"),
    ("rtdose.dcm", "RTDOSE"),
    ("reportsi.dcm", "SR"),
]


def legacy_dicom(phi: dict[str, str] | None = None, implicit: bool = True) -> bytes:
    """MR_small.dcm written as old archives do: no 128-byte preamble, no file meta."""
    ds = pydicom.dcmread(MR_SMALL)
    for keyword, value in (phi or {}).items():
        setattr(ds, keyword, value)
    del ds.file_meta
    ds.preamble = None
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    data = buffer.getvalue()
    assert data[128:132] != b"DICM" and data[:2] == b"\x08\x00"
    return data


def _reference():
    return process_object(MR_SMALL.read_bytes(), "MR_small.dcm")


@pytest.mark.parametrize(("name", "modality"), NON_MR)
def test_non_mr_dicom_is_refused_with_its_modality_named_and_what_to_do(name, modality):
    with pytest.raises(UnreadableImage) as info:
        process_object((PYDICOM_FILES / name).read_bytes(), name)
    reason = info.value.reason
    assert f"modality {modality} is not MR" in reason
    assert "leave it out of the wave" in reason and "ingest.allowed_modalities" in reason


def test_a_listed_modality_is_ingested():
    ct = (PYDICOM_FILES / "CT_small.dcm").read_bytes()
    result = process_object(ct, "CT_small.dcm", modalities=("MR", "CT"))
    assert len(result.slices) == 1 and result.slices[0].pixels.shape == (256, 256)


def test_dicom_without_modality_is_refused():
    ds = pydicom.dcmread(MR_SMALL)
    del ds.Modality
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(UnreadableImage, match=r"names no Modality \(0008,0060\)"):
        process_object(buffer.getvalue(), "x.dcm")


def test_burned_in_annotation_is_refused():
    ds = pydicom.dcmread(MR_SMALL)
    ds.BurnedInAnnotation = "YES"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(UnreadableImage, match="BurnedInAnnotation is YES"):
        process_object(buffer.getvalue(), "x.dcm")


@pytest.mark.parametrize("twin", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_lossless_compressed_mr_equals_its_uncompressed_twin(twin):
    compressed = (PYDICOM_FILES / twin).read_bytes()
    assert pydicom.dcmread(io.BytesIO(compressed)).file_meta.TransferSyntaxUID.is_compressed
    result, reference = process_object(compressed, twin), _reference()
    assert result.slices[0].pixel_sha256 == reference.slices[0].pixel_sha256
    np.testing.assert_array_equal(result.slices[0].pixels, reference.slices[0].pixels)


@pytest.mark.parametrize("implicit", [True, False])
def test_legacy_dicom_without_preamble_is_detected_and_decodes_like_its_twin(implicit):
    data = legacy_dicom(implicit=implicit)
    assert detect_format(data) == "dicom"
    result = process_object(data, "old/IM0001")  # archives often use no extension at all
    assert result.format == "dicom" and result.patient_id == "4MR1"
    assert result.slices[0].pixel_sha256 == _reference().slices[0].pixel_sha256


def test_legacy_dicom_is_deidentified_and_still_decodes():
    data = legacy_dicom(LEGACY_PHI)
    for value in LEGACY_PHI.values():
        assert value.encode() in data
    clean = deidentify_dicom(data, "pseudonym-1")
    for value in LEGACY_PHI.values():
        assert value.encode() not in clean
    assert clean != data and detect_format(clean) == "dicom"
    decoded = process_object(clean, "IM0001.dcm")
    assert decoded.patient_id == "pseudonym-1"
    assert decoded.slices[0].pixel_sha256 == _reference().slices[0].pixel_sha256


def test_identifier_copied_into_an_unlisted_element_stops_deidentification():
    ds = pydicom.dcmread(MR_SMALL)
    ds.PatientName = "Copiedinto^Plantedname"
    ds.DerivationDescription = "made from Copiedinto^Plantedname's first series"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(UnreadableImage, match="de-identification left 1 patient identifier"):
        deidentify_dicom(buffer.getvalue(), "p")


def test_text_and_random_bytes_are_not_taken_for_legacy_dicom():
    assert detect_format(b"Patient: Somebody, born 1938\n" * 20) is None
    assert detect_format(np.random.default_rng(0).bytes(4096)) is None


def test_withheld_record_keeps_hash_and_reason_never_the_bytes():
    secret = b"Legacyarchive^Plantedname report" * 10
    record = withheld_record(secret, "cannot be de-identified")
    assert secret not in record and b"Plantedname" not in record
    parsed = read_withheld(record)
    assert parsed["size"] == len(secret) and parsed["reason"] == "cannot be de-identified"
    assert read_withheld(secret) is None and detect_format(record) is None


def _mgh_and_nifti_of(volume: np.ndarray, affine: np.ndarray) -> tuple[bytes, bytes]:
    mgh = nib.freesurfer.mghformat.MGHImage(volume, affine).to_bytes()
    nifti = nib.Nifti1Image(volume, affine)
    nifti.header.set_dim_info(slice=2)
    return mgh, nifti.to_bytes()


def test_mgz_and_mgh_volumes_give_the_slices_of_the_same_nifti():
    source = nib.load(NIBABEL_DATA / "example4d.nii.gz")  # 128 x 96 x 24 x 2, shipped by nibabel
    volume = np.asanyarray(source.dataobj)[..., 0]
    mgh, nifti = _mgh_and_nifti_of(volume, source.affine)
    expected = process_object(nifti, "volume.nii")
    for name, data in (("volume.mgz", gzip.compress(mgh, mtime=0)), ("volume.mgh", mgh)):
        assert detect_format(data) == "mgh"
        result = process_object(data, name)
        assert result.format == "mgh" and len(result.slices) == volume.shape[2] == 24
        assert [s.pixel_sha256 for s in result.slices] == [s.pixel_sha256 for s in expected.slices]
        np.testing.assert_array_equal(result.slices[5].pixels, expected.slices[5].pixels)


def test_truncated_mgz_is_unreadable_with_what_to_do():
    source = nib.load(NIBABEL_DATA / "example4d.nii.gz")
    mgh, _ = _mgh_and_nifti_of(np.asanyarray(source.dataobj)[..., 0], source.affine)
    with pytest.raises(UnreadableImage, match="re-export"):
        process_object(gzip.compress(mgh, mtime=0)[:2000], "cut.mgz")


@pytest.mark.parametrize("wrapped", [False, True])
def test_nifti_free_text_and_extensions_are_blanked_and_the_voxels_kept(wrapped):
    from mri_assets.core.deid import deidentify_nifti

    volume = np.asanyarray(nib.load(NIBABEL_DATA / "anatomical.nii").dataobj)
    img = nib.Nifti1Image(volume, np.eye(4))
    img.header["descrip"] = LEGACY_PHI["PatientName"].encode()
    img.header["aux_file"] = b"LEGACY-PLANTED"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(
        "comment", f"converted from {LEGACY_PHI['PatientID']}, born {LEGACY_PHI['PatientBirthDate']}"
        .encode()))
    data = img.to_bytes()
    data = gzip.compress(data, mtime=0) if wrapped else data
    clean = deidentify_nifti(data)
    plain = gzip.decompress(clean) if wrapped else clean
    for value in (*LEGACY_PHI.values(), "LEGACY-PLANTED"):
        assert value.encode() not in plain
    name = "v.nii.gz" if wrapped else "v.nii"
    before, after = process_object(data, name), process_object(clean, name)
    assert [s.pixel_sha256 for s in after.slices] == [s.pixel_sha256 for s in before.slices]
    plain_volume = nib.Nifti1Image(volume, np.eye(4)).to_bytes()
    assert deidentify_nifti(plain_volume) is plain_volume  # nothing to blank: the same bytes
