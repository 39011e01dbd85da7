"""The two instance files: the top-level dagster.yaml (`make dev`, DAGSTER_HOME = the repository)
sends every record to MRI_ASSETS_HOME through `env:` settings, and holds the same settings as the
home template that `mri-assets` copies (deploy/local/dagster.yaml)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import yaml

REPO = Path(__file__).resolve().parents[1]
ROUTED = ("storage", "local_artifact_storage", "compute_logs")


def test_the_top_level_file_routes_every_record_to_the_home_and_shares_the_settings(
        tmp_path, monkeypatch):
    top = yaml.safe_load((REPO / "dagster.yaml").read_text())
    template = yaml.safe_load((REPO / "deploy" / "local" / "dagster.yaml").read_text())
    assert {k: v for k, v in top.items() if k not in ROUTED} == template
    assert top["nux"] == {"enabled": False} and top["telemetry"] == {"enabled": False}

    home = tmp_path / "home" / "dagster"
    monkeypatch.setenv("MRI_ASSETS_DAGSTER_DIR", str(home))
    monkeypatch.setenv("MRI_ASSETS_DAGSTER_LOGS", str(home / "storage"))
    before = sorted(p.name for p in REPO.iterdir())
    with dg.DagsterInstance.from_config(str(REPO)) as instance:
        assert not instance.nux_enabled
        assert instance.storage_directory() == str(home / "storage")
        assert instance.run_coordinator._dequeue_interval_seconds == 1
        instance.add_dynamic_partitions("waves", ["w1"])
    with dg.DagsterInstance.from_config(str(REPO)) as again:
        assert again.get_dynamic_partitions("waves") == ["w1"]
    assert (home / "history").is_dir()
    assert sorted(p.name for p in REPO.iterdir()) == before
