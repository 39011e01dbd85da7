import io

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword

from mri_assets.core.deid import (
    EMPTY_KEYWORDS,
    PHI_KEYWORDS,
    REMOVED_KEYWORDS,
    deidentify_dicom,
    is_dicom,
    remapped_uid,
)
from mri_assets.core.imaging import UnreadableImage
from mri_assets_tests.core.bad_inputs import MR_SMALL, PYDICOM_FILES, png_bytes

PLANTED = {
    "PatientName": "Testpatient^Planted42",
    "PatientID": "PLANTED-ID-4242",
    "PatientBirthDate": "19470312",
    "InstitutionName": "Planted Test Clinic Northside",
    "ReferringPhysicianName": "Testdoctor^Plantedref",
    "AccessionNumber": "PLANTEDACC77",
    "OtherPatientIDs": "PLANTED-OTHER-99",
    "PatientAddress": "1 Planted Road, Testtown",
}

_PLANTED_VALUE_BY_VR = {
    "DA": "19470312",
    "TM": "101112",
    "DT": "19470312101112",
    "PN": "Planted^Person",
    "AS": "077Y",
    "DS": "71.5",
    "IS": "3",
    "CS": "PLANTED",
    "UI": "1.2.826.0.1.3680043.9.9999.1",
    "US": 3,
}


def _dicom_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _planted_slice(instance: int) -> bytes:
    ds = pydicom.dcmread(MR_SMALL)
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{instance}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = instance
    ds.add_new(0x00091010, "LO", "PLANTED-PRIVATE-VALUE")
    ds.add_new(0x60004000, "LT", "PLANTED-OVERLAY-COMMENT")
    return _dicom_bytes(ds)


def test_planted_name_id_and_birth_date_are_absent_from_the_output_bytes():
    out = deidentify_dicom(_planted_slice(1), "pseudo-0001")
    for value in PLANTED.values():
        assert value.encode() not in out
    assert b"PLANTED-PRIVATE-VALUE" not in out
    assert b"PLANTED-OVERLAY-COMMENT" not in out


def test_patient_name_and_id_become_the_pseudonym_and_identity_removed_is_recorded():
    ds = pydicom.dcmread(io.BytesIO(deidentify_dicom(_planted_slice(1), "pseudo-0001")))
    assert str(ds.PatientName) == "pseudo-0001" and ds.PatientID == "pseudo-0001"
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethod
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"


def test_every_phi_keyword_is_removed_blanked_or_pseudonymised():
    ds = pydicom.dcmread(MR_SMALL)
    planted_keywords = []
    for keyword in PHI_KEYWORDS:
        vr = dictionary_VR(tag_for_keyword(keyword))
        if vr in ("SQ", "UI"):
            continue
        setattr(ds, keyword, _PLANTED_VALUE_BY_VR.get(vr, "PLANTED VALUE"))
        planted_keywords.append(keyword)
    cleaned = pydicom.dcmread(io.BytesIO(deidentify_dicom(_dicom_bytes(ds), "pseudo-7")))
    for keyword in planted_keywords:
        if keyword in REMOVED_KEYWORDS:
            assert keyword not in cleaned, keyword
        elif keyword in EMPTY_KEYWORDS:
            assert cleaned.data_element(keyword).value in ("", None), keyword
        else:
            assert str(cleaned.data_element(keyword).value) == "pseudo-7", keyword


def test_sex_is_blanked_and_age_removed_as_the_basic_profile_says():
    ds = pydicom.dcmread(MR_SMALL)
    ds.PatientAge = "044Y"
    cleaned = pydicom.dcmread(io.BytesIO(deidentify_dicom(_dicom_bytes(ds), "p")))
    assert cleaned.PatientSex == ""
    assert "PatientAge" not in cleaned and "PatientWeight" not in cleaned


def test_uids_are_remapped_consistently_across_a_series():
    first_in = pydicom.dcmread(io.BytesIO(_planted_slice(1)))
    first = pydicom.dcmread(io.BytesIO(deidentify_dicom(_planted_slice(1), "pseudo-0001")))
    second = pydicom.dcmread(io.BytesIO(deidentify_dicom(_planted_slice(2), "pseudo-0001")))
    assert (
        first.StudyInstanceUID == second.StudyInstanceUID == remapped_uid(first_in.StudyInstanceUID)
    )
    assert first.SeriesInstanceUID == second.SeriesInstanceUID != first_in.SeriesInstanceUID
    assert first.FrameOfReferenceUID == second.FrameOfReferenceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.SOPInstanceUID == first.file_meta.MediaStorageSOPInstanceUID
    assert first.SOPClassUID == first_in.SOPClassUID
    assert first_in.StudyInstanceUID.encode() not in deidentify_dicom(
        _planted_slice(1), "pseudo-0001"
    )


def test_deidentification_is_deterministic_and_depends_on_the_pseudonym():
    data = _planted_slice(1)
    assert deidentify_dicom(data, "pseudo-1") == deidentify_dicom(data, "pseudo-1")
    assert deidentify_dicom(data, "pseudo-1") != deidentify_dicom(data, "pseudo-2")


@pytest.mark.parametrize(
    "variant",
    [
        "MR_small.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_RLE.dcm",
        "image_dfl.dcm",
    ],
)
def test_pixels_and_transfer_syntax_survive_deidentification(variant):
    data = (PYDICOM_FILES / variant).read_bytes()
    before = pydicom.dcmread(io.BytesIO(data))
    after = pydicom.dcmread(io.BytesIO(deidentify_dicom(data, "p")))
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    np.testing.assert_array_equal(after.pixel_array, before.pixel_array)
    assert str(before.PatientName).encode() not in deidentify_dicom(data, "p")


def test_non_dicom_bytes_come_back_unchanged():
    png = png_bytes(np.zeros((40, 40), np.uint8))
    assert not is_dicom(png)
    assert deidentify_dicom(png, "p") is png
    assert is_dicom(MR_SMALL.read_bytes())


@pytest.mark.parametrize("cut", [200, 400, 800, 1200, 2000])
def test_cut_off_dicom_never_passes_planted_phi_on(cut):
    broken = _planted_slice(1)[:cut] + b"\xff" * 7
    try:
        out = deidentify_dicom(broken, "p")
    except UnreadableImage as exc:
        assert exc.reason
        return
    for value in PLANTED.values():
        assert value.encode() not in out
