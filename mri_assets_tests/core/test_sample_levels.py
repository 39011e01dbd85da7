"""The harder class set of the sample data (`levels=True`): anatomical levels in labels.csv."""

import csv
import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mri_assets.core.sample_data import (
    CLASSES,
    LEVEL_CLASSES,
    anatomical_level,
    build_sample_data,
)
from mri_assets.core.sample_labels import read_sample_labels

N_SLICES = 80
SEED = 5


def _rows(summary) -> list[dict[str, str]]:
    with summary.labels_csv.open() as handle:
        return list(csv.DictReader(handle))


def _image_digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "labels.csv"
    }


@pytest.fixture(scope="module")
def waves(tmp_path_factory):
    plain = build_sample_data(tmp_path_factory.mktemp("plain"), N_SLICES, SEED, "t1_new_site")
    with_levels = build_sample_data(tmp_path_factory.mktemp("levels"), N_SLICES, SEED,
                                    "t1_new_site", levels=True)
    return plain, with_levels


def test_levels_change_no_image_and_no_orientation_label(waves):
    plain, with_levels = waves
    assert _image_digests(plain.out_dir) == _image_digests(with_levels.out_dir)
    before, after = _rows(plain), _rows(with_levels)
    assert list(after[0]) == ["relative_path", "slice_index", "label", "level"]
    assert [(r["relative_path"], r["slice_index"], r["label"]) for r in after] == \
        [(r["relative_path"], r["slice_index"], r["label"]) for r in before]


def test_every_level_agrees_with_its_orientation_label(waves):
    _, with_levels = waves
    allowed = {
        "axial_inferior": {"axial_1", "axial_2", "axial_3"},
        "axial_superior": {"axial_4", "axial_5", "axial_6"},
        "coronal": {"coronal_1", "coronal_2", "coronal_3", "coronal_4"},
        "sagittal": {"sagittal_lateral", "sagittal_intermediate", "sagittal_medial"},
    }
    rows = _rows(with_levels)
    assert {r["label"] for r in rows} == set(CLASSES)
    for row in rows:
        assert row["level"] in allowed[row["label"]], row
    # more levels than orientation classes occur: not four classes renamed
    assert len({r["level"] for r in rows}) >= 10


def test_level_follows_the_position_within_the_heads_extent():
    foreground = np.zeros((40, 50, 60), dtype=bool)
    foreground[5:35, 10:40, 20:60] = True  # axial usable range 20..59, coronal 10..39
    assert anatomical_level(foreground, "axial", 20) == "axial_1"
    assert anatomical_level(foreground, "axial", 39) == "axial_3"
    assert anatomical_level(foreground, "axial", 59) == "axial_6"
    assert anatomical_level(foreground, "coronal", 10) == "coronal_1"
    assert anatomical_level(foreground, "coronal", 25) == "coronal_3"
    assert anatomical_level(foreground, "coronal", 39) == "coronal_4"
    assert anatomical_level(foreground, "sagittal", 5) == "sagittal_lateral"
    assert anatomical_level(foreground, "sagittal", 11) == "sagittal_intermediate"
    assert anatomical_level(foreground, "sagittal", 20) == "sagittal_medial"
    assert anatomical_level(foreground, "sagittal", 34) == "sagittal_lateral"
    with pytest.raises(ValueError, match="orientation"):
        anatomical_level(foreground, "oblique", 3)


def test_reading_the_level_column(waves):
    plain, with_levels = waves
    levels = read_sample_labels(with_levels.labels_csv, "level")
    assert levels.columns == ["relative_path", "slice_index", "label"]
    assert set(levels["label"]) <= set(LEVEL_CLASSES)
    assert read_sample_labels(plain.labels_csv)["label"].to_list() == \
        pl.read_csv(plain.labels_csv)["label"].to_list()
    with pytest.raises(ValueError, match="sample-data --levels"):
        read_sample_labels(plain.labels_csv, "level")
