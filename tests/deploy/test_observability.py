"""deploy/prometheus and deploy/grafana against a real Prometheus scraping a real server under load.

Prometheus and promtool come from Debian's `prometheus` package; `make test` puts them on PATH
(deploy/prometheus/fetch-prometheus.sh unpacks the package into .tools/ when they are not installed).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from pickscore.client import Client
from pickscore.errors import InvalidInput
from pickscore.server.app import ServerThread
from pickscore.server.metrics import SPECS
from tests.server.conftest import jpeg, settings_for

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "pickscore.json"
ADAPTER = ROOT / "deploy" / "kubernetes" / "prometheus-adapter.yaml"
# Grafana's variables, as a person looking at all replicas of the job would have them.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$job": "pickscore",
    "$instance": ".*",
    "$model": ".*",
}
GPU_ONLY = "pickscore_gpu_"  # series a CPU-only server does not have


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(ROOT / ".tools" / "prometheus" / "usr" / "bin"))
    if not found:
        pytest.fail(
            f"{name} not found: run `make test` (it fetches Debian's prometheus package into .tools/) "
            "or install Prometheus 2.x"
        )
    return found


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusAPI:
    def __init__(self, base: str):
        self.base = base

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # a bad query answers 400 with the error in the body
            return json.loads(e.read())

    def query(self, expr: str) -> list[dict]:
        body = self.get("/api/v1/query", query=expr)
        assert body["status"] == "success", f"{expr}\n-> {body.get('errorType')}: {body.get('error')}"
        return body["data"]["result"]


def load(address: str, stop: threading.Event) -> None:
    """Steady traffic of every kind the panels show: Score and Rank, new and repeated prompts and images
    (both caches hit and miss), and a client error now and then."""
    images = [jpeg(i, 64) for i in range(12)]
    with Client(address, timeout=30) as client:
        i = 0
        while not stop.is_set():
            batch = [images[(i + k) % len(images)] for k in range(4)]
            client.score(f"prompt {i % 7}" if i % 2 else f"a new prompt {i}", batch)
            client.rank(f"prompt {i % 5}", batch[:3])
            if i % 5 == 0:
                with pytest.raises(InvalidInput):
                    client.score("   ", batch[:1])
            i += 1
            time.sleep(0.05)


@pytest.fixture(scope="module")
def prometheus(tiny_hf_dir, tmp_path_factory):
    """Prometheus with deploy/'s rules, scraping a loaded server every second; yields its HTTP API."""
    binary = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    with ServerThread(settings_for(tiny_hf_dir, image_cache_bytes=1 << 20)) as server:
        stop = threading.Event()
        loader = threading.Thread(target=load, args=(server.address, stop), daemon=True)
        loader.start()
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
        (job,) = config["scrape_configs"]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{server.server.metrics_port}"]}]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = (tmp / "prometheus.log").open("w")
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        api = PrometheusAPI(f"http://127.0.0.1:{port}")
        try:
            deadline = time.monotonic() + 90
            # Ready when the rules have seen traffic: two scrapes with requests in between, then an evaluation.
            while not (
                loader.is_alive()
                and _has_data(api, "job:pickscore_request_duration_seconds:p99_5m")
                and _has_data(api, "job:pickscore_images_scored:rate5m > 0")
            ):
                assert proc.poll() is None, (tmp / "prometheus.log").read_text()
                assert loader.is_alive(), "the load generator stopped"
                assert time.monotonic() < deadline, "no samples after 90 s:\n" + (tmp / "prometheus.log").read_text()
                time.sleep(0.5)
            yield api
        finally:
            stop.set()
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
            loader.join(timeout=30)


def _has_data(api: PrometheusAPI, expr: str) -> bool:
    try:
        return bool(api.query(expr))
    except (OSError, AssertionError):  # not listening yet
        return False


def grafana(expr: str) -> str:
    for name, value in GRAFANA_VARS.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def dashboard_targets() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels if p["type"] != "row" for t in p["targets"]]


def alert_signal(expr: str) -> str:
    """'<signal> <op> <number>' -> signal (every alert in rules/alerts.yml is written that way)."""
    m = re.fullmatch(r"(?s)\s*(.+?)\s*(?:==|!=|>=|<=|>|<)\s*[-+0-9.e]+\s*", expr)
    assert m, f"alert expression is not '<signal> <comparison> <threshold>': {expr}"
    return m.group(1)


def rules(kind: str) -> list[dict]:
    out = []
    for name in ("recording.yml", "alerts.yml"):
        for group in yaml.safe_load((PROMETHEUS_DIR / "rules" / name).read_text())["groups"]:
            out += [r for r in group["rules"] if kind in r]
    return out


# --- promtool: what CI checks on every change -------------------------------------------------------


def test_promtool_checks_the_config_and_its_rule_files():
    result = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_promtool_checks_the_rules():
    result = promtool("check", "rules", *map(str, sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_cover_every_alert():
    result = promtool("test", "rules", str(PROMETHEUS_DIR / "tests" / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load((PROMETHEUS_DIR / "tests" / "alerts_test.yml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    quiet = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if not t["exp_alerts"]}
    alerts = {r["alert"] for r in rules("alert")}
    assert alerts == fired, f"alerts without a firing test: {alerts - fired}"
    assert alerts <= quiet, f"alerts without a quiet test: {alerts - quiet}"


def test_promtool_rejects_a_broken_rule(tmp_path):
    """The checks above can fail: a rule with a PromQL error is refused."""
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - record: x:y\n        expr: sum by (job (up)\n")
    assert promtool("check", "rules", str(bad)).returncode != 0


# --- a real Prometheus scraping a real server --------------------------------------------------------


def test_every_dashboard_query_returns_data(prometheus):
    targets = dashboard_targets()
    assert len(targets) >= 20
    empty = []
    for title, expr in targets:
        result = prometheus.query(grafana(expr))  # raises on any PromQL error
        if not result and not (GPU_ONLY in expr and not torch.cuda.is_available()):
            empty.append(f"{title}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_gpu_panels_are_the_only_ones_allowed_to_be_empty_here(prometheus):
    gpu = [expr for _, expr in dashboard_targets() if GPU_ONLY in expr]
    assert len(gpu) == 3
    for expr in gpu:
        assert bool(prometheus.query(grafana(expr))) == torch.cuda.is_available()


def test_dashboard_variables_resolve(prometheus):
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "model"):
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", variables[name]["definition"])
        body = prometheus.get(f"/api/v1/label/{m.group(2)}/values", **{"match[]": grafana(m.group(1))})
        assert body["status"] == "success" and body["data"], (name, body)
    assert body["data"] == ["pickscore"]  # the served model's name
    for name in ("instance", "model"):
        assert variables[name]["allValue"] == GRAFANA_VARS[f"${name}"]
        assert variables[name]["multi"] and variables[name]["includeAll"]


def test_every_per_model_series_follows_the_model_variable():
    """Each selector of a family labelled by model (pickscore.server.metrics) filters on $model, and a panel that
    draws lines names the model in its legend unless it adds the models up."""
    families = [name for _, name, _, labels, *_ in SPECS.values() if labels[:1] == ("model",)]
    selector = re.compile(rf"({'|'.join(families)})(?:_total|_bucket|_sum|_count)?{{([^}}]*)}}")
    panels = json.loads(DASHBOARD.read_text())["panels"]
    seen = set()
    for p in panels:
        for t in p.get("targets", []):
            found = selector.findall(t["expr"])
            seen |= {family for family, _ in found}
            for family, matchers in found:
                assert 'model=~"$model' in matchers, (p["title"], family, t["expr"])
            aggregated = re.match(r"\s*(sum|max|avg|min) by \(([^)]*)\)", t["expr"])
            if found and p["type"] == "timeseries" and aggregated and "model" in aggregated.group(2):
                assert "{{model}}" in t["legendFormat"], (p["title"], t["legendFormat"])
    assert len(seen) >= 12, sorted(seen)  # nearly every per-model family has a panel


def test_dashboard_panels_use_the_datasource_variable():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["description"], p["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]


def test_every_recording_rule_returns_data_and_is_recorded(prometheus):
    for rule in rules("record"):
        assert prometheus.query(rule["expr"]), f"{rule['record']}: no data"
        assert prometheus.query(rule["record"]), f"{rule['record']}: not recorded"


def test_every_alert_signal_returns_data(prometheus):
    for rule in rules("alert"):
        assert prometheus.query(rule["expr"]) is not None  # the full expression evaluates
        assert prometheus.query(alert_signal(rule["expr"])), f"{rule['alert']}: its signal has no data"


def test_prometheus_evaluates_every_rule_without_error(prometheus):
    loaded = [r for g in prometheus.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    assert {r["name"] for r in loaded} == {r.get("record") or r.get("alert") for r in rules("record") + rules("alert")}
    for r in loaded:
        assert r["health"] == "ok" and not r.get("lastError"), r


def test_the_healthy_server_fires_no_alert(prometheus):
    firing = [a for a in prometheus.get("/api/v1/alerts")["data"]["alerts"] if a["state"] != "inactive"]
    assert firing == [], firing


def test_the_autoscaler_metric_query_returns_data(prometheus):
    """prometheus-adapter's rule (deploy/kubernetes) with its template filled in as the adapter would."""
    config = yaml.safe_load(yaml.safe_load(ADAPTER.read_text())["data"]["config.yaml"])
    (rule,) = config["rules"]
    assert prometheus.get("/api/v1/series", **{"match[]": rule["seriesQuery"]})["status"] == "success"
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", "pickscore_queue_depth")
        .replace("<<.LabelMatchers>>", 'job="pickscore"')
        .replace("<<.GroupBy>>", "instance")
    )
    assert prometheus.query(query)
