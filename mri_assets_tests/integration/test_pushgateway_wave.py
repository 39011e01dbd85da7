"""A real wave materialized with PUSHGATEWAY_URL set; the series are read back from Debian's
`prometheus-pushgateway` over HTTP.

The wave is landed with `mri-assets ingest-wave` and its pushing assets materialized with
`materialize_wave`, each in a subprocess with 2 shards (the shard count is read when
`mri_assets.assets.support.partitions` is imported).
"""

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import polars as pl
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mri_assets.core.costs import Caps
from mri_assets.core.sample_data import build_sample_data
from mri_assets.resources.label_store import LabelStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WAVE = "w1"
PUSHING_ASSETS = ("manifest", "slices", "gpu_budget", "embeddings", "pca_model", "clusters",
                  "labeling_queue", "wave_costs")
MATERIALIZE_PUSHING_ASSETS = f"""
import dagster as dg
from mri_assets.definitions import build_defs
from mri_assets.deployment import Deployment
from mri_assets.definitions.local_run import dagster_instance, materialize_wave

defs = build_defs("local")
wanted = {{dg.AssetKey(name) for name in {PUSHING_ASSETS!r}}}
subset = dg.Definitions(assets=[a for a in defs.assets if set(a.keys) <= wanted],
                        resources=defs.resources)
report = materialize_wave(subset, dagster_instance(Deployment.from_env().home), {WAVE!r})
assert report.success, report.failed
"""


def _cli(home: Path, gateway: str, *args: str) -> None:
    env = {**os.environ, "MRI_ASSETS_HOME": str(home), "MRI_ASSETS_SHARDS": "2",
           "DVC_NO_ANALYTICS": "1", "PUSHGATEWAY_URL": gateway}
    result = subprocess.run([sys.executable, *args], env=env,
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _pushed(gateway: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"{gateway}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("mri_assets_")
        for sample in family.samples
    }


def _value(series: dict, name: str, **labels: str) -> float:
    matches = [v for (n, found), v in series.items() if n == name and set(labels.items()) <= found]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} series in {sorted(series)}"
    return matches[0]


@pytest.fixture(scope="module")
def pushed_wave(tmp_path_factory, pushgateway_url):
    sample = tmp_path_factory.mktemp("sample")
    build_sample_data(sample, n_slices=60, seed=0, wave_style="t1")
    home = tmp_path_factory.mktemp("home")
    _cli(home, pushgateway_url, "-m", "mri_assets.cli", "ingest-wave", WAVE, "--source", str(sample))
    _cli(home, pushgateway_url, "-c", MATERIALIZE_PUSHING_ASSETS)
    return home, _pushed(pushgateway_url)


def test_manifest_pushes_slices_ingested_and_quarantined(pushed_wave):
    home, series = pushed_wave
    manifest = pl.read_parquet(home / "store" / "manifests" / WAVE / "manifest.parquet")
    quarantined = manifest.filter(pl.col("status") == "quarantined").height
    assert quarantined > 0
    assert _value(series, "mri_assets_quarantined_slices", job="manifest", wave=WAVE) == quarantined
    assert (_value(series, "mri_assets_slices_ingested", job="manifest", wave=WAVE)
            == manifest.height - quarantined)


def test_every_embedding_shard_pushes_its_throughput(pushed_wave):
    _, series = pushed_wave
    for shard in ("00", "01"):
        labels = {"job": "embeddings", "wave": WAVE, "shard": shard, "stage": "embedding"}
        per_second = _value(series, "mri_assets_images_per_second", **labels)
        ms = _value(series, "mri_assets_ms_per_image", **labels)
        assert per_second > 0
        assert per_second * ms / 1000 == pytest.approx(1.0)


def test_labeling_queue_pushes_the_queue_size_in_the_label_store(pushed_wave):
    home, series = pushed_wave
    store = LabelStore(url=f"sqlite:///{home / 'labels.db'}")
    queued = store.stats()["queue_size"]
    store.dispose()
    assert queued > 0
    assert _value(series, "mri_assets_queue_size", job="labeling_queue", wave=WAVE, queue="labeling") == queued


def test_wave_costs_pushes_spend_caps_and_budget_left(pushed_wave):
    _, series = pushed_wave
    caps = Caps()
    spend = {
        category: _value(series, "mri_assets_spend_euros", job="wave_costs", wave=WAVE, category=category)
        for category in ("compute", "storage", "labeling")
    }
    assert spend["compute"] > 0
    assert _value(series, "mri_assets_cap_euros", job="wave_costs", wave=WAVE, category="compute") == caps.compute_eur
    assert _value(series, "mri_assets_cap_euros", job="wave_costs", wave=WAVE, category="total") == caps.usable_eur
    assert (_value(series, "mri_assets_budget_left_euros", job="wave_costs", wave=WAVE)
            == pytest.approx(caps.usable_eur - sum(spend.values())))
