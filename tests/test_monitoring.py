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
    # panels query the data source chosen in the dashboard's `datasource` variable (a Prometheus;
    # the provisioned one is the default), so the dashboard also imports into an existing Grafana
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {"${datasource}"}
    chooser = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert chooser["type"] == "datasource" and chooser["query"] == datasources["datasources"][0]["type"]
    assert datasources["datasources"][0]["isDefault"]
    scrape = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in scrape["scrape_configs"]}
    assert jobs["crosscoder-local"]["static_configs"][0]["targets"]
    assert jobs["crosscoder-kubernetes"]["kubernetes_sd_configs"][0]["role"] == "pod"


def test_dashboard_selects_runs_and_jobs_so_two_runs_never_overlay():
    dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "crosscoder.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "run"} <= set(variables)
    assert "run)" in variables["run"]["definition"] and variables["run"]["multi"]
    for title, expr in dashboard_queries():
        for selector in re.findall(r"\bcrosscoder_[a-z0-9_]+(\{[^}]*\})?", expr):
            assert 'run=~"$run"' in selector and 'job=~"$job"' in selector, f"panel {title!r}: {expr}"
        assert re.search(r"by \(run\b", expr), f"panel {title!r} does not keep runs apart: {expr}"


def test_the_processes_of_one_host_take_consecutive_ports_and_label_their_run(capsys):
    """Two ranks on one pod serve from one base port: the first free port each, so a pod's declared
    ports are as many as its processes; every series names the run; each says where it serves (the
    one that moved on from a taken port served there without a word)."""
    import urllib.request

    from crosscoder.telemetry import TrainMetrics

    from .conftest import free_consecutive_ports

    base = free_consecutive_ports(2)
    first, second = (TrainMetrics(base, rank, host="127.0.0.1", run="gemma-l13") for rank in (3, 5))
    try:
        assert (first.port, second.port) == (base, base + 1)
        assert capsys.readouterr().err.splitlines() == [f"metrics: http://127.0.0.1:{base}/metrics",
                                                        f"metrics: http://127.0.0.1:{base + 1}/metrics ({base} taken)"]
        second.step({"loss": {"mse": 0.5}, "fve": {"base": 0.9}, "l0": 32.0, "dead_fraction": 0.1}, 4096, 0.1, 0.0)
        text = urllib.request.urlopen(f"http://127.0.0.1:{base + 1}/metrics", timeout=5).read().decode()
    finally:
        first.close()
        second.close()
    assert 'crosscoder_train_tokens_total{rank="5",run="gemma-l13"} 4096.0' in text
    assert 'crosscoder_train_fve{rank="5",run="gemma-l13",source="base"} 0.9' in text
