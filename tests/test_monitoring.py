"""The monitoring files in cluster/monitoring/ against the metrics the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from crosscoder.telemetry import HARVEST_METRICS, TRAIN_METRICS

MONITORING = Path(__file__).resolve().parents[1] / "cluster" / "monitoring"
HISTOGRAMS = {"crosscoder_train_step_seconds", "crosscoder_harvest_shard_seconds"}


def exported_series() -> set[str]:
    names = set(TRAIN_METRICS) | set(HARVEST_METRICS)
    return names | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "crosscoder.json").read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def test_every_dashboard_query_names_only_exported_metrics():
    queries = dashboard_queries()
    assert len(queries) >= 10
    series = exported_series()
    used = set()
    for title, expr in queries:
        names = set(re.findall(r"\bcrosscoder_[a-z0-9_]+", expr))
        assert names, f"panel {title!r}: query names no crosscoder metric: {expr}"
        unknown = names - series
        assert not unknown, f"panel {title!r}: {sorted(unknown)} are not exported by crosscoder/telemetry.py"
        used |= {re.sub(r"_(bucket|sum|count)$", "", n) if n not in TRAIN_METRICS else n for n in names}
    # the dashboard shows every metric telemetry.py exports (docs/architecture.md)
    required = set(TRAIN_METRICS) - {"crosscoder_train_steps_total"} | set(HARVEST_METRICS)
    assert required <= used, f"not on the dashboard: {sorted(required - used)}"


def test_dashboard_provisioning_and_scrape_config_parse():
    providers = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/crosscoder.yaml").read_text())
    assert providers["providers"][0]["options"]["path"]
    datasources = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    dashboard = json.loads((MONITORING / "grafana/dashboards/crosscoder.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {datasources["datasources"][0]["uid"]}
    scrape = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in scrape["scrape_configs"]}
    assert jobs["crosscoder-local"]["static_configs"][0]["targets"]
    assert jobs["crosscoder-kubernetes"]["kubernetes_sd_configs"][0]["role"] == "pod"
