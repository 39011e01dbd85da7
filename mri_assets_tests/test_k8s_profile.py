"""The k8s profile, checked against dagster-k8s's own schema and its own Kubernetes Job builder.

No cluster is needed: the executor config is validated by `k8s_job_executor`'s config schema, and
each asset's step pod is built by `construct_dagster_k8s_job` from the same merge of executor
config and `dagster-k8s/config` op tag that the executor does at launch.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import kubernetes
import pytest
import yaml
from dagster._config import process_config
from dagster_k8s import k8s_job_executor
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import (
    USER_DEFINED_K8S_CONFIG_KEY,
    DagsterK8sJobConfig,
    UserDefinedDagsterK8sConfig,
    construct_dagster_k8s_job,
    get_user_defined_k8s_config,
)

from mri_assets.core.home import MriHome
from mri_assets.definitions import build_defs
from mri_assets.definitions.executors import K8S_PASSED_ENV, k8s_executor_config

REPO = Path(__file__).resolve().parents[1]
GPU = "nvidia.com/gpu"


@pytest.fixture
def k8s_defs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dg.Definitions:
    monkeypatch.setenv("MRI_ASSETS_S3_BUCKET", "mri-assets-test")
    monkeypatch.setenv("MRI_ASSETS_K8S_NAMESPACE", "mri")
    return build_defs("k8s", MriHome(tmp_path / "home"))


def _resolved_executor_config(defs: dg.Definitions) -> dict:
    result = defs.executor.config_schema.resolve_config({})
    assert result.success, result.errors
    return result.value["config"]


def _step_pod(executor_config: dict, op_tags: dict[str, str]) -> dict:
    """The pod spec (as sent to the API) of the Job the k8s executor creates for such a step."""
    executor_context = K8sContainerContext(
        env_vars=executor_config.get("env_vars"),
        namespace=executor_config.get("job_namespace"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(executor_config.get("step_k8s_config", {})),
    )
    step_context = executor_context.merge(
        K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(op_tags))
    )
    job_config = DagsterK8sJobConfig(job_image="registry.example/mri-assets:test",
                                     dagster_home="/opt/dagster/dagster_home",
                                     instance_config_map="dagster-instance")
    job = construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step"], "dagster-step-x",
                                    user_defined_k8s_config=step_context.run_k8s_config)
    return kubernetes.client.ApiClient().sanitize_for_serialization(job)["spec"]["template"]["spec"]


def test_k8s_profile_uses_the_k8s_job_executor_with_a_config_its_schema_accepts(k8s_defs):
    assert k8s_defs.executor.name == "k8s"
    config = _resolved_executor_config(k8s_defs)
    checked = process_config(k8s_job_executor.config_schema.config_type, config)
    assert checked.success, checked.errors
    assert config["job_namespace"] == "mri"
    assert {"MRI_ASSETS_PROFILE=k8s", "MRI_ASSETS_S3_BUCKET"} <= set(config["env_vars"])
    assert "enabled" in config["retries"]


def test_k8s_executor_passes_only_the_settings_that_are_set_to_step_pods():
    env_vars = k8s_executor_config({"MRI_ASSETS_SHARDS": "8"})["env_vars"]
    assert "MRI_ASSETS_SHARDS" in K8S_PASSED_ENV and len(K8S_PASSED_ENV) > 1
    assert env_vars == ["MRI_ASSETS_PROFILE=k8s", "MRI_ASSETS_SHARDS"]


def test_k8s_executor_config_with_a_wrong_type_is_rejected_by_the_schema():
    config = k8s_executor_config({"MRI_ASSETS_K8S_MAX_CONCURRENT": "4"})
    config["max_concurrent"] = "four"
    assert not process_config(k8s_job_executor.config_schema.config_type, config).success


def test_embeddings_tag_parses_with_dagster_k8s_and_gives_a_gpu_pod_on_gpu_nodes(k8s_defs):
    tags = k8s_defs.resolve_assets_def("embeddings").op.tags
    parsed = get_user_defined_k8s_config(tags)
    assert parsed.container_config["resources"]["limits"][GPU] == "1"

    pod = _step_pod(_resolved_executor_config(k8s_defs), tags)
    resources = pod["containers"][0]["resources"]
    assert resources["limits"][GPU] == "1"
    assert resources["requests"][GPU] == "1"
    assert resources["requests"]["cpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == GPU and t["effect"] == "NoSchedule" for t in pod["tolerations"])


@pytest.mark.parametrize("asset", ["manifest", "slices"])
def test_non_gpu_assets_carry_no_k8s_tag_and_their_pods_ask_for_no_gpu(k8s_defs, asset):
    tags = k8s_defs.resolve_assets_def(asset).op.tags
    assert USER_DEFINED_K8S_CONFIG_KEY not in tags
    pod = _step_pod(_resolved_executor_config(k8s_defs), tags)
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["cpu"] == "1"
    assert GPU not in resources.get("limits", {})
    assert GPU not in resources["requests"]
    assert "nodeSelector" not in pod
    assert "tolerations" not in pod


def test_helm_values_run_the_k8s_profile_with_k8s_run_launcher_daemon_and_run_monitoring():
    values = yaml.safe_load((REPO / "deploy" / "helm" / "values.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    env = {item["name"]: item["value"] for item in deployment["env"]}
    assert env["MRI_ASSETS_PROFILE"] == "k8s"
    assert {"MRI_ASSETS_S3_BUCKET", "MRI_ASSETS_S3_ENDPOINT_URL"} <= set(env)
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "mri_assets.definitions"]
    assert set(deployment["image"]) >= {"repository", "tag"}
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["enabled"] is True
    assert values["dagsterDaemon"]["runMonitoring"]["enabled"] is True
    assert {"postgresqlHost", "postgresqlUsername", "postgresqlDatabase"} <= set(values["postgresql"])
