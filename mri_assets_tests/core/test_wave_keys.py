"""`core.wave_keys`: the layout table of docs/internals.md, built and taken apart in one place."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mri_assets.core import wave_keys as keys

INTERNALS = Path(__file__).resolve().parents[2] / "docs" / "internals.md"

# Every key builder of a wave, with the arguments it takes.
BUILDERS = [
    lambda w: keys.raw_key(w, "site/a.dcm"),
    keys.landing_marker_key,
    keys.landing_listing_key,
    lambda w: keys.staged_pixels_key(w, 3),
    lambda w: keys.slice_keys(w, 3)[0],
    lambda w: keys.slice_keys(w, 3)[1],
    keys.manifest_key,
    keys.layout_key,
    keys.backbone_record_key,
    keys.backbone_key,
    lambda w: keys.embeddings_key(w, 3),
    keys.pca_key,
    keys.clusters_key,
    keys.checkpoint_key,
    keys.baseline_key,
    keys.truth_key,
]


def documented_keys() -> list[str]:
    """The keys of the object-store table of docs/internals.md, for wave `pilot` and shard 3."""
    section = INTERNALS.read_text().split("## Object-store keys", 1)[1].split("\n## ", 1)[0]
    found = []
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        for key in re.findall(r"`([a-z_]+/[^`]*)`", row.split(" | ")[0]):
            if not key.endswith("..."):
                found.append(key.replace("{wave}", "pilot").replace("{ss}", "03"))
    return found


def test_every_key_of_the_documented_layout_comes_from_a_builder():
    built = {builder("pilot") for builder in BUILDERS}
    documented = documented_keys()
    assert len(documented) >= 10, documented
    assert [key for key in documented if key not in built] == []


@pytest.mark.parametrize("wave", ["pilot", "full.1", "site-b_2"])
def test_every_key_names_its_own_wave_back(wave: str):
    assert [keys.wave_of_key(builder(wave)) for builder in BUILDERS] == [wave] * len(BUILDERS)


def test_a_wave_whose_name_extends_another_keeps_its_own_keys():
    assert keys.wave_of_key(keys.pca_key("pilot.2")) == "pilot.2"
    assert keys.wave_of_key(keys.backbone_record_key("pilot.json")) == "pilot.json"


@pytest.mark.parametrize("key", [
    "dvc-remote/files/md5/ab/cdef", "mlflow/artifacts/1/abc/artifacts/pilot/model.pt",
    "dagster-io/storage/manifest/pilot", "models/pca/.npz", "models/other/pilot.npz",
    "models/pca/pilot.pt", "raw/pilot", "labels.csv", ".scratch/pilot/x",
])
def test_a_key_outside_the_layout_belongs_to_no_wave(key: str):
    assert keys.wave_of_key(key) is None


def test_only_the_marker_at_the_top_of_a_landing_marks_it():
    assert keys.is_landing_marker(keys.landing_marker_key("pilot"))
    assert not keys.is_landing_marker("raw/pilot/site/_READY")
    assert not keys.is_landing_marker("staging/pilot/_READY")


def test_the_raw_prefix_refuses_a_wave_no_partition_can_carry():
    with pytest.raises(keys.WaveKeyError, match="invalid wave key"):
        keys.raw_prefix("Pilot/../x")


def test_bytes_count_under_the_wave_of_their_key_and_the_rest_under_nothing():
    objects = [(keys.manifest_key("pilot"), 10), (keys.pca_key("pilot"), 5),
               (keys.embeddings_key("epi", 0), 7), (keys.manifest_key("unlisted"), 100),
               ("dvc-remote/files/md5/ab/cd", 1000), ("raw/epi/pilot/a.dcm", 3)]
    assert keys.bytes_by_wave(objects, ["pilot", "epi"]) == {"pilot": 15, "epi": 10, "": 1100}


def test_wave_prefixes_cover_every_builder():
    for builder in BUILDERS:
        key = builder("pilot")
        assert any(key.startswith(prefix) for prefix in keys.wave_prefixes("pilot")), key
