"""The Grafana dashboard and Prometheus config only name metrics the code emits."""

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from mri_assets.resources.metrics import METRICS

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mri_assets.json"

_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_LABEL_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[a-zA-Z_:][a-zA-Z0-9_:]*(?![\w(])(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords and label names removed)."""
    text = _STRING.sub(" ", expr)
    text = _GRAFANA_VARIABLE.sub(" ", text)
    text = _LABEL_MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    return {name for name in _IDENTIFIER.findall(text) if name not in _PROMQL_KEYWORDS}


def dashboard_panels() -> list[dict]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    nested = [inner for panel in panels for inner in panel.get("panels", [])]
    return [panel for panel in panels + nested if panel.get("type") != "row"]


def triage_metric_names() -> set[str]:
    """The gauges the triage app's /metrics really serves, read from its own output."""
    from mri_assets.triage import app

    text = app._metrics_text(defaultdict(float))
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_metric_name_parser_keeps_metrics_and_drops_functions_labels_and_ranges():
    expr = (
        '100 * sum by (category) (rate(mri_assets_a{wave=~"$wave", k="2"}[5m] offset 1h)) '
        "/ on (category) group_left max without (job) (mri_assets_b) > bool 0.5e3"
    )

    assert metric_names(expr) == {"mri_assets_a", "mri_assets_b"}


def test_metric_name_parser_finds_a_misspelt_metric():
    assert metric_names("max(mri_assets_spend_euro)") == {"mri_assets_spend_euro"}


@pytest.mark.parametrize("panel", dashboard_panels(), ids=lambda panel: panel["title"])
def test_every_panel_query_names_only_metrics_the_code_emits(panel):
    exprs = [target["expr"] for target in panel["targets"]]
    assert exprs, f"panel {panel['title']!r} has no query"
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"panel {panel['title']!r}: no metric in {expr!r}"
        unknown = names - set(METRICS)
        assert not unknown, f"panel {panel['title']!r} queries {sorted(unknown)} not in METRICS"


def test_wave_variable_reads_a_metric_the_code_emits():
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    for variable in variables:
        query = (
            variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        )
        metric = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert metric, f"variable {variable['name']!r}: unexpected query {query!r}"
        assert metric.group(1) in METRICS
        assert metric.group(2) in METRICS[metric.group(1)].labels


def test_dashboard_covers_throughput_gpu_queues_spend_caps_and_ari():
    queried = set().union(
        *(metric_names(t["expr"]) for panel in dashboard_panels() for t in panel["targets"])
    )

    for required in (
        "mri_assets_images_per_second",
        "mri_assets_gpu_utilisation_ratio",
        "mri_assets_queue_size",
        "mri_assets_spend_euros",
        "mri_assets_cap_euros",
        "mri_assets_ari",
    ):
        assert required in queried, f"no dashboard panel shows {required}"


def test_pushed_metric_names_carry_the_project_prefix():
    pushed = [name for name, spec in METRICS.items() if spec.source == "pushgateway"]

    assert pushed
    assert [name for name in pushed if not name.startswith("mri_assets_")] == []


def test_triage_metrics_in_metrics_list_match_what_the_triage_app_serves():
    listed = {name for name, spec in METRICS.items() if spec.source == "triage"}

    assert listed == triage_metric_names()


def test_panels_use_the_provisioned_prometheus_datasource():
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"][0]

    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_dashboard_provider_points_at_a_folder():
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "mri_assets.yaml").read_text()
    )["providers"][0]

    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")


def test_prometheus_scrapes_pushgateway_with_honor_labels_and_triage_with_bearer_file():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    assert jobs["pushgateway"]["honor_labels"] is True
    triage = jobs["triage"]
    assert triage["metrics_path"] == "/metrics"
    assert triage["authorization"]["type"] == "Bearer"
    assert triage["authorization"]["credentials_file"].startswith("/")
    assert "credentials" not in triage["authorization"]
