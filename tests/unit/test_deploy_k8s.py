"""The Kubernetes manifests (deploy/k8s): the base and every overlay build with kustomize,
validate against the Kubernetes schemas, and keep what the service needs from its pods."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from service.server import CUT_OFF_GRACE_S
from service.settings import Settings

K8S = Path(__file__).parents[2] / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(path for path in (K8S / "overlays").iterdir() if path.is_dir())
TARGETS = [BASE, *OVERLAYS]
# The oldest Kubernetes the manifests are meant for, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())

DEPLOYMENT = "crs-reward"
CONTAINER = "crs-reward"
SECRET = "crs-reward-secrets"
PORT = 8000
# Overlays whose reward servers run without a GPU, with a Redis inside the cluster, and
# without an autoscaler (no Prometheus adapter in a dev cluster).
GPU_FREE = {"cpu"}
IN_CLUSTER_REDIS = {"dev", "cpu"}
NO_AUTOSCALER = {"dev", "cpu"}
# An 8B model read from network storage: the startup probe waits at least this long.
MODEL_LOAD_S = 600
TOKEN_SETTINGS = ("CRS_API_TOKENS", "CRS_ADMIN_TOKEN")
Doc = dict[str, Any]


def kustomize(directory: Path) -> str:
    """The YAML stream `kubectl kustomize` (or a standalone `kustomize build`) renders."""
    if kubectl := shutil.which("kubectl"):
        command = [kubectl, "kustomize", str(directory)]
    elif standalone := shutil.which("kustomize"):
        command = [standalone, "build", str(directory)]
    else:
        pytest.fail(
            "the Kubernetes manifest tests need kubectl (>= 1.27) or kustomize (>= 5) on PATH"
        )
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module", params=TARGETS, ids=[path.name for path in TARGETS])
def target(request: pytest.FixtureRequest) -> Path:
    """One kustomization: the base or an overlay."""
    path: Path = request.param
    return path


@pytest.fixture(scope="module")
def docs(target: Path) -> list[Doc]:
    """The objects the kustomization renders."""
    return [doc for doc in yaml.safe_load_all(kustomize(target)) if doc]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Doc) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def server(docs: list[Doc]) -> Doc:
    """The reward server container of the crs-reward Deployment."""
    containers = pod_spec(one(docs, "Deployment", DEPLOYMENT))["containers"]
    found = [c for c in containers if c["name"] == CONTAINER]
    assert len(found) == 1, f"no container {CONTAINER} in the Deployment"
    container: Doc = found[0]
    return container


def env(container: Doc) -> dict[str, Doc]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def env_number(container: Doc, name: str) -> float:
    entry = env(container).get(name, {})
    assert "value" in entry, f"{name} must be set explicitly"
    return float(entry["value"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates(docs: list[Doc], version: str) -> None:
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert errors == []


def test_one_gpu_per_pod(target: Path, docs: list[Doc]) -> None:
    resources = server(docs)["resources"]
    device = env(server(docs))["CRS_DEVICE"]["value"]
    if target.name in GPU_FREE:
        asked = {*resources.get("limits", {}), *resources.get("requests", {})}
        assert "nvidia.com/gpu" not in asked
        assert device == "cpu"
    else:
        # One GPU per pod: the service runs one model copy per device, so replicas, not a
        # bigger pod, add throughput; and a pod without its GPU must not fall back to the CPU.
        assert int(resources["limits"]["nvidia.com/gpu"]) == 1
        assert int(resources.get("requests", {}).get("nvidia.com/gpu", 1)) == 1
        assert device == "cuda"
    assert {"cpu", "memory"} <= resources["requests"].keys()


@pytest.mark.parametrize(
    ("probe", "path"),
    [("startupProbe", "/readyz"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")],
)
def test_probes(docs: list[Doc], probe: str, path: str) -> None:
    container = server(docs)
    get = container[probe]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert get["path"] == path
    assert ports.get(get["port"], get["port"]) == PORT
    assert env_number(container, "CRS_PORT") == PORT


def test_startup_probe_waits_for_a_model_load(docs: list[Doc]) -> None:
    startup = server(docs)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= MODEL_LOAD_S


def prestop_sleep_s(container: Doc) -> float:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert Path(command[0]).name == "sleep", f"preStop is not a sleep: {command}"
    return float(command[1])


def test_termination_outlasts_the_drain(docs: list[Doc]) -> None:
    container = server(docs)
    grace = pod_spec(one(docs, "Deployment", DEPLOYMENT))["terminationGracePeriodSeconds"]
    sleep_s = prestop_sleep_s(container)
    shutdown_s = env_number(container, "CRS_SHUTDOWN_TIMEOUT_S")
    assert sleep_s > 0
    drain_min_s = env_number(container, "CRS_DRAIN_MIN_S")
    # The requests still in flight at the end of the drain get CUT_OFF_GRACE_S to be answered.
    assert grace > sleep_s + shutdown_s + drain_min_s + CUT_OFF_GRACE_S
    # Else a request in flight at SIGTERM is cut off before its own timeout.
    assert shutdown_s >= env_number(container, "CRS_REQUEST_TIMEOUT_S")


def test_every_crs_variable_is_a_setting(docs: list[Doc], monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings ignore unknown CRS_* variables: a misspelt one would silently keep the default.
    literal = {n: e["value"] for n, e in env(server(docs)).items() if "value" in e}
    crs = {name for name in env(server(docs)) if name.startswith("CRS_")}
    unknown = {
        name for name in crs if name.removeprefix("CRS_").lower() not in Settings.model_fields
    }
    assert unknown == set()
    for name, value in literal.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.shutdown_timeout_s == float(literal["CRS_SHUTDOWN_TIMEOUT_S"])
    assert settings.drain_min_s == float(literal["CRS_DRAIN_MIN_S"])
    assert (settings.host, settings.port) == ("0.0.0.0", PORT)


def test_model_volume_is_read_only(docs: list[Doc]) -> None:
    container = server(docs)
    mounts = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
    assert len(mounts) == 1
    assert mounts[0].get("readOnly") is True
    volumes = {v["name"]: v for v in pod_spec(one(docs, "Deployment", DEPLOYMENT))["volumes"]}
    claim = volumes[mounts[0]["name"]]["persistentVolumeClaim"]
    assert claim == {"claimName": "crs-models", "readOnly": True}
    one(docs, "PersistentVolumeClaim", "crs-models")
    variables = env(container)
    paths = [variables["CRS_MODEL_PATH"]["value"]] if "CRS_MODEL_PATH" in variables else []
    if "CRS_MODELS" in variables:
        paths += [e.partition("=")[2] for e in variables["CRS_MODELS"]["value"].split(",")]
    assert paths
    assert all(path.startswith("/models/") for path in paths), paths


def test_tokens_come_only_from_the_secret(docs: list[Doc]) -> None:
    variables = env(server(docs))
    for name in TOKEN_SETTINGS:
        assert "value" not in variables[name], f"{name} has a literal value"
        assert variables[name]["valueFrom"]["secretKeyRef"]["name"] == SECRET
    # The admin plane stays off unless the user puts an admin token in the Secret.
    assert variables["CRS_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    # Nothing secret in the output at all: no Secret, no token in a ConfigMap or an env value.
    assert of_kind(docs, "Secret") == []
    for config in of_kind(docs, "ConfigMap"):
        assert not [key for key in config.get("data", {}) if "TOKEN" in key.upper()]
    for workload in workloads(docs):
        for container in pod_spec(workload)["containers"]:
            literal = [n for n, e in env(container).items() if "TOKEN" in n and "value" in e]
            assert literal == [], f"literal token values in {container['name']}"
            assert not [e for e in container.get("envFrom", []) if "configMapRef" in e]


def test_config_map_references_resolve(docs: list[Doc]) -> None:
    config_maps = {c["metadata"]["name"]: c.get("data", {}) for c in of_kind(docs, "ConfigMap")}
    refs = [
        entry["valueFrom"]["configMapKeyRef"]
        for entry in env(server(docs)).values()
        if "configMapKeyRef" in entry.get("valueFrom", {})
    ]
    assert refs, "CRS_REDIS_URL should come from the ConfigMap"
    for ref in refs:
        assert ref["key"] in config_maps.get(ref["name"], {}), f"dangling reference {ref}"


def test_pods_run_unprivileged(docs: list[Doc]) -> None:
    for workload in workloads(docs):
        spec = pod_spec(workload)
        assert spec.get("automountServiceAccountToken") is False
        for container in spec["containers"]:
            context = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert context.get("runAsNonRoot") is True, where
            assert context.get("runAsUser", 0) > 0, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where


def test_server_has_writable_scratch(docs: list[Doc]) -> None:
    container = server(docs)
    volumes = {v["name"]: v for v in pod_spec(one(docs, "Deployment", DEPLOYMENT))["volumes"]}
    mounted = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    home = env(container)["HOME"]["value"]
    for path in ("/tmp", home):
        assert "emptyDir" in mounted[path], f"{path} is not a writable emptyDir"
    assert env(container)["HF_HOME"]["value"].startswith(home + "/")


def test_service_links_are_off(docs: list[Doc]) -> None:
    # Else every Service in the namespace injects variables, and one named "crs" sets CRS_PORT.
    for workload in workloads(docs):
        assert pod_spec(workload).get("enableServiceLinks") is False


def test_service_selects_the_reward_servers(docs: list[Doc]) -> None:
    service = one(docs, "Service", DEPLOYMENT)
    deployment = one(docs, "Deployment", DEPLOYMENT)
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert selects(service["spec"]["selector"], pod_labels(deployment))
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels(deployment))
    for other in workloads(docs):
        if other is not deployment:
            assert not selects(service["spec"]["selector"], pod_labels(other))
    ports = {p["name"]: p["containerPort"] for p in server(docs)["ports"]}
    [port] = service["spec"]["ports"]
    assert port["port"] == PORT
    assert ports.get(port["targetPort"], port["targetPort"]) == PORT


def test_metrics_are_scraped(docs: list[Doc]) -> None:
    annotations = one(docs, "Deployment", DEPLOYMENT)["spec"]["template"]["metadata"]
    assert annotations["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(PORT),
        "prometheus.io/path": "/metrics",
    }


def test_disruption_budget_covers_the_reward_servers(docs: list[Doc]) -> None:
    budget = one(docs, "PodDisruptionBudget")
    deployment = one(docs, "Deployment", DEPLOYMENT)
    assert selects(budget["spec"]["selector"]["matchLabels"], pod_labels(deployment))
    assert budget["spec"].get("maxUnavailable") == 1 or budget["spec"].get("minAvailable")


def test_replicas_spread_over_nodes(docs: list[Doc]) -> None:
    deployment = one(docs, "Deployment", DEPLOYMENT)
    [spread] = pod_spec(deployment)["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert selects(spread["labelSelector"]["matchLabels"], pod_labels(deployment))


def test_autoscaler_scales_on_queue_depth(target: Path, docs: list[Doc]) -> None:
    deployment = one(docs, "Deployment", DEPLOYMENT)
    # The autoscaler owns the count; a count in the Deployment resets it on every apply.
    assert "replicas" not in deployment["spec"]
    if target.name in NO_AUTOSCALER:
        assert of_kind(docs, "HorizontalPodAutoscaler") == []
        return
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", DEPLOYMENT)
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "crs_queue_items"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # Scale down only after longer than a model load takes to undo it.
    down = hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
    assert down >= MODEL_LOAD_S


def test_production_keeps_two_replicas() -> None:
    production = [d for d in yaml.safe_load_all(kustomize(K8S / "overlays" / "production")) if d]
    assert one(production, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2
    image = server(production)["image"]
    assert not image.endswith(":set-by-overlay"), image


def test_redis_only_in_dev_overlays(target: Path, docs: list[Doc]) -> None:
    redis_sets = of_kind(docs, "StatefulSet")
    url = next(c["data"]["CRS_REDIS_URL"] for c in of_kind(docs, "ConfigMap"))
    if target.name not in IN_CLUSTER_REDIS:
        assert redis_sets == []
        assert not url.startswith("redis://crs-redis")
        return
    redis = one(docs, "StatefulSet", "crs-redis")
    service = one(docs, "Service", "crs-redis")
    assert selects(service["spec"]["selector"], pod_labels(redis))
    [port] = service["spec"]["ports"]
    assert url == f"redis://crs-redis:{port['port']}/0"


def test_secret_example_matches_the_references() -> None:
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    kubernetes_validate.validate(secret, KUBERNETES_VERSIONS[0], strict=True)
    assert (secret["kind"], secret["metadata"]["name"]) == ("Secret", SECRET)
    base = [doc for doc in yaml.safe_load_all(kustomize(BASE)) if doc]
    variables = env(server(base))
    keys = {variables[name]["valueFrom"]["secretKeyRef"]["key"] for name in TOKEN_SETTINGS}
    assert keys <= secret["stringData"].keys()


@pytest.mark.parametrize("setting", ["api_tokens", "admin_token"])
def test_secret_example_placeholders_are_refused(setting: str) -> None:
    # A forgotten placeholder must stop the pod, not become a token everyone knows.
    stored = yaml.safe_load((K8S / "secret.example.yaml").read_text())["stringData"]
    placeholder = stored["api-tokens" if setting == "api_tokens" else "admin-token"]
    with pytest.raises(ValidationError):
        Settings(**{setting: placeholder})


def test_prometheus_adapter_rule_serves_the_queue_metric() -> None:
    config = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())
    rules = [r for r in config["rules"] if r["name"]["as"] == "crs_queue_items"]
    assert len(rules) == 1
    [rule] = rules
    assert re.match(r"crs_queue_items\{", rule["seriesQuery"])
    assert re.fullmatch(rule["name"]["matches"], "crs_queue_items")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]
