"""The ops bundle (collector, Prometheus config, alert rules, dashboard) matches what we export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from otel import Metrics

OTEL = Path(__file__).resolve().parent.parent / "otel"
ALERTS = OTEL / "alerts" / "guardproxy-alerts.yaml"
DASHBOARD = OTEL / "dashboards" / "guardproxy.json"
METRIC_NAME = re.compile(r"guardproxy_[a-z_]+")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
PROMTOOL = shutil.which("promtool")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard_targets() -> list[tuple[str, str]]:
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def referenced(expr: str) -> set[str]:
    return {HISTOGRAM_SUFFIX.sub("", name) for name in METRIC_NAME.findall(expr)}


def exported_names(metrics: Metrics) -> set[str]:
    """Family names (histograms, label-less families) and every sample name rendered."""
    names = set()
    for family in text_string_to_metric_families(metrics.render()[0].decode()):
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        names.update(HISTOGRAM_SUFFIX.sub("", s.name) for s in family.samples)
    return names


def exercised() -> Metrics:
    m = Metrics(models=["m"], tools=["t"], rules=["r"], keys=["k"], teams=["team"])
    m.observe_request("/v1/chat/completions", "m", 200, 0.1)
    m.observe_upstream("m", 0.1)
    m.add_usage("team", "k", "m", 1, 1, 1)
    m.decision("deny", "r", shadow=False)
    m.tool_call("t", "denied")
    m.downgrade("m", "m")
    m.compression()
    m.repair("ok")
    m.budget_refusal("key")
    m.approval("approved")
    m.set_pending(1)
    m.feedback("confirmed")
    m.store_error("reserve")
    m.degraded()
    m.reload("ok", "rev")
    return m


def test_alert_rules_load_and_are_complete() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert {
        "GuardproxyHumanOverrideRateHigh",
        "GuardproxyBudgetRefusalsSpiking",
        "GuardproxyStoreDegraded",
        "GuardproxyUpstreamErrors",
    } <= names
    for rule in rules:
        assert rule["expr"].strip()
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]


def test_every_metric_in_alerts_and_dashboard_is_exported() -> None:
    exprs = [(rule["alert"], rule["expr"]) for rule in alert_rules()] + dashboard_targets()
    fresh = exported_names(Metrics())
    with_samples = exported_names(exercised())
    seen = set()
    for where, expr in exprs:
        names = referenced(expr)
        assert names, f"{where}: no guardproxy metric in {expr!r}"
        assert names <= fresh, f"{where}: {names - fresh} not exported by Metrics().render()"
        assert names <= with_samples, f"{where}: {names - with_samples} has no samples once used"
        seen |= names
    # and the dashboard/alerts look at the core signals
    for name in (
        "guardproxy_cost_usd_total",
        "guardproxy_decisions_total",
        "guardproxy_tool_calls_total",
        "guardproxy_human_override_ratio",
        "guardproxy_request_duration_seconds",
        "guardproxy_budget_refusals_total",
        "guardproxy_store_errors_total",
        "guardproxy_degraded_requests_total",
    ):
        assert name in seen


def test_override_alert_uses_windowed_counters() -> None:
    (rule,) = [r for r in alert_rules() if r["alert"] == "GuardproxyHumanOverrideRateHigh"]
    assert "increase(guardproxy_approvals_total" in rule["expr"]
    assert "increase(guardproxy_feedback_total" in rule["expr"]
    assert "> 0.15" in rule["expr"]


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "guardproxy"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["refId"] and target["expr"]
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in (
        "spend by team",
        "spend by model",
        "decisions",
        "blocked tool",
        "override",
        "p50 / p99",
        "budget refusals",
        "store errors",
    ):
        assert topic in titles


def test_collector_pipelines_reference_defined_components() -> None:
    cfg = load_yaml(OTEL / "collector.yaml")
    assert set(cfg["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    assert cfg["exporters"]["otlp_grpc/tempo"]["endpoint"] == "tempo:4317"
    assert "batch" in cfg["processors"]
    for pipeline in cfg["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline[kind]:
                assert component in cfg[kind], f"{component} used but not defined"
        assert pipeline["processors"][0] == "memory_limiter"
        assert pipeline["processors"][-1] == "batch"


def test_prometheus_scrapes_metrics_and_loads_the_rules() -> None:
    cfg = load_yaml(OTEL / "prometheus.yaml")
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "guardproxy"]
    assert job["metrics_path"] == "/metrics"
    for rule_file in cfg["rule_files"]:
        assert (OTEL / rule_file).is_file()


def test_promtool_checks_and_unit_tests_the_rules(tmp_path: Path) -> None:
    # scripts/test installs promtool (Debian's prometheus package) when it is missing: never a skip.
    assert PROMTOOL is not None, "promtool not installed (apt-get install prometheus)"
    run = [PROMTOOL, "test", "rules", str(OTEL / "alerts" / "guardproxy-alerts.test.yaml")]
    result = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    # The dashboard's queries must parse as PromQL: check them as recording rules.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$team", ".*")}
        for i, (_, expr) in enumerate(dashboard_targets())
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
