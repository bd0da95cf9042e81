"""The Helm chart (charts/kquant), rendered by Helm's own engine (helm-python-sdk embeds the
Helm v4 Go SDK): every manifest validates against the Kubernetes schemas, every value that
changes a template is exercised, bad values are refused by values.schema.json, and the RBAC
rules are exactly the API calls the operator makes."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from chart_helpers import CHART, NAMESPACE, granted, helm, render

from kquant_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.31.0"  # the oldest Kubernetes the chart and the operator are tested against


def notes(values: dict[str, Any] | None = None) -> str:
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values, name="kquant", namespace=NAMESPACE, is_install=True)
    return next(v for k, v in out.items() if k.endswith("NOTES.txt"))


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = kinds(docs, "Deployment")
    return dep


def env(docs: list[dict[str, Any]]) -> dict[str, str]:
    (container,) = deployment(docs)["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"]}


def validate_all(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc["apiVersion"].startswith("kopf.dev/"):
            continue  # kopf's own custom resources: not in the Kubernetes schemas
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_chart_metadata_follows_the_package():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version and chart["appVersion"] == version.group(1)


def test_chart_crd_is_the_generated_crd():
    assert (CHART / "crds" / "quantizationjob.yaml").read_bytes() == (
        ROOT / "crds" / "quantizationjob.yaml"
    ).read_bytes()


@pytest.mark.parametrize("values", [None, {"watchNamespaces": ["speech"], "replicas": 2}])
def test_helm_lint_strict_finds_no_warning(values):
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{K8S_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # 2 warning, 3 error


def test_every_value_has_a_comment():
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z][\w./-]*:", line):
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#"), f"values.yaml line {i + 1} has no comment: {line}"


def test_default_install_is_cluster_wide_and_valid():
    docs = render()
    validate_all(docs)
    assert {d["kind"] for d in docs} == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
    }
    dep = deployment(docs)
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert container["image"] == "ghcr.io/kquant/kquant-operator:0.1.0"
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["ports"][0]["containerPort"] == 8080
    assert container["resources"]["limits"]["memory"]
    # The operator's own parser accepts what the chart passes, and gets the chart's defaults.
    settings = OperatorSettings.from_env(env(docs))
    assert settings.cluster_wide and settings.worker_image == "ghcr.io/kquant/kquant-job:0.1.0"
    assert settings == OperatorSettings()
    assert "KQUANT_PEERING" not in env(docs)
    (binding,) = kinds(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kquant", "namespace": NAMESPACE}
    ]
    assert "every namespace" in notes()


def test_namespaced_install_has_roles_per_namespace_only():
    docs = render({"watchNamespaces": ["speech", "vision"]})
    validate_all(docs)
    assert not kinds(docs, "ClusterRole") and not kinds(docs, "ClusterRoleBinding")
    roles, bindings = kinds(docs, "Role"), kinds(docs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["speech", "vision"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["speech", "vision"]
    assert OperatorSettings.from_env(env(docs)).watch_namespaces == ("speech", "vision")
    assert "speech, vision" in notes({"watchNamespaces": ["speech", "vision"]})
    assert "does not watch" not in notes({"watchNamespaces": ["speech", "vision"]})
    audio = notes({"watchNamespaces": ["audio"]})  # the example's namespace is not watched
    assert "does not watch: set its metadata.namespace to one of audio" in audio
    assert "kubectl get qjob -n speech -w" in notes()


def test_worker_defaults_reach_the_operator():
    worker = {
        "image": {
            "repository": "registry.local/kq/job",
            "tag": "dev",
            "pullPolicy": "Always",
            "pullSecrets": ["registry-creds", "mirror.creds"],
        },
        "resources": {"limits": {"nvidia.com/gpu": 2, "memory": "32Gi"}},
        "nodeSelector": {"gpu": "a100"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "queueName": "gpu-queue",
        "priorityClassName": "batch-low",
        "ttlSecondsAfterFinished": 0,
        "activeDeadlineSeconds": 10_000_000,
        "backoffLimit": 0,
        "workVolumeSize": "200Gi",
        "tmpVolumeSize": "2Gi",
        "s3Transfer": {"multipartChunksizeMiB": 64, "maxConcurrency": 4, "readTimeout": 2.5},
        "allowedImages": ["registry.local/kq/*", "ghcr.io/kquant/kquant-job:0.2.?"],
        "allowedServiceAccounts": ["kquant-irsa"],
        "allowedPriorityClasses": ["batch-*"],
    }
    docs = render({"worker": worker})
    validate_all(docs)
    s = OperatorSettings.from_env(env(docs))
    assert s.worker_image == "registry.local/kq/job:dev" and s.image_pull_policy == "Always"
    assert s.image_pull_secrets == ("registry-creds", "mirror.creds")
    assert s.default_resources == {"limits": {"memory": "32Gi", "nvidia.com/gpu": "2"}}
    assert s.default_node_selector == {"gpu": "a100"}
    assert s.default_tolerations == worker["tolerations"]
    assert s.default_queue_name == "gpu-queue" and s.default_priority_class_name == "batch-low"
    assert (s.ttl_seconds_after_finished, s.active_deadline_seconds, s.backoff_limit) == (
        0,
        10_000_000,
        0,
    )
    assert (s.work_volume_size, s.tmp_volume_size) == ("200Gi", "2Gi")
    assert s.allowed_images == ("registry.local/kq/*", "ghcr.io/kquant/kquant-job:0.2.?")
    assert s.allowed_service_accounts == ("kquant-irsa",)
    assert s.allowed_priority_classes == ("batch-*",)
    assert s.worker_s3_transfer == {
        "KQUANT_S3_MULTIPART_CHUNKSIZE_MIB": "64",
        "KQUANT_S3_MAX_CONCURRENCY": "4",
        "KQUANT_S3_READ_TIMEOUT": "2.5",
    }
    assert not any(k.startswith("KQUANT_S3_") for k in env(render()))  # unset: worker defaults
    assert "KQUANT_IMAGE_PULL_SECRETS" not in env(render())


def test_operator_pod_values_change_the_deployment():
    values = {
        "image": {"repository": "registry.local/kq/op", "tag": "dev", "pullPolicy": "Never"},
        "imagePullSecrets": [{"name": "regcred"}],
        "livenessPort": 9090,
        "resyncSeconds": 15,
        "extraArgs": ["--verbose"],
        "resources": {"requests": {"cpu": "100m"}},
        "nodeSelector": {"role": "control"},
        "tolerations": [{"key": "control", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {}},
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"a": "b"},
        "podLabels": {"team": "ml"},
        "serviceAccount": {"create": True, "name": "kq", "annotations": {"x": "y"}},
    }
    docs = render(values)
    validate_all(docs)
    pod = deployment(docs)["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["image"] == "registry.local/kq/op:dev"
    assert container["imagePullPolicy"] == "Never" and container["args"] == ["--verbose"]
    assert container["ports"][0]["containerPort"] == 9090
    assert OperatorSettings.from_env(env(docs)).liveness_port == 9090
    assert float(env(docs)["KQUANT_RESYNC_SECONDS"]) == 15
    assert float(env(render())["KQUANT_RESYNC_SECONDS"]) == 60
    assert container["resources"]["requests"]["cpu"] == "100m"  # merged with the defaults
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["nodeSelector"] == {"role": "control"} and spec["affinity"]
    assert spec["tolerations"] == values["tolerations"]
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert pod["metadata"]["annotations"] == {"a": "b"}
    assert pod["metadata"]["labels"]["team"] == "ml"
    assert spec["serviceAccountName"] == "kq"
    (sa,) = kinds(docs, "ServiceAccount")
    assert sa["metadata"]["name"] == "kq" and sa["metadata"]["annotations"] == {"x": "y"}


def test_no_rbac_and_existing_service_account():
    docs = render({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}})
    validate_all(docs)
    assert {d["kind"] for d in docs} == {"Deployment"}
    assert deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


@pytest.mark.parametrize("namespaces", [[], ["speech"]])
def test_replicas_turn_on_kopf_peering(namespaces):
    docs = render({"replicas": 2, "watchNamespaces": namespaces})
    validate_all(docs)
    dep = deployment(docs)
    assert dep["spec"]["replicas"] == 2 and env(docs)["KQUANT_PEERING"] == "kquant"
    kind = "KopfPeering" if namespaces else "ClusterKopfPeering"
    (peering,) = kinds(docs, kind)
    assert peering["metadata"]["name"] == "kquant"
    role = kinds(docs, "Role" if namespaces else "ClusterRole")[0]
    plural = "kopfpeerings" if namespaces else "clusterkopfpeerings"
    assert {"apiGroups": ["kopf.dev"], "resources": [plural],
            "verbs": ["get", "list", "watch", "patch"]} in role["rules"]  # fmt: skip
    crds = (CHART / "crds" / "kopf-peering.yaml").read_text()
    assert f"plural: {plural}" in crds


@pytest.mark.parametrize(
    "values",
    [
        {"replicas": 0},
        {"watchNamespaces": ["Not_A_Namespace"]},
        {"image": {"repository": "x", "tag": "1", "pullPolicy": "Sometimes"}},
        {"worker": {"resources": {"limits": {"memory": "16GB"}}}},
        {"worker": {"workVolumeSize": "lots"}},
        {"worker": {"backoffLimit": -1}},
        {"livenessPort": 70000},
        {"resyncSeconds": 0},
        {"unknownKey": True},
        {"worker": {"nodeSelector": {"gpu": 1}}},
        {"worker": {"s3Transfer": {"partSize": 64}}},
        {"worker": {"s3Transfer": {"maxConcurrency": 0}}},
        {"worker": {"s3Transfer": {"readTimeout": "slow"}}},
        {
            "worker": {
                "image": {
                    "repository": "x",
                    "tag": "1",
                    "pullPolicy": "Always",
                    "pullSecrets": ["Registry_Creds"],
                }
            }
        },
    ],
)
def test_bad_values_are_refused(values):
    with pytest.raises(helm.HelmValuesError):
        render(values)


# --- RBAC against the code ---------------------------------------------------------------

_VERBS = {"get": "get", "list": "list", "create": "create", "merge_patch": "patch"}
_VERBS["delete"] = "delete"
_NOT_API = {"close"}  # Kube methods that make no API call


def _resource_of(call: ast.expr) -> tuple[str, str]:
    """(apiGroup, resource) of a path expression in handlers.py."""
    assert isinstance(call, ast.Call) and isinstance(call.func, ast.Name), ast.dump(call)
    if call.func.id == "_qjob_path":
        sub = "/status" if len(call.args) > 2 else ""
        return "kquant.io", "quantizationjobs" + sub
    if call.func.id == "_qjobs_path":
        return "kquant.io", "quantizationjobs"
    if call.func.id == "_jobs_path":
        return "batch", "jobs"
    if call.func.id == "_peering_path":  # the ClusterKopfPeering when cluster-wide
        return "kopf.dev", "kopfpeerings"
    if call.func.id == "path":
        group, _, plural = (ast.literal_eval(a) for a in call.args[:3])
        return group, plural
    raise AssertionError(f"unknown path helper {call.func.id}")


def code_calls() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every ``kube.<verb>(<path>)`` call in the operator's
    modules (kube.py itself is the client)."""
    calls = set()
    for module in (ROOT / "operator" / "kquant_operator").glob("*.py"):
        if module.name != "kube.py":
            calls |= _calls_in(ast.parse(module.read_text()))
    return calls


def _calls_in(tree: ast.AST) -> set[tuple[str, str, str]]:
    calls = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "kube"
            and node.func.attr not in _NOT_API
        ):
            assert node.func.attr in _VERBS, f"unmapped client call kube.{node.func.attr}"
            calls.add((*_resource_of(node.args[0]), _VERBS[node.func.attr]))
    return calls


# kopf's own calls, for the handlers registered in handlers.register(): list+watch of the
# watched resources (quantizationjobs, jobs), patch of the CR's annotations (progress and
# diff-base storage), core/v1 Events (kopf.event / kopf.info). Cluster-wide kopf also follows
# CRDs (settings.scanning, off in namespaced mode).
KOPF_CALLS = {
    ("kquant.io", "quantizationjobs", "list"),
    ("kquant.io", "quantizationjobs", "watch"),
    ("kquant.io", "quantizationjobs", "patch"),
    ("batch", "jobs", "list"),
    ("batch", "jobs", "watch"),
    ("", "events", "create"),
    # not a call: the admission check of a Job's ownerReference with blockOwnerDeletion
    ("kquant.io", "quantizationjobs/finalizers", "update"),
}
KOPF_CLUSTER_CALLS = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}


def test_the_code_makes_the_calls_this_test_knows():
    calls = code_calls()
    # Guards the scan itself: these calls are in handlers.py today.
    assert ("kquant.io", "quantizationjobs/status", "patch") in calls
    assert ("", "pods", "list") in calls and ("batch", "jobs", "create") in calls
    assert ("kquant.io", "quantizationjobs", "list") in calls  # the resync loop


def peering_calls(namespaces: list[str]) -> set[tuple[str, str, str]]:
    """kopf's calls on its peering object (replicas > 1) and the resync loop's GET of it."""
    plural = "kopfpeerings" if namespaces else "clusterkopfpeerings"
    return {("kopf.dev", plural, verb) for verb in ("get", "list", "watch", "patch")}


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("namespaces", [[], ["speech", "vision"]])
def test_rbac_grants_exactly_the_calls_of_the_operator(namespaces, replicas):
    docs = render({"watchNamespaces": namespaces, "replicas": replicas})
    roles = kinds(docs, "Role" if namespaces else "ClusterRole")
    calls = code_calls()
    peering = {call for call in calls if call[0] == "kopf.dev"}
    assert peering == {("kopf.dev", "kopfpeerings", "get")}  # the resync's standby check
    expected = calls - peering | KOPF_CALLS | (set() if namespaces else KOPF_CLUSTER_CALLS)
    if replicas > 1:  # a standalone operator (replicas 1) reads no peering
        expected |= peering_calls(namespaces)
    for role in roles:
        assert granted(role) == expected
        assert not any("secrets" in rule["resources"] for rule in role["rules"])


@pytest.mark.parametrize("replicas", [1, 2])
def test_entrypoint_turns_the_chart_env_into_kopf_arguments(tmp_path, replicas):
    """operator/entrypoint.sh with the Deployment's env: a stand-in `kopf` prints its args."""
    kopf = tmp_path / "kopf"
    kopf.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    kopf.chmod(0o755)
    docs = render({"replicas": replicas, "watchNamespaces": ["speech", "vision"]})
    run = subprocess.run(
        ["sh", str(ROOT / "operator" / "entrypoint.sh"), "--verbose"],
        env={**env(docs), "PATH": f"{tmp_path}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    args = run.stdout.split()
    assert args[:2] == ["run", "-m"] and "--namespace=speech" in args and args[-1] == "--verbose"
    assert "--namespace=vision" in args and "--liveness=http://0.0.0.0:8080/healthz" in args
    if replicas > 1:
        assert "--peering=kquant" in args and "--standalone" not in args
        # kopf pauses all operators sharing the highest priority: each replica draws its own
        (priority,) = [a for a in args if a.startswith("--priority=")]
        assert 1 <= int(priority.split("=")[1]) <= 2**24
        again = subprocess.run(
            ["sh", str(ROOT / "operator" / "entrypoint.sh")],
            env={**env(docs), "PATH": f"{tmp_path}:/usr/bin:/bin"},
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.split()  # fmt: skip
        assert priority not in again  # another replica: another priority
    else:
        assert "--standalone" in args and not any(a.startswith("--p") for a in args)


def test_a_null_value_drops_a_default_key():
    """Helm merges maps; the documented way to a CPU-only default is a null GPU limit."""
    docs = render({"worker": {"resources": {"limits": {"nvidia.com/gpu": None, "cpu": "4"}}}})
    assert OperatorSettings.from_env(env(docs)).default_resources == {"limits": {"cpu": "4"}}
