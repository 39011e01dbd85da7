"""The harder class set of the sample data (`levels=True`): anatomical levels in labels.csv."""

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mri_assets.core.sample_data import (
    CLASSES,
    LEVEL_CLASSES,
    SAGITTAL_BANDS,
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
        "axial_inferior": {f"axial_{n:02d}" for n in range(1, 6)},
        "axial_superior": {f"axial_{n:02d}" for n in range(6, 11)},
        "coronal": {f"coronal_{n:02d}" for n in range(1, 11)},
        "sagittal": set(SAGITTAL_BANDS),
    }
    assert set().union(*allowed.values()) == set(LEVEL_CLASSES)
    rows = _rows(with_levels)
    assert {r["label"] for r in rows} == set(CLASSES)
    for row in rows:
        assert row["level"] in allowed[row["label"]], row
    # more levels than orientation classes occur: not four classes renamed
    assert len({r["level"] for r in rows}) >= 10


def test_a_small_sample_carries_every_level(tmp_path):
    # 16 slices per group and class (`MAX_SLICES_PER_GROUP_AND_CLASS`) from 241 slices on: enough
    # positions per volume to reach every bin
    summary = build_sample_data(tmp_path, 300, seed=3, include_bad=False, levels=True)
    counts = Counter(row["level"] for row in _rows(summary))
    assert set(counts) == set(LEVEL_CLASSES), set(LEVEL_CLASSES) - set(counts)


def test_level_follows_the_position_within_the_heads_extent():
    foreground = np.zeros((61, 61, 71), dtype=bool)
    # usable ranges, each 50 positions wide: sagittal 5..55, coronal 5..55, axial 10..60
    foreground[5:56, 5:56, 10:61] = True
    axial = {10: "axial_01", 14: "axial_01", 15: "axial_02", 34: "axial_05", 35: "axial_06",
             54: "axial_09", 55: "axial_10", 60: "axial_10"}
    coronal = {5: "coronal_01", 9: "coronal_01", 10: "coronal_02", 30: "coronal_06",
               55: "coronal_10"}
    # the distance from the midline (30) in fifths of the half-range, either side alike
    sagittal = {30: "sagittal_medial", 34: "sagittal_medial", 35: "sagittal_paramedial",
                25: "sagittal_paramedial", 40: "sagittal_intermediate",
                46: "sagittal_lateral", 14: "sagittal_lateral",
                50: "sagittal_far_lateral", 55: "sagittal_far_lateral", 5: "sagittal_far_lateral"}
    for orientation, expected in (("axial", axial), ("coronal", coronal), ("sagittal", sagittal)):
        for position, level in expected.items():
            assert anatomical_level(foreground, orientation, position) == level, \
                (orientation, position)
    # every level is reached by some position, in the order of LEVEL_CLASSES along each axis
    reached = [anatomical_level(foreground, "axial", p) for p in range(10, 61)]
    reached += [anatomical_level(foreground, "coronal", p) for p in range(5, 56)]
    reached += [anatomical_level(foreground, "sagittal", p) for p in range(30, 56)]
    assert list(dict.fromkeys(reached)) == list(LEVEL_CLASSES)
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
