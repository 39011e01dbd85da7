"""The deployment: read once from the environment, typed, frozen; bad values named in one line."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import dagster as dg
import pytest

from mri_assets.definitions.code_location import resources_for
from mri_assets.deployment import Deployment, DeploymentError, ProfileError, variables

REPO = Path(__file__).resolve().parents[1]


def readme_settings_variables() -> set[str]:
    """The variable names in the first column of the README's Settings table."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1]))
    return names


def test_readme_settings_table_lists_exactly_the_deployment_variables():
    assert readme_settings_variables() == set(variables())


@pytest.mark.parametrize("value", ["0", "-1", "abc", "2.5", "100000"])
def test_a_bad_shard_count_is_one_line_naming_the_variable_and_the_range(value, tmp_path):
    with pytest.raises(DeploymentError) as error:
        Deployment.from_env({"MRI_ASSETS_SHARDS": value}, home=tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"MRI_ASSETS_SHARDS={value!r}")
    assert "whole number from 1 to 1024" in message


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("MRI_ASSETS_PROFILE", "kubernetes", "local, celery, k8s"),
        ("MRI_ASSETS_DEVICE", "gpu", "auto, cpu, cuda"),
        ("MRI_ASSETS_TRIAGE_SHOW_PREDICTION", "maybe", "use 1 or 0"),
        ("MRI_ASSETS_BATCH_SIZE", "0", "from 1 to 65536"),
        ("MRI_ASSETS_K8S_IMAGE_PULL_POLICY", "Sometimes", "Always, IfNotPresent, Never"),
        ("MRI_ASSETS_DAGSTER_URL", "127.0.0.1:3000", "http(s) address"),
    ],
)
def test_bad_values_name_their_variable_and_what_is_allowed(variable, value, allowed, tmp_path):
    with pytest.raises(DeploymentError, match=re.escape(allowed)) as error:
        Deployment.from_env({variable: value}, home=tmp_path)
    assert variable in str(error.value) and "\n" not in str(error.value)


def test_an_unknown_profile_is_a_profile_error():
    with pytest.raises(ProfileError, match="MRI_ASSETS_PROFILE"):
        Deployment.from_env({"MRI_ASSETS_PROFILE": "kubernetes"})


def test_the_deployment_is_frozen_and_keeps_secrets_out_of_its_repr(tmp_path):
    deployment = Deployment.from_env(
        {"MRI_ASSETS_SALT": "s3cret-salt", "MRI_ASSETS_LABELS_URL": "postgresql://u:pw@db/labels"},
        home=tmp_path)
    assert "s3cret-salt" not in repr(deployment) and "pw@db" not in repr(deployment)
    assert deployment.labels_url_value == "postgresql://u:pw@db/labels"
    with pytest.raises(dataclasses.FrozenInstanceError):
        deployment.shards = 3  # type: ignore[misc]


def test_defaults_follow_the_home(tmp_path):
    deployment = Deployment.from_env({}, home=tmp_path)
    assert deployment.profile == "local" and deployment.shards == 16
    assert deployment.labels_url_value == f"sqlite:///{tmp_path / 'labels.db'}"
    assert deployment.dvc_remote == str(tmp_path / "dvc-remote")
    assert deployment.input_size == 128
    assert Deployment.from_env({"MRI_ASSETS_PROFILE": "celery"}, home=tmp_path).input_size is None


def test_s3_settings_give_an_s3_store_and_dvc_remote(tmp_path):
    deployment = Deployment.from_env({"MRI_ASSETS_S3_BUCKET": "b", "MRI_ASSETS_S3_PREFIX": "p/",
                                      "MRI_ASSETS_S3_ENDPOINT_URL": "http://s3.local:9000"},
                                     home=tmp_path)
    store = resources_for(deployment)["object_store"]
    assert (store.bucket, store.prefix, store.endpoint_url) == ("b", "p/", "http://s3.local:9000")
    assert deployment.dvc_remote == "s3://b/p/dvc-remote"


def test_secrets_from_the_process_environment_reach_dagster_as_env_vars(tmp_path, monkeypatch):
    monkeypatch.setenv("MRI_ASSETS_SALT", "from-the-env")
    monkeypatch.setenv("MRI_ASSETS_LABELS_URL", f"sqlite:///{tmp_path / 'l.db'}")
    resources = resources_for(Deployment.from_env(home=tmp_path))
    assert isinstance(resources["ingest"].salt, dg.EnvVar)
    assert resources["ingest"].salt == "MRI_ASSETS_SALT"
    assert isinstance(resources["label_store"].url, dg.EnvVar)


def test_demo_figures_apply_only_where_the_environment_sets_none(tmp_path):
    deployment = Deployment.from_env({"MRI_ASSETS_LABEL_BATCH": "7"}, home=tmp_path)
    demo = deployment.with_defaults(label_batch=500, retrain_every=1000)
    assert (demo.loop.label_batch, demo.loop.retrain_every) == (7, 1000)


def test_only_the_deployment_edge_reads_or_writes_the_environment():
    found = subprocess.run(["grep", "-rn", "os.environ", "mri_assets"], cwd=REPO, check=False,
                           capture_output=True, text=True).stdout.splitlines()
    files = {line.split(":", 1)[0] for line in found}
    assert files == {"mri_assets/deployment.py"}, found


def test_the_dagster_ui_address_reaches_mlflow_as_run_page_links(tmp_path):
    from mri_assets.definitions.code_location import resources_for

    plain = resources_for(Deployment.from_env({}, home=tmp_path))["mlflow"]
    assert plain.dagster_run_url("abc") is None
    linked = resources_for(Deployment.from_env(
        {"MRI_ASSETS_DAGSTER_URL": "http://dagster.example:3000/"}, home=tmp_path))["mlflow"]
    assert linked.dagster_run_url("abc") == "http://dagster.example:3000/runs/abc"
