"""Files as sites export them, decoded: Siemens mosaics unpacked, anonymised exports de-identified,
gzip looked through with a bound, every nibabel volume format, non-images refused by reason,
research-header free text and PNG/JPEG metadata removed."""

import gzip
import io
import sys
import time
import warnings

import h5py
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from mri_assets.core.deid import deidentify_dicom, is_placeholder
from mri_assets.core.header_deid import (
    deidentify_afni_head,
    deidentify_analyze_header,
    deidentify_minc,
    deidentify_minc1,
    deidentify_minc2,
    deidentify_par,
)
from mri_assets.core.image_metadata import scrub_jpeg, scrub_png
from mri_assets.core.imaging import UnreadableImage, _decode_dicom, detect_format, process_object
from mri_assets.core.volume_formats import PairedFiles, pack_pair, read_minc
from mri_assets_tests.core.bad_inputs import MR_SMALL
from mri_assets_tests.core.site_exports import (
    NIBABEL_DATA,
    NICOM_DATA,
    PHILIPS_MPRAGE,
    PLANTED_BIRTH,
    PLANTED_ID,
    PLANTED_NAME,
    SIEMENS_DWI,
    analyze_pair,
    anatomical_u8,
    anatomical_volume,
    anonymised_export,
    dicom_bytes,
    epi_padded,
    gzip_bomb,
    jpeg_with_metadata,
    minc1_bytes,
    minc2_bytes,
    mosaic_dataset,
    png_with_text,
)


def _nibabel_mosaic_reference(ds) -> np.ndarray:
    """nibabel's own unpacking of a MOSAIC (dicomwrappers), as (slices, rows, columns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom import dicomwrappers

        data = dicomwrappers.wrapper_from_data(ds).get_data()
    return np.moveaxis(data, 2, 0)


# ---- Siemens MOSAIC ---------------------------------------------------------------------------

def test_a_mosaic_becomes_its_48_slices_matching_nibabels_unpacking():
    ds = mosaic_dataset()
    data = dicom_bytes(ds)
    stack = _decode_dicom(data).stack
    reference = _nibabel_mosaic_reference(pydicom.dcmread(io.BytesIO(data)))
    assert stack.shape == (48, 128, 128)
    assert np.array_equal(stack, reference.transpose(0, 2, 1)) or np.array_equal(stack, reference)
    np.testing.assert_array_equal(stack, epi_padded())
    result = process_object(data, "dwi.dcm")
    assert [s.slice_index for s in result.slices] == list(range(48))
    assert {(s.height, s.width) for s in result.slices} == {(128, 128)}
    assert len({s.pixel_sha256 for s in result.slices}) == 48 and not result.quarantined_slices


def test_the_mosaic_count_survives_deidentification_and_the_csa_header_does_not():
    data = dicom_bytes(mosaic_dataset())
    clean = deidentify_dicom(data, "pseudo-1")
    landed = pydicom.dcmread(io.BytesIO(clean))
    assert (0x0029, 0x1010) not in landed and (0x0029, 0x1020) not in landed  # CSA headers gone
    assert len(process_object(clean, "dwi.dcm").slices) == 48


def test_a_mosaic_whose_count_cannot_be_read_is_quarantined_naming_the_mosaic():
    ds = mosaic_dataset()
    ds.remove_private_tags()
    with pytest.raises(UnreadableImage, match="Siemens MOSAIC .* number of slices cannot be read"):
        process_object(dicom_bytes(ds), "dwi.dcm")


def test_a_mosaic_whose_count_does_not_fit_its_frame_is_quarantined():
    # nibabel's 0.dcm: a 256 px mosaic that says 48 slices (a 7 x 7 grid does not divide 256)
    with pytest.raises(UnreadableImage, match="MOSAIC of 48 slices cannot tile its 256x256"):
        process_object((NICOM_DATA / "0.dcm").read_bytes(), "0.dcm")


def test_a_mosaic_beyond_the_slice_bound_is_quarantined_saying_so():
    with pytest.raises(UnreadableImage, match="48 slices, more than the 40.*max_slices_per_object"):
        process_object(dicom_bytes(mosaic_dataset()), "dwi.dcm", max_slices=40)


# ---- anonymised exports -----------------------------------------------------------------------

@pytest.mark.parametrize("value", ["Anon", "ANONYMOUS", "anonymised^anonymised", "Unknown",
                                   "NONE", "n/a", "Removed", "19000101", "", "XXXX", "123",
                                   "0000", "12345", "123456", "pseudo-1"])
def test_placeholders_are_not_identifiers(value):
    assert is_placeholder(value, "pseudo-1")


@pytest.mark.parametrize("value", [PLANTED_NAME, PLANTED_ID, PLANTED_BIRTH, "Anonymous^Jane",
                                   "4MR1", "738164"])
def test_real_values_are_identifiers(value):
    assert not is_placeholder(value, "pseudo-1")


def test_an_anonymised_export_is_accepted_and_decodes():
    data = anonymised_export()
    clean = deidentify_dicom(data, "pseudo-1")
    decoded = process_object(clean, "export.dcm")
    assert decoded.patient_id == "pseudo-1" and len(decoded.slices) == 1


def test_a_real_name_copied_into_an_anonymised_export_is_still_withheld():
    data = anonymised_export(PatientName=PLANTED_NAME,
                             DerivationDescription=f"made from {PLANTED_NAME}'s series")
    with pytest.raises(UnreadableImage, match="de-identification left 1 patient identifier"):
        deidentify_dicom(data, "pseudo-1")


def test_a_name_that_only_matches_pixel_bytes_is_no_leak():
    ds = pydicom.dcmread(MR_SMALL)
    ds.PatientName = "Qzxw^Vbnm"
    ds.PixelData = ds.PixelData[:2000] + b"Qzxw^Vbnm\x00" + ds.PixelData[2010:]  # pixel bytes only
    clean = deidentify_dicom(dicom_bytes(ds), "p")
    assert b"Qzxw^Vbnm" in clean and process_object(clean, "x.dcm").slices
    ds.DerivationDescription = "Qzxw^Vbnm"  # and once in a header element: withheld
    with pytest.raises(UnreadableImage, match="left 1 patient identifier"):
        deidentify_dicom(dicom_bytes(ds), "p")


# ---- gzip -------------------------------------------------------------------------------------

def test_gzip_compressed_dicom_is_read_by_its_content():
    wrapped = gzip.compress(MR_SMALL.read_bytes(), mtime=0)
    assert detect_format(wrapped) == "dicom"
    plain = process_object(MR_SMALL.read_bytes(), "MR_small.dcm")
    result = process_object(wrapped, "MR_small.dcm.gz")
    assert [s.pixel_sha256 for s in result.slices] == [s.pixel_sha256 for s in plain.slices]


@pytest.mark.parametrize(("path", "frames"), [(SIEMENS_DWI, 48), (PHILIPS_MPRAGE, 176)])
def test_vendor_dcm_gz_files_are_read_frame_by_frame(path, frames):
    result = process_object(path.read_bytes(), path.name)
    # nibabel ships these two with their pixels zeroed: every slice is read, and is constant
    assert result.format == "dicom" and len(result.quarantined_slices) == frames
    assert all("constant slice" in reason for _, reason in result.quarantined_slices)


def test_a_gzip_bomb_is_refused_before_it_fills_the_memory():
    bomb = gzip_bomb(1024)
    assert len(bomb) < 2_000_000
    with pytest.raises(UnreadableImage, match="unpacks to more than 64 MiB"):
        process_object(bomb, "scan.dcm.gz", max_unpacked_bytes=64 * 2**20)


# ---- every nibabel volume format ----------------------------------------------------------------

def _pair(kind, header_name, header, image_name, image):
    return pack_pair(PairedFiles(kind, header_name, header, image_name, image))


def _nibabel_file(name):
    return (NIBABEL_DATA / name).read_bytes()


def test_every_nibabel_volume_format_reads_into_slices():
    volume = anatomical_volume()
    nifti2 = nib.Nifti2Image(volume, np.eye(4)).to_bytes()
    mgz = gzip.compress(nib.MGHImage(volume.astype(np.float32), np.eye(4)).to_bytes(), mtime=0)
    objects = {
        "anatomical.nii": (_nibabel_file("anatomical.nii"), "nifti", 25),
        "anatomical2.nii": (nifti2, "nifti", 25),
        "anatomical.mgz": (mgz, "mgh", 25),
        "anatomical.mnc": (minc1_bytes(volume), "minc", 25),
        "anatomical2.mnc": (minc2_bytes(volume), "minc", 25),
        "anatomical.hdr": (_pair("analyze", "anatomical.hdr", *analyze_pair(volume)[:1],
                                 "anatomical.img", analyze_pair(volume)[1]), "analyze", 25),
        "pair.hdr": (_pair("analyze", "pair.hdr", analyze_pair(volume, True)[0], "pair.img",
                           analyze_pair(volume, True)[1]), "nifti", 25),
        "phantom.PAR": (_pair("parrec", "phantom.PAR",
                              _nibabel_file("phantom_EPI_asc_CLEAR_2_1.PAR"), "phantom.REC",
                              _nibabel_file("phantom_EPI_asc_CLEAR_2_1.REC")), "parrec", 27),
        "example4d+orig.HEAD": (_pair("afni", "example4d+orig.HEAD",
                                      _nibabel_file("example4d+orig.HEAD"),
                                      "example4d+orig.BRIK.gz",
                                      _nibabel_file("example4d+orig.BRIK.gz")), "afni", 75),
        "scaled+tlrc.HEAD": (_pair("afni", "scaled+tlrc.HEAD", _nibabel_file("scaled+tlrc.HEAD"),
                                   "scaled+tlrc.BRIK", _nibabel_file("scaled+tlrc.BRIK")),
                             "afni", 43),
    }
    for name, (data, fmt, n_slices) in objects.items():
        result = process_object(data, name)
        assert (result.format, len(result.slices) + len(result.quarantined_slices)) == \
            (fmt, n_slices), name
        assert result.slices, name


def test_minc_reads_the_same_slices_as_nibabel_gives_for_its_volume():
    volume = anatomical_volume()
    minc = process_object(minc1_bytes(volume), "a.mnc")
    nifti = process_object(nib.Nifti1Image(volume.astype(np.float64), np.eye(4)).to_bytes(),
                           "a.nii")
    for ours, reference in zip(minc.slices, nifti.slices, strict=True):
        assert np.abs(ours.pixels.astype(int) - reference.pixels.astype(int)).max() <= 1


def test_four_d_volumes_give_every_volumes_slices_volume_major():
    data = _pair("parrec", "p.PAR", _nibabel_file("phantom_EPI_asc_CLEAR_2_1.PAR"), "p.REC",
                 _nibabel_file("phantom_EPI_asc_CLEAR_2_1.REC"))
    volume = np.asanyarray(nib.load(NIBABEL_DATA / "phantom_EPI_asc_CLEAR_2_1.PAR").dataobj)
    result = process_object(data, "p.PAR")
    assert volume.shape == (64, 64, 9, 3) and len(result.slices) == 27
    with pytest.raises(UnreadableImage, match="27 slices, more than the 20"):
        process_object(data, "p.PAR", max_slices=20)


MINC2_SHIPPED = ("minc2_4d.mnc", "minc2_1_scale.mnc", "minc2-no-att.mnc", "minc2-4d-d.mnc",
                 "small.mnc")


@pytest.mark.parametrize("name", MINC2_SHIPPED)
def test_minc2_from_memory_gives_the_voxels_nibabel_loads_from_its_file(name):
    """nibabel's Minc2Image opens only a file by name; ours reads the bytes (h5py file object)."""
    data = _nibabel_file(name)
    assert data.startswith(b"\x89HDF") and detect_format(data) == "minc"
    reference = nib.load(NIBABEL_DATA / name)
    assert isinstance(reference, nib.Minc2Image)
    expected = reference.get_fdata()
    assert np.array_equal(read_minc(data).voxels,
                          np.transpose(expected, tuple(reversed(range(expected.ndim)))))


def test_minc2_gives_the_slices_of_minc1_for_the_same_volume():
    volume = anatomical_volume()
    minc1, minc2 = process_object(minc1_bytes(volume), "a.mnc"), \
        process_object(minc2_bytes(volume), "b.mnc")
    assert (minc2.format, len(minc2.slices)) == ("minc", 25)
    assert [s.pixel_sha256 for s in minc2.slices] == [s.pixel_sha256 for s in minc1.slices]
    assert (minc2.slices[0].height, minc2.slices[0].width) == (41, 33)


def test_minc2_is_bounded_and_a_truncated_one_refused():
    data = minc2_bytes(anatomical_volume())
    with pytest.raises(UnreadableImage, match="25 slices, more than the 20"):
        process_object(data, "a.mnc", max_slices=20)
    with pytest.raises(UnreadableImage, match="unreadable or truncated MINC 2 volume"):
        process_object(data[: len(data) // 2], "a.mnc")


def test_minc2_without_h5py_is_refused_saying_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    with pytest.raises(UnreadableImage, match="h5py, which nibabel needs to read it, is not"):
        process_object(_nibabel_file("minc2_4d.mnc"), "minc2_4d.mnc")
    with pytest.raises(UnreadableImage, match="h5py"):
        deidentify_minc(_nibabel_file("minc2_4d.mnc"))


def test_a_header_without_its_partner_is_refused_naming_the_missing_file():
    with pytest.raises(UnreadableImage, match="without its partner .analyze.img or analyze.img.gz"):
        process_object(_nibabel_file("analyze.hdr"), "analyze.hdr")


# ---- non-images ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "reason"), [
    ("row_major.dconn.nii", "a CIFTI-2 file"),
    ("simple.trk", "TrackVis .trk tractography"),
    ("standard.trk", "TrackVis .trk tractography"),
    ("simple.tck", "MRtrix .tck tractography"),
    ("tinypet.v", "not MR: an ECAT 7 PET volume"),
])
def test_non_images_shipped_by_nibabel_are_refused_with_their_own_reason(name, reason):
    with pytest.raises(UnreadableImage, match=reason):
        process_object(_nibabel_file(name), name)


def test_gifti_and_spectroscopy_are_refused_with_their_own_reason():
    gifti = (NIBABEL_DATA.parent.parent / "gifti" / "tests" / "data" / "ascii.gii").read_bytes()
    with pytest.raises(UnreadableImage, match="GIFTI surface"):
        process_object(gifti, "ascii.gii")
    ds = pydicom.dcmread(MR_SMALL)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.2"
    with pytest.raises(UnreadableImage, match="MR spectroscopy"):
        process_object(dicom_bytes(ds), "svs.dcm")
    mrs = nib.Nifti2Image(anatomical_volume(), np.eye(4))
    mrs.header["intent_name"] = b"mrs_v0_2"
    with pytest.raises(UnreadableImage, match="MR spectroscopy"):
        process_object(mrs.to_bytes(), "svs.nii")


# ---- header free text and image metadata ---------------------------------------------------------

def test_minc_patient_attributes_and_history_are_blanked_and_the_voxels_kept():
    patient = {"full_name": PLANTED_NAME, "identification": PLANTED_ID, "birthdate": PLANTED_BIRTH}
    data = minc1_bytes(anatomical_volume(), patient)
    clean = deidentify_minc1(data)
    for value in patient.values():
        assert value.encode() in data and value.encode() not in clean
    assert len(clean) == len(data)
    before, after = process_object(data, "a.mnc"), process_object(clean, "a.mnc")
    assert [s.pixel_sha256 for s in before.slices] == [s.pixel_sha256 for s in after.slices]
    for name in ("minc1_4d.mnc", "tiny.mnc", "minc1_1_scale.mnc", "minc1-no-att.mnc"):
        shipped = _nibabel_file(name)
        assert len(deidentify_minc1(shipped)) == len(shipped)


def test_minc2_patient_record_history_and_ident_are_left_out_and_the_voxels_kept():
    patient = {"full_name": PLANTED_NAME, "identification": PLANTED_ID, "birthdate": PLANTED_BIRTH}
    data = minc2_bytes(anatomical_volume(), patient)
    clean = deidentify_minc(data)
    for value in (*patient.values(), "dcm2mnc", "scanner-console", "increases along the scan"):
        assert value.encode() in data and value.encode() not in clean, value
    with h5py.File(io.BytesIO(clean), "r") as handle:
        assert sorted(handle["minc-2.0"]) == ["dimensions", "image"]
        assert dict(handle["minc-2.0"].attrs) == {"minc_version": b"2.1.20"}
        assert handle["minc-2.0/image/0/image"].compression == "gzip"
    before, after = process_object(data, "a.mnc"), process_object(clean, "a.mnc")
    assert [s.pixel_sha256 for s in before.slices] == [s.pixel_sha256 for s in after.slices]
    assert deidentify_minc2(clean) is clean  # nothing left to leave out
    time.sleep(1.1)  # HDF5 would stamp copied objects with the second of the copy
    assert deidentify_minc2(data) == clean  # the same bytes every time (landing again copies nothing)
    shipped = _nibabel_file("minc2_1_scale.mnc")  # info/patient full_name, history, ident
    assert b"mnc2nii tiny.mnc tiny.nii" in shipped
    assert b"mnc2nii tiny.mnc tiny.nii" not in deidentify_minc2(shipped)


def test_par_afni_and_analyze_free_text_is_blanked():
    par = _nibabel_file("phantom_EPI_asc_CLEAR_2_1.PAR")
    assert b"Konvertertest" in par and b"2014.02.14" in par
    clean_par = deidentify_par(par)
    assert b"Konvertertest" not in clean_par and b"2014.02.14" not in clean_par
    assert b"phantom_EPI_asc_CLEAR" not in clean_par.split(b"\n. ")[0]  # the dataset path
    head = _nibabel_file("example4d+orig.HEAD")
    clean_head = deidentify_afni_head(head)
    assert b"Sun Oct  1 21:13:09 2017" in head and b"Sun Oct  1 21:13:09 2017" not in clean_head
    header, image = analyze_pair(anatomical_volume())
    assert PLANTED_NAME.encode() in header
    assert PLANTED_NAME.encode() not in deidentify_analyze_header(header)
    for kind, name, header_bytes, image_name, image_bytes, slices in (
        ("parrec", "p.PAR", clean_par, "p.REC", _nibabel_file("phantom_EPI_asc_CLEAR_2_1.REC"), 27),
        ("afni", "e+orig.HEAD", clean_head, "e+orig.BRIK.gz",
         _nibabel_file("example4d+orig.BRIK.gz"), 75),
        ("analyze", "a.hdr", deidentify_analyze_header(header), "a.img", image, 25),
    ):
        assert len(process_object(_pair(kind, name, header_bytes, image_name, image_bytes),
                                  name).slices) == slices


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_png_text_chunks_are_dropped_and_the_pixels_kept():
    data = png_with_text(anatomical_u8())
    assert PLANTED_NAME.encode() in data
    clean = scrub_png(data)
    assert PLANTED_NAME.encode() not in clean and b"tEXt" not in clean and b"iTXt" not in clean
    assert b"zTXt" not in clean
    np.testing.assert_array_equal(_pixels(clean), _pixels(data))
    plain = process_object(data, "a.png").slices[0].pixel_sha256
    assert process_object(clean, "a.png").slices[0].pixel_sha256 == plain


def test_jpeg_exif_and_comment_are_dropped_and_the_pixels_kept():
    data = jpeg_with_metadata(anatomical_u8())
    assert data.count(PLANTED_NAME.encode()) >= 2
    clean = scrub_jpeg(data)
    assert PLANTED_NAME.encode() not in clean and b"Exif" not in clean
    np.testing.assert_array_equal(_pixels(clean), _pixels(data))
    assert scrub_jpeg(clean) is clean and scrub_png(png_with_text(anatomical_u8())[:0]) == b""
