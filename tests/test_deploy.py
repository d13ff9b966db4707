"""The deployment files, offline: Kubernetes manifests and the BentoCloud config.

Every manifest under ``deploy/kubernetes/`` is validated against the Kubernetes OpenAPI schemas
that ``kubernetes-validate`` bundles (strict: unknown fields fail), for the oldest and a recent
Kubernetes version we claim; KEDA's ScaledObject, a CRD without a bundled schema, against a
structural schema written here. A kind with no schema fails rather than being skipped. Then the
things that matter for this service: probes on /readyz and /livez with timeouts, a GPU per pod,
a grace period longer than the request timeout with a working drain hook, and autoscaling on
BentoML's in-flight gauge with a target of one batch (``max_batch_size``). The BentoCloud
config is checked against BentoML's own deployment schema and against ``service.py``.
"""

from __future__ import annotations

import http.server
import importlib.util
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import attr
import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as k8s_validate

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
K8S_DIR = DEPLOY / "kubernetes"
BENTOCLOUD = DEPLOY / "bentocloud.yaml"
# The oldest Kubernetes the manifests are written for, and a recent one.
K8S_VERSIONS = ("1.30", "1.33")
METRIC = "bentoml_service_request_in_progress"
GPU_DEPLOYMENT = "bentowhisper"


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


GPU_PROFILE = read_yaml(REPO_ROOT / "configs" / "gpu.yaml")
CPU_PROFILE = read_yaml(REPO_ROOT / "configs" / "cpu.yaml")
GPU_BENTOFILE = read_yaml(REPO_ROOT / "bentofile.yaml")
CPU_BENTOFILE = read_yaml(REPO_ROOT / "bentofile.cpu.yaml")
REQUEST_TIMEOUT_S = max(GPU_PROFILE["request_timeout_s"], CPU_PROFILE["request_timeout_s"])


# --------------------------------------------------------------------------------------------
# loading


def manifest_files() -> list[Path]:
    return sorted(
        path
        for path in K8S_DIR.rglob("*")
        if path.is_file() and path.suffix in {".yaml", ".yml", ".json"}
    )


def load_manifests() -> list[tuple[str, dict[str, Any]]]:
    """``(file:index, document)`` for every YAML document under deploy/kubernetes."""
    found = []
    for path in manifest_files():
        docs = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))]
        assert docs and all(isinstance(doc, dict) for doc in docs), f"{path}: empty document"
        for index, doc in enumerate(docs):
            found.append((f"{path.relative_to(K8S_DIR)}:{index}", doc))
    return found


MANIFESTS = load_manifests()


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in MANIFESTS if doc["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    return doc


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return main


def plain_env(main: dict[str, Any]) -> dict[str, str]:
    return {env["name"]: env["value"] for env in main.get("env", []) if "value" in env}


def bentofile_for(deployment: dict[str, Any]) -> dict[str, Any]:
    is_gpu = "nvidia.com/gpu" in container(deployment)["resources"].get("limits", {})
    return GPU_BENTOFILE if is_gpu else CPU_BENTOFILE


@pytest.fixture(scope="module")
def services() -> Any:
    """``service.py`` as a module: it only reads the settings at import (no model is loaded)."""
    spec = importlib.util.spec_from_file_location("service", REPO_ROOT / "service.py")
    service = sys.modules["service"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(service)
    return service


# --------------------------------------------------------------------------------------------
# schemas

# KEDA 2.x ScaledObject, the fields used here (https://keda.sh/docs/latest/reference/scaledobject-spec/).
# additionalProperties: false at the levels we write, so a typo fails.
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "fallback": {"type": "object"},
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                # Same shape as an HPA's spec.behavior: checked below against
                                # the Kubernetes schema.
                                "behavior": {"type": "object"},
                            },
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            # KEDA reads trigger metadata as a map of strings: a YAML number
                            # (threshold: 32) is rejected by the CRD.
                            "metadata": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT_SCHEMA}


def test_manifests_found() -> None:
    kinds = {doc["kind"] for _, doc in MANIFESTS}
    assert {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds, kinds
    assert {"ScaledObject", "ConfigMap"} <= kinds, kinds
    # Everything under deploy/kubernetes is a manifest: nothing there (a values file, a
    # README) escapes the schema loop; documentation belongs in docs/deploy.md.
    others = [p for p in K8S_DIR.rglob("*") if p.is_file() and p not in manifest_files()]
    assert not others, f"non-manifest files under {K8S_DIR}: {others}"


@pytest.mark.parametrize(("where", "doc"), MANIFESTS, ids=[where for where, _ in MANIFESTS])
def test_manifest_matches_schema(where: str, doc: dict[str, Any]) -> None:
    crd = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if crd is not None:
        jsonschema.Draft202012Validator.check_schema(crd)
        jsonschema.Draft202012Validator(crd).validate(doc)
        return
    for version in K8S_VERSIONS:
        # Raises for an invalid document, and SchemaNotFoundError for a kind it has no schema
        # for: a new CRD needs an entry in CRD_SCHEMAS, never a silent skip.
        validated = k8s_validate.validate(doc, version, strict=True)
        assert validated == version


def test_scaled_object_behavior_matches_the_hpa_schema() -> None:
    """KEDA passes ``advanced.horizontalPodAutoscalerConfig.behavior`` to the HPA it creates."""
    (scaled,) = of_kind("ScaledObject")
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-check"},
        "spec": {
            "scaleTargetRef": scaled["spec"]["scaleTargetRef"],
            "maxReplicas": scaled["spec"]["maxReplicaCount"],
            "behavior": behavior,
        },
    }
    for version in K8S_VERSIONS:
        k8s_validate.validate(hpa, version, strict=True)


def test_schemas_catch_mistakes() -> None:
    """The validation above is real: a typo'd field and a wrong type both fail."""
    deployment = yaml.safe_load(yaml.safe_dump(named("Deployment", GPU_DEPLOYMENT)))
    main = container(deployment)
    main["readinessProbes"] = main.pop("readinessProbe")
    with pytest.raises(k8s_validate.ValidationError):
        k8s_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    (scaled,) = of_kind("ScaledObject")
    broken = yaml.safe_load(yaml.safe_dump(scaled))
    broken["spec"]["triggers"][0]["metadata"]["threshold"] = 32  # KEDA wants a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCALED_OBJECT_SCHEMA)
    with pytest.raises(k8s_validate.SchemaNotFoundError):
        k8s_validate.validate({"apiVersion": "example.com/v1", "kind": "Widget"}, "1.33")


# --------------------------------------------------------------------------------------------
# the Deployments


DEPLOYMENTS = of_kind("Deployment")


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["metadata"]["name"])
def test_probes(deployment: dict[str, Any]) -> None:
    main = container(deployment)
    ports = {port["name"]: port["containerPort"] for port in main["ports"]}
    assert ports == {"http": 3000}
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    for probe_name, path in expected.items():
        probe = main[probe_name]
        assert probe["httpGet"]["path"] == path, probe_name
        assert probe["httpGet"]["port"] in ("http", 3000), probe_name
        # BentoML's /readyz can hang during start-up: every probe needs a short client timeout
        # (set explicitly, not Kubernetes' default), and the period must exceed it.
        assert 1 <= probe["timeoutSeconds"] <= 10, probe_name
        assert probe["periodSeconds"] > probe["timeoutSeconds"], probe_name
    startup = main["startupProbe"]
    # Model load plus warm-up: give start-up minutes before liveness may restart the pod.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["metadata"]["name"])
def test_shutdown_outlasts_requests(deployment: dict[str, Any]) -> None:
    spec = deployment["spec"]["template"]["spec"]
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > REQUEST_TIMEOUT_S, "a request in flight at shutdown must be able to finish"
    command = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"], command
    script = command[2]
    compile(script, "preStop", "exec")
    sleep_s, drain_s, stop_s = (
        float(re.search(rf'"{name}", "([0-9.]+)"', script).group(1))
        for name in ("PRESTOP_SLEEP_S", "DRAIN_TIMEOUT_S", "STOP_TIMEOUT_S")
    )
    assert sleep_s >= 5, "endpoint removal needs a few seconds to reach the load balancers"
    assert drain_s >= REQUEST_TIMEOUT_S
    assert grace >= sleep_s + drain_s + stop_s + 20, "the hook must finish within the grace"
    assert '"SERVER_PID", "1"' in script, "in the container `bentoml serve` is PID 1"


def test_prestop_scripts_identical() -> None:
    scripts = {container(d)["lifecycle"]["preStop"]["exec"]["command"][2] for d in DEPLOYMENTS}
    assert len(scripts) == 1


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["metadata"]["name"])
def test_pod_settings(deployment: dict[str, Any]) -> None:
    spec = deployment["spec"]["template"]["spec"]
    # Service links would inject BENTOWHISPER_SERVICE_HOST/_PORT... into the settings' prefix.
    assert spec["enableServiceLinks"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    main = container(deployment)
    assert main["image"], "an image"
    # What the Bento's image sets (bentofile envs), the pod spec repeats with the same values.
    bentofile_envs = {env["name"]: env["value"] for env in bentofile_for(deployment)["envs"]}
    assert plain_env(main) == bentofile_envs
    (model,) = bentofile_for(deployment)["models"]
    assert plain_env(main)["BENTOWHISPER_BENTO_MODEL"] == model
    assert deployment["spec"]["selector"]["matchLabels"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "3000"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_gpu_deployment() -> None:
    deployment = named("Deployment", GPU_DEPLOYMENT)
    resources = container(deployment)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"].get("nvidia.com/gpu", 1) == 1
    env = plain_env(container(deployment))
    assert env["BENTOWHISPER_CONFIG"] == "configs/gpu.yaml"
    assert GPU_PROFILE["device"].startswith("cuda")


def test_services_select_their_deployment() -> None:
    deployments = {d["metadata"]["name"]: d for d in DEPLOYMENTS}
    for svc in of_kind("Service"):
        target = deployments[svc["metadata"]["name"]]
        labels = target["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        assert svc["metadata"]["namespace"] == target["metadata"]["namespace"]
        (port,) = svc["spec"]["ports"]
        assert port["targetPort"] in ("http", 3000)


# --------------------------------------------------------------------------------------------
# autoscaling


def test_hpa_scales_on_in_flight_requests() -> None:
    hpa = named("HorizontalPodAutoscaler", GPU_DEPLOYMENT)
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", GPU_DEPLOYMENT)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == METRIC
    assert metric["pods"]["target"] == {
        "type": "AverageValue",
        "averageValue": str(GPU_PROFILE["max_batch_size"]),
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_every_hpa_targets_a_deployment_here() -> None:
    names = {d["metadata"]["name"] for d in DEPLOYMENTS}
    for hpa in of_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in names


def test_prometheus_adapter_rule(services: Any) -> None:
    (configmap,) = of_kind("ConfigMap")
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    (rule,) = config["rules"]
    assert rule["name"]["as"] == METRIC
    assert re.fullmatch(rule["name"]["matches"], METRIC)
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    selector = f'runner_name="{services.WhisperModel.name}",endpoint="/decode"'
    assert "decode" in services.WhisperModel.apis
    assert rule["seriesQuery"].startswith(METRIC + "{") and selector in rule["seriesQuery"]
    query = rule["metricsQuery"]
    assert query.startswith(f"sum({METRIC}{{<<.LabelMatchers>>,")
    assert selector in query and query.endswith("by (<<.GroupBy>>)")


def test_keda_scales_on_in_flight_requests(services: Any) -> None:
    (scaled,) = of_kind("ScaledObject")
    deployment = named("Deployment", GPU_DEPLOYMENT)
    assert scaled["spec"]["scaleTargetRef"]["name"] == GPU_DEPLOYMENT
    assert scaled["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    # No pod, no in-flight metric: this trigger could never wake a Deployment at zero.
    assert scaled["spec"]["minReplicaCount"] >= 1
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert meta["threshold"] == str(GPU_PROFILE["max_batch_size"])
    query = meta["query"]
    assert query.startswith(f"sum({METRIC}{{") and query.endswith("})")
    matchers = set(query[len(f"sum({METRIC}{{") : -2].split(","))
    assert matchers == {
        f'namespace="{deployment["metadata"]["namespace"]}"',
        f'runner_name="{services.WhisperModel.name}"',
        'endpoint="/decode"',
    }


def test_keda_lives_apart_from_the_hpa() -> None:
    """``kubectl apply -f deploy/kubernetes/`` (not recursive) must not create both."""
    top = [read_yaml(p) for p in K8S_DIR.glob("*.yaml")]
    kinds = [doc["kind"] for doc in top]
    assert "HorizontalPodAutoscaler" in kinds and "ScaledObject" not in kinds
    assert "ConfigMap" not in kinds, "the adapter's config replaces the adapter's own"
    assert sorted(p.name for p in K8S_DIR.glob("*.yaml"))[0] == "00-namespace.yaml"


# --------------------------------------------------------------------------------------------
# the drain hook, against a fake /metrics


class FakeMetrics(http.server.BaseHTTPRequestHandler):
    """Serves BentoML-like metrics: one transcription in flight for the first few scrapes."""

    busy_scrapes = 2
    scrapes = 0

    def do_GET(self) -> None:
        cls = type(self)
        cls.scrapes += 1
        busy = 1.0 if cls.scrapes <= cls.busy_scrapes else 0.0
        body = (
            f"# TYPE {METRIC} gauge\n"
            f'{METRIC}{{endpoint="/readyz",runner_name="bentowhisper",service_name="b",'
            f'service_version="v"}} 1.0\n'
            f'{METRIC}{{endpoint="/decode",runner_name="whisper-model",service_name="b",'
            f'service_version="v"}} 3.0\n'
            f'{METRIC}{{endpoint="/v1/audio/transcriptions",runner_name="bentowhisper",'
            f'service_name="b",service_version="v"}} {busy}\n'
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


PRESTOP = container(named("Deployment", GPU_DEPLOYMENT))["lifecycle"]["preStop"]["exec"]["command"][
    2
]


def run_prestop(
    port: int, server_pid: int = 0, timeout: float = 60, **env: str
) -> tuple[float, subprocess.CompletedProcess]:
    """Run the preStop script here: no initial sleep, metrics on ``port``, and ``server_pid``
    (0: none) standing in for the container's PID 1."""
    full_env = {
        "PATH": "/usr/bin:/bin",
        "BENTOML_PORT": str(port),
        "PRESTOP_SLEEP_S": "0",
        "SERVER_PID": str(server_pid),
        **env,
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", PRESTOP],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return time.monotonic() - started, done


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_prestop_waits_for_requests_in_flight() -> None:
    FakeMetrics.scrapes = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeMetrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        took, done = run_prestop(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    # Busy for two scrapes (2 s apart), idle at the third: the probe and the model service's
    # gauge are not counted.
    assert FakeMetrics.scrapes == 3
    assert 3.5 <= took < 15


def test_prestop_returns_when_nothing_answers() -> None:
    took, done = run_prestop(closed_port())
    assert done.returncode == 0, done.stderr
    assert took < 5


# A stand-in for `bentoml serve`: ignores SIGTERM like a hung BentoML, and has a worker child
# that ignores it too; it exits once the child is gone, as the arbiter does.
STUBBORN_SERVER = """
import signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
print(child.pid, flush=True)
child.wait()
"""
POLITE_SERVER = "import time; time.sleep(120)"


@pytest.mark.parametrize(
    ("program", "stuck"), [(STUBBORN_SERVER, 1), (POLITE_SERVER, 0)], ids=["hangs", "exits"]
)
def test_prestop_stops_the_server(program: str, stuck: int) -> None:
    server = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        child = int(server.stdout.readline()) if stuck else None
        took, done = run_prestop(closed_port(), server.pid, STOP_TIMEOUT_S="2")
        assert done.returncode == 0, done.stderr
        assert f"SIGKILLed {stuck} stuck" in done.stdout
        assert server.wait(timeout=10) is not None
        assert took < (2 + 5 if stuck else 2)
        if child is not None:
            assert (
                not Path(f"/proc/{child}").exists()
                or "Z" in Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            )
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdout.close()


# --------------------------------------------------------------------------------------------
# BentoCloud

BENTOCLOUD_CONFIG = read_yaml(BENTOCLOUD)


def test_bentocloud_config_parses_with_bentoml(services: Any) -> None:
    """BentoML's own deployment schema (what `bentoml deploy -f` structures it into), plus a
    check for unknown keys, which that schema would silently drop."""
    from _bentoml_sdk.service.config import ServiceConfig, TrafficSchema
    from _bentoml_sdk.service.config import validate as validate_service_config
    from bentoml._internal.cloud.schemas.modelschemas import (
        DeploymentServiceConfig,
        DeploymentTargetHPAConf,
        EnvItemSchema,
        HPAPolicy,
    )
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    def keys_of(cls: type) -> set[str]:
        return {field.name for field in attr.fields(cls)}

    cfg = BENTOCLOUD_CONFIG
    # `cluster` is taken out before structuring (DeploymentConfigParameters.get_cluster).
    assert set(cfg) <= keys_of(CreateDeploymentSchema) | {"cluster"}
    bentoml_cattr.structure(
        {k: v for k, v in cfg.items() if k != "cluster"}, CreateDeploymentSchema
    )
    for env in cfg.get("envs", []):
        assert set(env) == keys_of(EnvItemSchema), env
    for name, svc in cfg["services"].items():
        assert set(svc) <= keys_of(DeploymentServiceConfig), name
        assert set(svc["scaling"]) <= keys_of(DeploymentTargetHPAConf), name
        policy = svc["scaling"].get("policy", {})
        assert set(policy) <= keys_of(HPAPolicy), name
        for behavior in ("scale_up_behavior", "scale_down_behavior"):
            assert policy.get(behavior, "fast") in {"fast", "stable", "disabled"}
        overrides = svc.get("config_overrides", {})
        assert set(overrides) <= set(ServiceConfig.__annotations__), name
        assert set(overrides.get("traffic", {})) <= set(TrafficSchema.__annotations__), name
        validate_service_config(overrides)


def test_bentocloud_services_match_service_py(services: Any) -> None:
    cfg = BENTOCLOUD_CONFIG
    api, model = services.BentoWhisper.name, services.WhisperModel.name
    assert set(cfg["services"]) == {api, model}
    assert cfg["bento"].split(":")[0] == GPU_BENTOFILE["name"]


def test_bentocloud_model_service(services: Any) -> None:
    svc = BENTOCLOUD_CONFIG["services"][services.WhisperModel.name]
    assert svc["instance_type"].startswith("gpu.") and svc["instance_type"].endswith(".1")
    traffic = svc["config_overrides"]["traffic"]
    # One replica fills its batches at max_batch_size calls in flight (one window each).
    assert traffic["concurrency"] == GPU_PROFILE["max_batch_size"]
    assert traffic["timeout"] == GPU_PROFILE["request_timeout_s"]
    scaling = svc["scaling"]
    assert 0 <= scaling["min_replicas"] <= scaling["max_replicas"]
    if scaling["min_replicas"] == 0:  # scale to zero holds requests in the external queue
        assert traffic.get("external_queue") is True


def test_bentocloud_api_service(services: Any) -> None:
    svc = BENTOCLOUD_CONFIG["services"][services.BentoWhisper.name]
    assert svc["instance_type"].startswith("cpu.")
    traffic = svc["config_overrides"]["traffic"]
    assert traffic["timeout"] == GPU_PROFILE["request_timeout_s"]
    # Scale out before the service's own 429 limit is reached.
    assert 1 <= traffic["concurrency"] < GPU_PROFILE["max_concurrent_requests"]
    assert 1 <= svc["scaling"]["min_replicas"] <= svc["scaling"]["max_replicas"]


def test_bentocloud_envs_match_the_gpu_bento() -> None:
    envs = {env["name"]: env["value"] for env in BENTOCLOUD_CONFIG["envs"]}
    bento_envs = {env["name"]: env["value"] for env in GPU_BENTOFILE["envs"]}
    assert envs == bento_envs
    assert envs["BENTOWHISPER_CONFIG"] == "configs/gpu.yaml"
    assert [envs["BENTOWHISPER_BENTO_MODEL"]] == GPU_BENTOFILE["models"]
