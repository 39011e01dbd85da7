import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from mri_assets.core.home import MriHome
from mri_assets.definitions import build_defs
from mri_assets.definitions.executors import ProfileError


@pytest.mark.parametrize("profile", ["local", "celery", "k8s"])
def test_every_profile_builds_definitions_with_the_same_assets(profile, tmp_path, monkeypatch):
    monkeypatch.setenv("MRI_ASSETS_S3_BUCKET", "mri-assets-test")
    defs = build_defs(profile, MriHome(tmp_path))
    graph = defs.resolve_asset_graph()
    local_keys = build_defs("local", MriHome(tmp_path)).resolve_asset_graph().get_all_asset_keys()
    assert graph.get_all_asset_keys() == local_keys
    assert dg.AssetKey("manifest") in local_keys
    defs.resolve_all_job_defs()
    assert defs.resolve_sensor_def("wave_sensor") is not None


def test_an_unknown_profile_is_refused_with_the_allowed_names(tmp_path):
    with pytest.raises(ProfileError, match="local, celery, k8s"):
        build_defs("kubernetes", MriHome(tmp_path))


def test_the_code_location_loads_without_torch_mlflow_matplotlib_or_scipy(tmp_path):
    """Every Dagster run worker imports the code location before its first step; the libraries
    only some steps use (torch and torchvision, MLflow, matplotlib, scipy.spatial) wait for the
    step that calls them: a run of `slices` or `clusters` never imports torch."""
    late = ("torch", "torchvision", "mlflow", "matplotlib", "scipy")
    probe = ("import sys, mri_assets.definitions; "
             f"print(' '.join(m for m in {late!r} if m in sys.modules))")
    env = {**os.environ, "MRI_ASSETS_HOME": str(tmp_path)}
    loaded = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                            text=True, check=True, timeout=300).stdout.split()
    assert loaded == [], f"importing the code location imported {loaded}"


def test_the_cli_instance_and_runs_point_at_the_checkout_wherever_the_modules_live(tmp_path):
    """`mri-assets` sets up HOME/dagster with the repo's local instance settings, and records its
    runs with the checkout as the code location's working directory (as workspace.yaml does)."""
    from mri_assets.core.home import MriHome
    from mri_assets.definitions.local_run import REPO_DAGSTER_YAML, dagster_instance
    from mri_assets.definitions.location_runs import WORKING_DIRECTORY

    repo = Path(__file__).resolve().parents[1]
    assert REPO_DAGSTER_YAML == repo / "deploy" / "local" / "dagster.yaml"
    assert REPO_DAGSTER_YAML.is_file()
    assert Path(WORKING_DIRECTORY) == repo and (repo / "workspace.yaml").is_file()
    home = MriHome(tmp_path / "home")
    dagster_instance(home, recover=False).dispose()
    assert (home.dagster / "dagster.yaml").read_bytes() == REPO_DAGSTER_YAML.read_bytes()
