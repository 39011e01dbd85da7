import sys
import types
import urllib.request

import dagster as dg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mri_assets.core.costs import CostLedger
from mri_assets.resources.metrics import (
    METRICS,
    MetricsResource,
    build_registry,
    cost_gauges,
    gpu_utilisation,
    gpu_utilisation_gauges,
)
from mri_assets_tests.services import free_port


def samples_of(registry_or_text) -> dict[tuple[str, tuple], float]:
    text = registry_or_text
    if not isinstance(text, str):
        from prometheus_client import generate_latest

        text = generate_latest(registry_or_text).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def wave_costs_gauges(wave: str) -> dict:
    return {
        "mri_assets_budget_left_euros": 4333.37,
        "mri_assets_spend_euros": [
            ({"category": "compute"}, 1.375),
            ({"category": "storage"}, 0.252),
            ({"category": "labeling"}, 165.0),
        ],
        "mri_assets_ari": [({"wave": wave, "k": "2"}, 0.61), ({"wave": wave, "k": "3"}, 0.55)],
    }


def test_registry_holds_labelled_and_plain_gauges():
    samples = samples_of(build_registry(wave_costs_gauges("pilot")))

    assert samples[("mri_assets_budget_left_euros", ())] == pytest.approx(4333.37)
    assert samples[("mri_assets_spend_euros", (("category", "labeling"),))] == 165.0
    assert samples[("mri_assets_ari", (("k", "3"), ("wave", "pilot")))] == 0.55


def test_cost_gauges_carry_ledger_spend_caps_and_budget_left():
    spend = CostLedger().record_labels(10, 10).spend()

    samples = samples_of(build_registry(cost_gauges(spend)))

    assert samples[("mri_assets_spend_euros", (("category", "labeling"),))] == pytest.approx(5.5)
    assert samples[("mri_assets_cap_euros", (("category", "labeling"),))] == 1650.0
    assert samples[("mri_assets_cap_euros", (("category", "total"),))] == 4500.0
    assert samples[("mri_assets_budget_left_euros", ())] == pytest.approx(4500.0 - 5.5)


def test_unknown_metric_name_is_refused_naming_where_to_add_it():
    with pytest.raises(ValueError, match="unknown metric 'mri_assets_spend_euro'.*METRICS"):
        build_registry({"mri_assets_spend_euro": 1.0})


def test_wrong_labels_for_a_metric_are_refused():
    with pytest.raises(ValueError, match=r"takes labels \['category'\]"):
        build_registry({"mri_assets_spend_euros": [({"kind": "compute"}, 1.0)]})


def test_triage_metrics_cannot_be_pushed():
    with pytest.raises(ValueError, match="served by the triage app"):
        build_registry({"mri_triage_queue_size": 3.0})


def test_every_metric_name_is_prefixed_and_has_help_and_unit():
    for name, spec in METRICS.items():
        assert name.startswith(("mri_assets_", "mri_triage_")), name
        assert spec.help and spec.unit, name


def test_push_without_url_does_nothing(monkeypatch):
    monkeypatch.delenv("PUSHGATEWAY_URL", raising=False)

    outcome = MetricsResource().push("manifest", {"wave": "pilot"}, {"mri_assets_queue_size": []})

    assert not outcome.pushed
    assert outcome.failures == 0


def test_pushgateway_url_comes_from_the_deployment(tmp_path):
    from mri_assets.definitions.code_location import resources_for
    from mri_assets.deployment import Deployment

    deployment = Deployment.from_env({"PUSHGATEWAY_URL": "http://gateway.example:9091"},
                                     home=tmp_path)
    assert resources_for(deployment)["metrics"].gateway_url() == "http://gateway.example:9091"
    assert resources_for(Deployment.from_env({}, home=tmp_path))["metrics"].gateway_url() is None
    assert MetricsResource(pushgateway_url="").gateway_url() is None


def test_push_to_a_down_gateway_does_not_raise_and_is_counted(caplog):
    metrics = MetricsResource(pushgateway_url=f"http://127.0.0.1:{free_port()}", timeout_s=2)

    first = metrics.push("wave_costs", {"wave": "pilot"}, wave_costs_gauges("pilot"))
    second = metrics.push("wave_costs", {"wave": "pilot"}, wave_costs_gauges("pilot"))

    assert (first.pushed, first.failures) == (False, 1)
    assert (second.pushed, second.failures) == (False, 2)
    assert metrics.push_failures == 2
    assert "metrics push to" in caplog.text


def test_materialization_succeeds_when_the_gateway_is_down():
    @dg.asset
    def pushes_figures(metrics: MetricsResource) -> int:
        return metrics.push(
            "smoke", {"wave": "smoke"}, {"mri_assets_budget_left_euros": 1.0}
        ).failures

    result = dg.materialize(
        [pushes_figures],
        resources={"metrics": MetricsResource(pushgateway_url=f"127.0.0.1:{free_port()}")},
    )

    assert result.success
    assert result.output_for_node("pushes_figures") == 1


def fake_pynvml(utilisation_by_index: dict[int, int], init_fails: bool = False):
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        if init_fails:
            raise NVMLError("driver not loaded")

    module.NVMLError = NVMLError
    module.nvmlInit = init
    module.nvmlShutdown = lambda: None
    module.nvmlDeviceGetCount = lambda: len(utilisation_by_index)
    module.nvmlDeviceGetHandleByIndex = lambda index: index
    module.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(
        gpu=utilisation_by_index[handle]
    )
    return module


def test_gpu_utilisation_reads_nvml_per_gpu_as_ratio(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({0: 87, 1: 40}))

    assert gpu_utilisation() == {"0": 0.87, "1": 0.40}
    assert gpu_utilisation_gauges() == {
        "mri_assets_gpu_utilisation_ratio": [({"gpu": "0"}, 0.87), ({"gpu": "1"}, 0.40)]
    }


def test_gpu_utilisation_is_omitted_when_nvml_cannot_start(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({0: 50}, init_fails=True))

    assert gpu_utilisation_gauges() == {}


def test_gpu_utilisation_is_omitted_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)

    assert gpu_utilisation() == {}


def read_gateway(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {key: value for key, value in samples_of(text).items() if key[0].startswith("mri_")}


@pytest.mark.integration
def test_pushed_figures_read_back_from_a_real_pushgateway(pushgateway_url):
    metrics = MetricsResource(pushgateway_url=pushgateway_url)

    outcome = metrics.push("wave_costs", {"wave": "pilot"}, wave_costs_gauges("pilot"))

    assert outcome.pushed and outcome.failures == 0
    series = read_gateway(pushgateway_url)
    group = (("instance", ""), ("job", "wave_costs"), ("wave", "pilot"))
    assert series[("mri_assets_budget_left_euros", group)] == pytest.approx(4333.37)
    spend_labels = tuple(sorted((*group, ("category", "labeling"))))
    assert series[("mri_assets_spend_euros", spend_labels)] == 165.0
    ari_labels = tuple(sorted((*group, ("k", "2"))))
    assert series[("mri_assets_ari", ari_labels)] == 0.61


@pytest.mark.integration
def test_pushes_from_a_materialized_wave_land_in_their_own_group(pushgateway_url):
    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["full-1"]))
    def wave_figures(context: dg.AssetExecutionContext, metrics: MetricsResource) -> None:
        wave = context.partition_key
        metrics.push(
            "manifest",
            {"wave": wave},
            {
                "mri_assets_slices_ingested": [({"wave": wave}, 1000)],
                "mri_assets_quarantined_slices": [({"wave": wave}, 3)],
            },
        )

    result = dg.materialize(
        [wave_figures],
        partition_key="full-1",
        resources={"metrics": MetricsResource(pushgateway_url=pushgateway_url)},
    )

    assert result.success
    series = read_gateway(pushgateway_url)
    group = (("instance", ""), ("job", "manifest"), ("wave", "full-1"))
    assert series[("mri_assets_slices_ingested", group)] == 1000
    assert series[("mri_assets_quarantined_slices", group)] == 3
