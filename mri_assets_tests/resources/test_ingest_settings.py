"""Configuration errors of the ingest settings and wave keys: one line naming the setting and
what it accepts."""

import pytest

from mri_assets.core.manifest import WaveKeyError, raw_prefix, validate_wave_key
from mri_assets.resources.settings import IngestSettings


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def test_a_300_character_wave_key_is_refused_before_any_path_is_made():
    with pytest.raises(WaveKeyError) as info:
        raw_prefix("a" * 300)
    assert "300 characters: at most 64" in _one_line(info.value)
    assert validate_wave_key("w" * 64) == "w" * 64


@pytest.mark.parametrize(("settings", "call", "names"), [
    ({"allowed_modalities": []}, "modalities", "ingest.allowed_modalities"),
    ({"allowed_modalities": ["MR", "not a code"]}, "modalities", "ingest.allowed_modalities"),
    ({"decode_workers": -2}, "workers", "ingest.decode_workers"),
    ({"max_slices_per_object": 0}, "max_slices", "ingest.max_slices_per_object"),
    ({"window_low_percentile": 99.0, "window_high_percentile": 1.0}, "window",
     "ingest.window_low_percentile"),
])
def test_bad_ingest_settings_name_the_setting_and_the_allowed_values(settings, call, names):
    with pytest.raises(ValueError) as info:
        getattr(IngestSettings(**settings), call)()
    assert names in _one_line(info.value)


def test_split_fractions_name_their_settings():
    with pytest.raises(ValueError) as info:
        IngestSettings(train_fraction=0.9).manifest_settings(4)
    assert "ingest.train_fraction" in _one_line(info.value)


def test_modalities_are_normalised():
    assert IngestSettings(allowed_modalities=["mr", " ct "]).modalities() == ("MR", "CT")
    assert IngestSettings().modalities() == ("MR",)
