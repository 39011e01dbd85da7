import csv
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy.stats import ks_2samp

from mri_assets.core.deid import deidentify_dicom
from mri_assets.core.imaging import UnreadableImage, process_object
from mri_assets.core.sample_data import CLASSES, FORMATS, build_sample_data, t2_like

N_SLICES = 80
SEED = 5


def _file_digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _labels(summary) -> list[dict[str, str]]:
    with summary.labels_csv.open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def t1_wave(tmp_path_factory):
    return build_sample_data(tmp_path_factory.mktemp("t1"), N_SLICES, SEED, wave_style="t1")


@pytest.fixture(scope="module")
def t1_wave_again(tmp_path_factory):
    return build_sample_data(tmp_path_factory.mktemp("t1_again"), N_SLICES, SEED, wave_style="t1")


@pytest.fixture(scope="module")
def epi_wave(tmp_path_factory):
    return build_sample_data(
        tmp_path_factory.mktemp("epi"), N_SLICES, SEED, wave_style="epi", include_bad=False
    )


def test_same_seed_writes_byte_identical_files(t1_wave, t1_wave_again):
    first, second = _file_digests(t1_wave.out_dir), _file_digests(t1_wave_again.out_dir)
    assert len(first) > N_SLICES // 2
    assert first == second


def test_last_bit_noise_before_quantisation_leaves_every_stored_integer_unchanged(
    t1_wave, tmp_path, monkeypatch
):
    """Another CPU's vector unit or BLAS moves the last bits of the float pipeline; model that
    as up to 4 ulp of noise (in the dtype the generator computes in) on every voxel before
    quantisation: not one stored byte may change. A float32 generator, or one that rounds
    without the coarse grid, fails this."""
    from mri_assets.core import sample_data

    exact = sample_data.augment_volume
    noise_rng = np.random.default_rng(2026)

    def with_last_bit_noise(unit, rng):
        volume, foreground = exact(unit, rng)
        ulps = noise_rng.integers(-4, 5, size=volume.shape).astype(volume.dtype)
        return volume * (1 + ulps * np.finfo(volume.dtype).eps), foreground

    monkeypatch.setattr(sample_data, "augment_volume", with_last_bit_noise)
    noisy = build_sample_data(tmp_path, N_SLICES, SEED, wave_style="t1")

    assert _file_digests(noisy.out_dir) == _file_digests(t1_wave.out_dir)


def test_different_seed_writes_different_files(t1_wave, tmp_path):
    other = build_sample_data(tmp_path, N_SLICES // 2, SEED + 1, wave_style="t1", include_bad=False)
    ours = {hashlib.sha256(path.read_bytes()).hexdigest() for path in t1_wave.image_paths}
    theirs = {hashlib.sha256(path.read_bytes()).hexdigest() for path in other.image_paths}
    assert ours and theirs
    assert not ours & theirs
    assert t1_wave.labels_csv.read_bytes() != other.labels_csv.read_bytes()


def test_slice_target_is_hit_and_classes_are_balanced(t1_wave):
    labels = _labels(t1_wave)
    assert abs(len(labels) - N_SLICES) <= 0.03 * N_SLICES
    counts = {label: sum(1 for row in labels if row["label"] == label) for label in CLASSES}
    assert counts == t1_wave.slices_per_class
    assert max(counts.values()) - min(counts.values()) <= 1


def test_every_format_is_written(t1_wave):
    assert all(t1_wave.files_per_format[fmt] > 0 for fmt in FORMATS)
    suffixes = {path.name.split(".", 1)[1] for path in t1_wave.image_paths}
    assert suffixes == {"nii.gz", "dcm", "png", "jpg"}


def test_labels_csv_rows_point_at_readable_slices(t1_wave):
    labels = _labels(t1_wave)
    assert list(labels[0]) == ["relative_path", "slice_index", "label"]
    by_file: dict[str, list[int]] = {}
    for row in labels:
        assert row["label"] in CLASSES
        by_file.setdefault(row["relative_path"], []).append(int(row["slice_index"]))
    assert set(by_file) == {
        path.relative_to(t1_wave.out_dir).as_posix() for path in t1_wave.image_paths
    }
    for relative_path, indices in by_file.items():
        result = process_object((t1_wave.out_dir / relative_path).read_bytes(), relative_path)
        assert set(indices) <= {s.slice_index for s in result.slices}, relative_path
        assert result.quarantined_slices == ()


def test_patient_folders_are_not_real_looking_names(t1_wave):
    folders = {path.relative_to(t1_wave.out_dir).parts[0] for path in t1_wave.image_paths}
    assert len(folders) == t1_wave.n_patients
    assert all(
        folder.startswith("patient-") and folder[len("patient-") :].isdigit() for folder in folders
    )


def test_dicom_slices_carry_planted_phi_that_deidentification_removes(t1_wave):
    dicom_path = next(path for path in t1_wave.image_paths if path.suffix == ".dcm")
    data = dicom_path.read_bytes()
    ds = pydicom.dcmread(dicom_path)
    assert str(ds.PatientName).startswith("Testpatient^Planted")
    assert ds.PatientID == dicom_path.relative_to(t1_wave.out_dir).parts[0]
    planted = [str(ds.PatientName), ds.PatientBirthDate, ds.InstitutionName]
    assert all(value.encode() in data for value in planted)
    cleaned = deidentify_dicom(data, "pseudo")
    assert all(value.encode() not in cleaned for value in planted)


def test_nifti_files_have_no_gzip_timestamp(t1_wave):
    for path in t1_wave.image_paths:
        if path.name.endswith(".nii.gz"):
            assert path.read_bytes()[4:8] == b"\x00\x00\x00\x00"


def test_bad_files_are_written_unreadable_and_not_labelled(t1_wave):
    labelled = {row["relative_path"] for row in _labels(t1_wave)}
    assert len(t1_wave.bad_paths) == 4
    for path in t1_wave.bad_paths:
        relative = path.relative_to(t1_wave.out_dir).as_posix()
        assert relative not in labelled
        with pytest.raises(UnreadableImage):
            process_object(path.read_bytes(), relative)


def test_epi_wave_has_a_shifted_distribution_from_t1(t1_wave, epi_wave):
    def relative_sharpness(summary) -> np.ndarray:
        values = []
        for path in summary.image_paths:
            for processed in process_object(path.read_bytes(), path.name).slices:
                pixels = processed.pixels.astype(np.float32)
                gradient = (
                    np.abs(np.diff(pixels, axis=0)).mean() + np.abs(np.diff(pixels, axis=1)).mean()
                )
                values.append(gradient / max(float(pixels.mean()), 1.0))
        return np.array(values)

    t1_values, epi_values = relative_sharpness(t1_wave), relative_sharpness(epi_wave)
    assert epi_values.mean() < t1_values.mean()
    assert ks_2samp(t1_values, epi_values).pvalue < 1e-4


def test_progress_bar_is_printed_when_asked(tmp_path, capsys):
    build_sample_data(tmp_path, 8, SEED, include_bad=False, progress=True)
    assert "sample data" in capsys.readouterr().err


def test_unknown_wave_style_is_refused_with_the_allowed_values(tmp_path):
    with pytest.raises(ValueError, match="t1"):
        build_sample_data(tmp_path, 40, SEED, wave_style="flair")


def test_t2_like_contrast_inverts_the_head_and_keeps_the_background():
    volume = np.array([[0.05, 0.2], [0.9, 1.2]])
    foreground = volume > 0.15
    np.testing.assert_allclose(t2_like(volume, foreground), [[0.05, 0.9], [0.2, 0.0]])


def test_a_new_site_wave_changes_about_half_of_the_patients(t1_wave, tmp_path):
    mixed = build_sample_data(tmp_path, N_SLICES, SEED, wave_style="t1_new_site", include_bad=False)
    assert {row["label"] for row in _labels(mixed)} == set(CLASSES)
    t1_digests, mixed_digests = _file_digests(t1_wave.out_dir), _file_digests(mixed.out_dir)
    same, changed = set(), set()
    for name, digest in mixed_digests.items():
        # Same seed, same source volume and augmentation per patient; DICOM files also carry
        # per-patient PHI drawn after the site, so only the other formats compare.
        if name.startswith("patient-") and not name.endswith(".dcm") and name in t1_digests:
            (same if digest == t1_digests[name] else changed).add(name.split("/")[0])
    assert same and changed and not same & changed, "some patients as before, others new-site"
    nifti = next(name for name in sorted(mixed_digests) if name.endswith(".nii.gz")
                 and name.split("/")[0] in changed and name in t1_digests)
    before = np.asanyarray(nib.load(t1_wave.out_dir / nifti).dataobj)
    after = np.asanyarray(nib.load(mixed.out_dir / nifti).dataobj)
    assert after.shape == (before.shape[1], before.shape[0], *before.shape[2:]), "rows and columns swapped"


def test_the_summary_a_person_reads_gives_counts_and_places_not_every_file(t1_wave):
    text = t1_wave.describe()
    assert text.splitlines()[0].startswith(f"{t1_wave.n_slices:,} slices of {t1_wave.n_patients:,} patients")
    assert str(t1_wave.labels_csv) in text
    assert all(name in text for name in t1_wave.slices_per_class)
    assert not any(str(path) in text for path in t1_wave.image_paths)
    assert len(text.splitlines()) <= 5
