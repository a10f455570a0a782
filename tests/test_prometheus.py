"""A real Prometheus (Debian's package) scrapes a real training process; the dashboard's queries run."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from crosscoder.config import dumps_toml

from .conftest import free_port, small_run_config, wait_for_port
from .test_monitoring import MONITORING, dashboard_queries

pytestmark = pytest.mark.slow


def query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def label_values(port: int, definition: str) -> list[str]:
    """What Grafana's ``label_values(selector, label)`` variable query lists, asked of Prometheus."""
    match = re.fullmatch(r"label_values\((.+), *(\w+)\)", definition)
    assert match, definition
    selector, label = match.groups()
    url = f"http://127.0.0.1:{port}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": selector})
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", body
    return body["data"]


def dashboard_variables(port: int) -> dict[str, str]:
    """The dashboard's query variables, each set as Grafana sets a multi-value selection of every value
    its query lists (a regex alternation), in order: a later variable's query may use an earlier one."""
    dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "crosscoder.json").read_text())
    values: dict[str, str] = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        definition = variable["definition"]
        for name, value in values.items():
            definition = definition.replace(f"${name}", value)
        listed = label_values(port, definition)
        assert listed, f"dashboard variable {variable['name']!r}: its query lists nothing: {definition}"
        values[variable["name"]] = "(" + "|".join(re.escape(v) for v in listed) + ")"
    return values


def wait_until_ready(port: int, timeout: float) -> None:
    """Prometheus listens before it can answer: its API returns 503 until the TSDB is open."""
    deadline = time.time() + timeout
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5).status == 200:
                return
        except OSError:  # HTTPError 503 and connection errors alike
            pass
        if time.time() > deadline:
            pytest.fail(f"Prometheus on 127.0.0.1:{port} not ready after {timeout:.0f} s")
        time.sleep(0.5)


@pytest.fixture
def trainer(small_shards, tmp_path):
    """`crosscoder train` in its own process, serving metrics on 127.0.0.1, stopped after the test."""
    port = free_port()
    cfg = small_run_config(steps=1_000_000, checkpoint_every=0, log_every=50)
    cfg.metrics.port, cfg.metrics.host = port, "127.0.0.1"
    (tmp_path / "train.toml").write_text(dumps_toml(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "crosscoder.cli", "train", "--config", str(tmp_path / "train.toml"),
                             "--data", small_shards, "--run", str(tmp_path / "run"), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, timeout=60, proc=proc)
        yield port
    finally:
        proc.send_signal(signal.SIGINT)  # the CLI stops cleanly on Ctrl-C
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def prometheus(trainer, tmp_path):
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not shutil.which(binary):
        pytest.fail("the prometheus binary is missing: `apt-get install prometheus` (.ci/run installs it)")
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: crosscoder\n    static_configs:\n      - targets: ['127.0.0.1:{trainer}']\n")
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=30, proc=proc)
        wait_until_ready(port, timeout=60)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_prometheus_scrapes_the_trainer_and_every_training_panel_has_data(prometheus):
    deadline = time.time() + 60
    while time.time() < deadline:  # a few scrapes, so rate() has two samples in its window
        samples = query(prometheus, "crosscoder_train_steps_total")
        if samples and len(query(prometheus, "crosscoder_train_steps_total[30s]")[0]["values"]) >= 4:
            break
        time.sleep(1)
    else:
        pytest.fail("Prometheus did not collect 4 scrapes of the trainer in 60 s")
    assert query(prometheus, "up")[0]["value"][1] == "1"
    tokens = float(query(prometheus, "crosscoder_train_tokens_total")[0]["value"][1])
    assert tokens >= 256 and tokens % 256 == 0  # whole batches of 256 tokens
    fve = {r["metric"]["source"]: float(r["value"][1]) for r in query(prometheus, "crosscoder_train_fve")}
    assert set(fve) == {"base", "chat"} and all(-5 < v <= 1 for v in fve.values())
    variables = dashboard_variables(prometheus)
    assert set(variables) == {"job", "run"} and variables["run"] == "(test)", variables
    for title, expr in dashboard_queries():
        if "crosscoder_train_" in expr:
            for name, value in variables.items():
                expr = expr.replace(f"${name}", value)
            assert "$" not in expr, expr
            result = query(prometheus, expr)
            assert result, f"panel {title!r}: no data for {expr}"
