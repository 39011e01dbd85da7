"""`dagster-webserver` on loopback against workspace.yaml, read through its GraphQL API."""

import os
import shutil
import sys
from pathlib import Path

import pytest
import requests

from mri_assets_tests import services
from mri_assets_tests.services import _http_answers, _running, free_port

REPO = Path(__file__).resolve().parents[2]

QUERY = """
{
  workspaceOrError {
    ... on Workspace {
      locationEntries {
        name
        locationOrLoadError {
          __typename
          ... on PythonError { message }
          ... on RepositoryLocation {
            repositories {
              name
              assetNodes { assetKey { path } }
              sensors { name }
              partitionSets { name }
            }
          }
        }
      }
    }
  }
}
"""


@pytest.mark.integration
def test_webserver_loads_the_code_location_with_assets_waves_and_sensor(tmp_path, monkeypatch):
    monkeypatch.setattr(services, "STARTUP_TIMEOUT_S", 180.0)
    home = tmp_path / "home"
    (home / "dagster").mkdir(parents=True)
    shutil.copyfile(REPO / "deploy" / "local" / "dagster.yaml", home / "dagster" / "dagster.yaml")
    port = free_port()
    env = {"MRI_ASSETS_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    webserver = str(Path(sys.executable).parent / "dagster-webserver")
    command = [webserver, "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)]
    with _running(command, "dagster-webserver", _http_answers(f"http://127.0.0.1:{port}/server_info"),
                  tmp_path, {**os.environ, **env}):
        url = f"http://127.0.0.1:{port}/graphql"
        data = requests.post(url, json={"query": QUERY}, timeout=120).json()["data"]
        entries = data["workspaceOrError"]["locationEntries"]
        assert [e["name"] for e in entries] == ["mri_assets"]
        location = entries[0]["locationOrLoadError"]
        assert location["__typename"] == "RepositoryLocation", location
        repository = location["repositories"][0]
        assets = {"/".join(node["assetKey"]["path"]) for node in repository["assetNodes"]}
        assert {"manifest", "slices"} <= assets
        assert "wave_sensor" in {sensor["name"] for sensor in repository["sensors"]}
        partitions = requests.post(url, json={"query": (
            '{ assetNodeOrError(assetKey: {path: ["manifest"]}) { ... on AssetNode {'
            ' partitionDefinition { name dimensionTypes { name dynamicPartitionsDefinitionName } } } } }'
        )}, timeout=60).json()["data"]["assetNodeOrError"]["partitionDefinition"]
        names = [d["dynamicPartitionsDefinitionName"] for d in partitions["dimensionTypes"]]
        assert names == ["waves"]
