"""The Dagster command line against the code location, in subprocesses, as a person types it.

Every `--select` goes through Dagster's asset-selection parser, generated with ANTLR 4.13. With
the 4.9 runtime that DVC's hydra-core/omegaconf pin, each one fails with `TypeError: ord()
expected string of length 1, but int found` (ATNDeserializer); that is why DVC lives in its own
environment (`.venv-dvc`) and never in this one.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
MODULE = ["-m", "mri_assets.definitions"]
COMMAND_TIMEOUT_S = 600


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """A fresh MRI_ASSETS_HOME and DAGSTER_HOME (its `dagster/` folder), local profile."""
    home = tmp_path / "home"
    (home / "dagster").mkdir(parents=True)
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("MRI_ASSETS_S3_", "MLFLOW_TRACKING_URI", "MRI_ASSETS_LABELS_URL"))
    }
    env.update(
        MRI_ASSETS_HOME=str(home),
        DAGSTER_HOME=str(home / "dagster"),
        MRI_ASSETS_PROFILE="local",
        DVC_NO_ANALYTICS="1",
    )
    return env


def _run(command: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run `command`; its stdout, or a failure that shows what it printed."""
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=COMMAND_TIMEOUT_S, check=False)
    output = f"$ {' '.join(command)}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert "ord() expected string of length 1" not in output, (
        "the ANTLR runtime conflict is back (antlr4-python3-runtime 4.9 in this environment, "
        "most likely pulled in by DVC/hydra-core):\n" + output[-4000:]
    )
    assert result.returncode == 0, output[-6000:]
    return result.stdout


def test_this_environment_has_the_antlr_runtime_dagster_needs_and_no_dvc():
    assert importlib.metadata.version("antlr4-python3-runtime").startswith("4.13."), (
        "Dagster's selection parser needs antlr4-python3-runtime 4.13; run `make install`"
    )
    assert importlib.util.find_spec("dvc") is None, (
        "DVC belongs in .venv-dvc (`make dvc-env`), not in the project's environment"
    )


@pytest.mark.slow
def test_asset_list_honours_select(cli_env: dict[str, str], tmp_path: Path):
    listed = {
        selection: _run([str(BIN / "dagster"), "asset", "list", *MODULE, "--select", selection],
                        cli_env, tmp_path).split()
        for selection in ("clusters", "key:clusters", "+clusters")
    }
    everything = set(_run([str(BIN / "dagster"), "asset", "list", *MODULE], cli_env, tmp_path).split())

    assert listed["clusters"] == ["clusters"]
    assert listed["key:clusters"] == ["clusters"]
    assert "clusters" in listed["+clusters"]
    assert 1 < len(listed["+clusters"]) < len(everything)
    assert set(listed["+clusters"]) <= everything


@pytest.mark.slow
def test_asset_materialize_selects_the_manifest_of_a_landed_wave(
    cli_env: dict[str, str], tmp_path: Path
):
    home = Path(cli_env["MRI_ASSETS_HOME"])
    sample = tmp_path / "sample"
    mri_assets = str(BIN / "mri-assets")
    _run([mri_assets, "sample-data", "--out", str(sample), "--slices", "40", "--seed", "0"],
         cli_env, tmp_path)
    _run([mri_assets, "ingest-wave", "cli", "--source", str(sample)], cli_env, tmp_path)

    _run([str(BIN / "dagster"), "asset", "materialize", *MODULE, "--select", "manifest",
          "--partition", "cli"], cli_env, tmp_path)

    import dagster as dg

    instance = dg.DagsterInstance.from_config(cli_env["DAGSTER_HOME"])
    try:
        event = instance.get_latest_materialization_event(dg.AssetKey("manifest"))
    finally:
        instance.dispose()
    assert event is not None and event.dagster_event.partition == "cli"
    assert (home / "store" / "manifests" / "cli" / "manifest.parquet").is_file()
