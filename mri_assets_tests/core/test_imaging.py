import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import DeflatedExplicitVRLittleEndian

from mri_assets.core.imaging import (
    UnreadableImage,
    detect_format,
    normalize_to_uint8,
    process_object,
    resize_to_square,
)
from mri_assets_tests.core.bad_inputs import (
    MR_SMALL,
    PYDICOM_FILES,
    jpeg_bytes,
    mr_small_pixels,
    nifti_bytes,
    png_bytes,
    write_bad_inputs,
    write_partly_bad_inputs,
)

NIBABEL_DATA = Path(nib.__file__).resolve().parent / "tests" / "data"
DECODABLE_MR_SMALL_VARIANTS = (
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_implicit.dcm",
    "MR_small_padded.dcm",
)


def _expected_u8(values: np.ndarray, low_pct=0.5, high_pct=99.5) -> np.ndarray:
    low, high = np.percentile(values.astype(np.float64), (low_pct, high_pct))
    return np.clip((values.astype(np.float64) - low) * 255.0 / (high - low) + 0.5, 0, 255).astype(
        np.uint8
    )


def _mr_small_reference():
    return process_object(MR_SMALL.read_bytes(), "MR_small.dcm")


def test_png_8bit_is_windowed_per_image_and_resized_to_256():
    scan = mr_small_pixels()
    scan_u8 = (scan.astype(np.float64) / scan.max() * 255).astype(np.uint8)
    result = process_object(png_bytes(scan_u8), "raw/pilot/patient-1/a.png")
    assert result.format == "png"
    assert len(result.slices) == 1 and result.quarantined_slices == ()
    only = result.slices[0]
    assert only.pixels.shape == (256, 256) and only.pixels.dtype == np.uint8
    assert (only.height, only.width) == scan_u8.shape
    assert (only.window_low, only.window_high) == tuple(np.percentile(scan_u8, (0.5, 99.5)))
    np.testing.assert_array_equal(only.pixels, resize_to_square(_expected_u8(scan_u8), 256))
    assert "per image" in result.normalization and "0.5/99.5" in result.normalization


def test_png_16bit_keeps_full_depth_and_exact_percentile_window():
    scan16 = (mr_small_pixels().astype(np.uint16) * 16).astype(np.uint16)
    result = process_object(png_bytes(scan16), "scan16.png")
    only = result.slices[0]
    low, high = np.percentile(scan16, (0.5, 99.5))
    assert only.window_low == pytest.approx(low) and only.window_high == pytest.approx(high)
    assert only.window_high > 255
    np.testing.assert_array_equal(only.pixels, resize_to_square(_expected_u8(scan16), 256))


def test_jpeg_decodes_close_to_its_source():
    scan = mr_small_pixels()
    scan_u8 = (scan.astype(np.float64) / scan.max() * 255).astype(np.uint8)
    result = process_object(jpeg_bytes(scan_u8), "slice.jpeg")
    assert result.format == "jpeg"
    decoded = result.slices[0].pixels.astype(np.float64)
    expected = resize_to_square(_expected_u8(scan_u8), 256).astype(np.float64)
    assert np.corrcoef(decoded.ravel(), expected.ravel())[0, 1] > 0.97


@pytest.mark.parametrize("variant", DECODABLE_MR_SMALL_VARIANTS)
def test_every_uncompressed_and_rle_dicom_variant_decodes_to_the_same_pixels(variant):
    reference = _mr_small_reference()
    result = process_object((PYDICOM_FILES / variant).read_bytes(), variant)
    assert result.format == "dicom"
    assert result.patient_id == "4MR1"
    assert result.slices[0].pixel_sha256 == reference.slices[0].pixel_sha256
    np.testing.assert_array_equal(result.slices[0].pixels, reference.slices[0].pixels)


def test_jpeg2000_lossless_dicom_decodes_to_the_uncompressed_pixels_when_a_decoder_is_installed():
    data = (PYDICOM_FILES / "MR_small_jp2klossless.dcm").read_bytes()
    tsuid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
    if get_decoder(tsuid).is_available:
        assert (
            process_object(data, "jp2k.dcm").slices[0].pixel_sha256
            == _mr_small_reference().slices[0].pixel_sha256
        )
    else:
        with pytest.raises(UnreadableImage, match="no decoder installed"):
            process_object(data, "jp2k.dcm")


def test_jpeg_ls_dicom_without_decoder_is_unreadable_with_the_missing_decoder_named():
    data = (PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm").read_bytes()
    tsuid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
    if get_decoder(tsuid).is_available:
        assert (
            process_object(data, "jls.dcm").slices[0].pixel_sha256
            == _mr_small_reference().slices[0].pixel_sha256
        )
    else:
        with pytest.raises(UnreadableImage) as info:
            process_object(data, "jls.dcm")
        assert "JPEG-LS" in info.value.reason
        assert "pylibjpeg" in info.value.reason


def test_deflated_dicom_decodes_to_the_uncompressed_pixels():
    ds = pydicom.dcmread(MR_SMALL)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    result = process_object(buffer.getvalue(), "deflated.dcm")
    assert result.slices[0].pixel_sha256 == _mr_small_reference().slices[0].pixel_sha256
    # pydicom's own deflated file is a secondary capture (OT): its deflated header is read, and
    # it is refused for what it is, even where OT is allowed
    with pytest.raises(UnreadableImage, match="secondary capture"):
        process_object((PYDICOM_FILES / "image_dfl.dcm").read_bytes(), "image_dfl.dcm",
                       modalities=("MR", "OT"))


def test_dicom_without_extension_is_detected_from_its_preamble():
    data = MR_SMALL.read_bytes()
    assert detect_format(data) == "dicom"
    result = process_object(data, "raw/pilot/patient-7/IM000001")
    assert result.format == "dicom" and len(result.slices) == 1


def test_multiframe_dicom_gives_one_slice_per_frame_with_one_volume_window():
    ds = pydicom.dcmread(MR_SMALL)
    frame = ds.pixel_array
    frames = np.stack([frame, frame[::-1], frame[:, ::-1] // 2]).astype(np.int16)
    ds.NumberOfFrames = len(frames)
    ds.PixelData = frames.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    result = process_object(buffer.getvalue(), "multiframe.dcm")
    assert [s.slice_index for s in result.slices] == [0, 1, 2]
    assert len({(s.window_low, s.window_high) for s in result.slices}) == 1
    low, high = np.percentile(frames, (0.5, 99.5))
    assert result.slices[0].window_low == pytest.approx(low) and result.slices[
        0
    ].window_high == pytest.approx(high)
    assert len({s.pixel_sha256 for s in result.slices}) == 3
    assert "per volume" in result.normalization
    assert result.slices[2].pixels.mean() < result.slices[0].pixels.mean()


def test_nifti_3d_gives_every_slice_along_the_last_axis_with_a_volume_window():
    data = (NIBABEL_DATA / "anatomical.nii").read_bytes()
    volume = np.asanyarray(nib.load(NIBABEL_DATA / "anatomical.nii").dataobj)
    result = process_object(data, "anatomical.nii")
    assert result.format == "nifti"
    assert [s.slice_index for s in result.slices] == list(range(volume.shape[2]))
    low, high = np.percentile(volume, (0.5, 99.5))
    assert len({(s.window_low, s.window_high) for s in result.slices}) == 1
    assert (result.slices[0].window_low, result.slices[0].window_high) == (
        pytest.approx(low),
        pytest.approx(high),
    )
    assert {(s.height, s.width) for s in result.slices} == {(volume.shape[1], volume.shape[0])}


def test_nifti_uses_the_header_slice_dim_when_set():
    volume = np.random.default_rng(1).integers(0, 1000, size=(36, 40, 44)).astype(np.int16)
    result = process_object(nifti_bytes(volume, slice_dim=0), "vol.nii")
    assert len(result.slices) == 36
    assert (result.slices[0].height, result.slices[0].width) == (44, 40)


def test_nifti_4d_gives_slices_of_every_volume_in_volume_major_order():
    path = NIBABEL_DATA / "example4d.nii.gz"
    data4d = np.asanyarray(nib.load(path).dataobj)
    result = process_object(path.read_bytes(), "example4d.nii.gz")
    n_z, n_t = data4d.shape[2], data4d.shape[3]
    assert len(result.slices) == n_z * n_t
    second_volume = process_object(nifti_bytes(np.ascontiguousarray(data4d[..., 1])), "second.nii")
    assert [s.pixel_sha256 for s in result.slices[n_z:]] == [
        s.pixel_sha256 for s in second_volume.slices
    ]


def test_nii_gz_and_nii_of_the_same_volume_give_identical_slices():
    volume = np.asanyarray(nib.load(NIBABEL_DATA / "anatomical.nii").dataobj).astype(np.int16)
    plain = process_object(nifti_bytes(volume), "a.nii")
    packed = process_object(nifti_bytes(volume, gz=True), "a.nii.gz")
    assert [s.pixel_sha256 for s in plain.slices] == [s.pixel_sha256 for s in packed.slices]
    for a, b in zip(plain.slices, packed.slices):
        np.testing.assert_array_equal(a.pixels, b.pixels)


def test_every_bad_input_kind_is_unreadable_with_its_reason(tmp_path):
    bad_inputs = write_bad_inputs(tmp_path)
    assert len({b.kind for b in bad_inputs}) == len(bad_inputs)
    for bad in bad_inputs:
        with pytest.raises(UnreadableImage) as info:
            process_object((tmp_path / bad.relative_path).read_bytes(), bad.relative_path)
        assert bad.reason_fragment in info.value.reason.lower(), (bad.kind, info.value.reason)


def test_wrong_extension_reason_names_both_formats():
    with pytest.raises(UnreadableImage) as info:
        process_object(MR_SMALL.read_bytes(), "looks_like.png")
    assert "png" in info.value.reason and "dicom" in info.value.reason


def test_nan_inf_and_constant_slices_are_quarantined_not_raised(tmp_path):
    for partly_bad in write_partly_bad_inputs(tmp_path):
        result = process_object(
            (tmp_path / partly_bad.relative_path).read_bytes(), partly_bad.relative_path
        )
        quarantined = dict(result.quarantined_slices)
        assert set(quarantined) == set(partly_bad.bad_slice_reasons)
        for index, fragment in partly_bad.bad_slice_reasons.items():
            assert fragment in quarantined[index]
        kept = [s.slice_index for s in result.slices]
        assert sorted(kept + list(quarantined)) == list(range(partly_bad.n_slices))


def test_volume_window_ignores_non_finite_values(tmp_path):
    partly_bad = write_partly_bad_inputs(tmp_path)[0]
    result = process_object(
        (tmp_path / partly_bad.relative_path).read_bytes(), partly_bad.relative_path
    )
    assert all(np.isfinite([s.window_low, s.window_high]).all() for s in result.slices)
    assert all(s.pixels.max() > 0 for s in result.slices)


@pytest.mark.parametrize(
    ("dtype", "lowest", "highest", "shape"),
    [
        ("int16", -1000, 3000, (200, 210)),
        ("uint16", 0, 60000, (300, 300)),
        ("uint8", 3, 250, (33, 35)),
        ("int16", -1000, 3000, (20, 21)),
    ],
)
def test_integer_window_equals_float_percentiles(dtype, lowest, highest, shape):
    values = np.random.default_rng(3).integers(lowest, highest, size=shape).astype(dtype)
    u8_int, low_int, high_int = normalize_to_uint8(values, 1.0, 99.0)
    u8_float, low_float, high_float = normalize_to_uint8(values.astype(np.float64), 1.0, 99.0)
    assert (low_int, high_int) == (pytest.approx(low_float), pytest.approx(high_float))
    assert (low_int, high_int) == tuple(
        pytest.approx(v) for v in np.percentile(values, (1.0, 99.0))
    )
    assert np.abs(u8_int.astype(int) - u8_float.astype(int)).max() <= 1


def test_resize_to_square_keeps_aspect_and_centres_with_zero_padding():
    tall = np.full((128, 64), 200, np.uint8)
    square = resize_to_square(tall, 256)
    assert square.shape == (256, 256)
    columns_with_content = np.flatnonzero(square.max(axis=0))
    assert columns_with_content[0] == 64 and columns_with_content[-1] == 191
    assert square[:, :64].max() == 0 and square[:, 192:].max() == 0
