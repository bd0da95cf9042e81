"""build_job: the batch/v1 Job for a QuantizationJob, field by field, checked against the
Kubernetes 1.31 OpenAPI schema (kubernetes-validate, strict: unknown fields fail)."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping

import kubernetes_validate
import pytest
from operator_objects import CR_UID, qjob

from kquant_api import NON_RETRIABLE_EXIT_CODES, QuantizationJob
from kquant_job.manifest import load_jobs
from kquant_job.storage.s3_transfer import MIB, TransferSettings
from kquant_operator.jobs import (
    InvalidQuantizationJob,
    build_job,
    job_name,
    parse_qjob,
)
from kquant_operator.settings import S3_TRANSFER_VARIABLES, OperatorSettings, resync_seconds

K8S_VERSION = "1.31.0"  # first release with podFailurePolicy and DisruptionTarget GA
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SETTINGS = OperatorSettings(
    allowed_service_accounts=("kquant-*",), allowed_priority_classes=("batch-*",)
)


def _pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def _env(job: dict) -> dict[str, dict]:
    return {e["name"]: e for e in _pod(job)["containers"][0]["env"]}


def test_job_validates_against_the_kubernetes_schema_and_the_check_is_live():
    job = build_job(qjob(), SETTINGS)
    assert kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    broken = copy.deepcopy(job)
    _pod(broken)["containers"][0]["securityContext"]["readOnlyRootFS"] = True  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_every_option_still_validates():
    cr = qjob(
        queueName="gpu-queue",
        serviceAccountName="kquant-worker",
        nodeSelector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a"]}]}
                    ]
                }
            }
        },
        priorityClassName="batch-low",
        resources={"limits": {"nvidia.com/gpu": 2, "memory": "16Gi", "ephemeral-storage": "80Gi"}},
        activeDeadlineSeconds=600,
        backoffLimit=0,
    )
    assert kubernetes_validate.validate(build_job(cr, SETTINGS), K8S_VERSION, strict=True)


def test_same_input_gives_an_equal_job_that_shares_nothing():
    cr = qjob()
    first, second = build_job(cr, SETTINGS), build_job(copy.deepcopy(cr), SETTINGS)
    assert first == second
    first["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "1"
    assert SETTINGS.default_resources == {"limits": {"nvidia.com/gpu": "1"}}
    assert build_job(cr, SETTINGS) == second


def test_name_labels_and_owner_reference():
    job = build_job(qjob(generation=4), SETTINGS)
    meta = job["metadata"]
    assert meta["name"] == "silero-vad-fp16-4"
    assert meta["namespace"] == "speech"
    assert meta["labels"] == {
        "app.kubernetes.io/name": "kquant",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "kquant-operator",
        "app.kubernetes.io/instance": "silero-vad-fp16",
        "kquant.io/name": "silero-vad-fp16",
        "kquant.io/generation": "4",
    }
    assert job["spec"]["template"]["metadata"]["labels"] == meta["labels"]
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "kquant.io/v1alpha1",
            "kind": "QuantizationJob",
            "name": "silero-vad-fp16",
            "uid": CR_UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    # Nothing else of the CR's metadata leaks into the Job (annotations, managedFields).
    assert "annotations" not in meta and "managedFields" not in meta


@pytest.mark.parametrize("missing", ["uid", "generation", "name"])
def test_server_metadata_is_required(missing):
    cr = qjob()
    del cr["metadata"][missing]
    with pytest.raises(ValueError, match=re.escape(f"metadata.{missing}")) as info:
        build_job(cr, SETTINGS)
    assert not isinstance(info.value, InvalidQuantizationJob)


def test_long_and_dotted_names_give_short_distinct_stable_job_names():
    long_a, long_b = "a" * 100 + "-model-one", "a" * 100 + "-model-two"
    names = {job_name(n, g) for n in (long_a, long_b, "vad.v2", "vad-v2") for g in (1, 12345)}
    assert len(names) == 8
    for name in names:
        assert len(name) <= 63 and DNS_LABEL.match(name), name
    assert job_name(long_a, 7) == job_name(long_a, 7)
    assert job_name(long_a, 7).endswith("-7")
    cr = qjob()
    cr["metadata"]["name"] = "x" * 253
    job = build_job(cr, SETTINGS)
    assert len(job["metadata"]["name"]) <= 63
    for value in job["metadata"]["labels"].values():
        assert len(value) <= 63
    assert job["metadata"]["ownerReferences"][0]["name"] == "x" * 253
    assert kubernetes_validate.validate(job, K8S_VERSION, strict=True)


@pytest.mark.parametrize("generation", [0, -1, None, "1", True])
def test_job_name_rejects_bad_generations(generation):
    with pytest.raises(ValueError, match=re.escape("metadata.generation")):
        job_name("vad", generation)


def test_spec_travels_as_json_and_round_trips_through_the_worker(monkeypatch):
    cr = qjob()
    job = build_job(cr, SETTINGS)
    container = _pod(job)["containers"][0]
    assert container["command"] == ["kquant-job"]
    assert container["args"] == ["run", "--spec-env", "KQUANT_JOB"]
    payload = json.loads(_env(job)["KQUANT_JOB"]["value"])
    assert QuantizationJob.model_validate(payload).spec == parse_qjob(cr).spec
    assert payload["metadata"] == {
        "name": "silero-vad-fp16",
        "namespace": "speech",
        "generation": 1,
        "uid": CR_UID,
    }
    # Unset fields stay unset: no operator-side defaults reach the worker.
    assert "enabled" not in payload["spec"]["validation"]
    monkeypatch.setenv("KQUANT_JOB", _env(job)["KQUANT_JOB"]["value"])
    (loaded,) = load_jobs("-", spec_env="KQUANT_JOB")
    assert loaded.spec == parse_qjob(cr).spec
    assert _env(job)["KQUANT_WORK_DIR"] == {"name": "KQUANT_WORK_DIR", "value": "/work"}


def test_s3_transfer_settings_reach_the_worker_and_parse_there():
    assert not [k for k in _env(build_job(qjob(), SETTINGS)) if k.startswith("KQUANT_S3_")]
    settings = OperatorSettings.from_env(
        {"KQUANT_S3_MULTIPART_CHUNKSIZE_MIB": "64", "KQUANT_S3_MAX_CONCURRENCY": "4"}
    )
    env = {k: v["value"] for k, v in _env(build_job(qjob(), settings)).items() if "value" in v}
    worker = TransferSettings.from_env(env)
    assert (worker.multipart_chunksize, worker.max_concurrency) == (64 * MIB, 4)
    assert worker.read_timeout == TransferSettings().read_timeout
    for name in S3_TRANSFER_VARIABLES:  # the operator's list names only what the worker reads
        assert TransferSettings.from_env({name: "3"}) != TransferSettings(), name


def test_credentials_only_by_secret_key_ref():
    cr = qjob()
    sentinel = "wJalrXUtnFEMI-not-a-real-secret"
    cr["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = sentinel
    job = build_job(cr, SETTINGS)
    env = _env(job)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        assert "value" not in env[key]
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("s3-credentials", key)
        assert ref.get("optional", False) is (key == "AWS_SESSION_TOKEN")
    assert sentinel not in json.dumps(job)
    cr["spec"]["storage"].pop("secretRef")
    assert not [k for k in _env(build_job(cr, SETTINGS)) if k.startswith("AWS_")]


def test_restricted_pod_security():
    job = build_job(qjob(), SETTINGS)
    pod = _pod(job)
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == {"/work", "/tmp"}
    assert volumes[mounts["/work"]]["emptyDir"] == {"sizeLimit": "50Gi"}
    assert volumes[mounts["/tmp"]]["emptyDir"] == {"sizeLimit": "1Gi"}
    with_sa = _pod(build_job(qjob(serviceAccountName="kquant-irsa"), SETTINGS))
    assert with_sa["serviceAccountName"] == "kquant-irsa"
    assert "automountServiceAccountToken" not in with_sa


def test_pod_failure_policy_fails_at_once_on_non_retriable_codes_and_ignores_disruption():
    job = build_job(qjob(), SETTINGS)
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    ignore = [r for r in rules if r["action"] == "Ignore"]
    assert len(fail) == 1 and len(ignore) == 1
    assert fail[0]["onExitCodes"] == {
        "containerName": _pod(job)["containers"][0]["name"],
        "operator": "In",
        "values": list(NON_RETRIABLE_EXIT_CODES),
    }
    assert ignore[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert rules.index(ignore[0]) < rules.index(fail[0])
    assert job["spec"]["backoffLimit"] == 1
    assert job["spec"]["activeDeadlineSeconds"] == 7200
    assert job["spec"]["ttlSecondsAfterFinished"] == 86400
    own = build_job(qjob(backoffLimit=3, activeDeadlineSeconds=900), SETTINGS)
    assert (own["spec"]["backoffLimit"], own["spec"]["activeDeadlineSeconds"]) == (3, 900)
    # the sandboxed model stage ends itself first, so the failure keeps its reason and report
    env = {e["name"]: e.get("value") for e in _pod(own)["containers"][0]["env"]}
    assert env["KQUANT_SANDBOX_TIMEOUT_SECONDS"] == "810"
    env = {e["name"]: e.get("value") for e in _pod(job)["containers"][0]["env"]}
    assert env["KQUANT_SANDBOX_TIMEOUT_SECONDS"] == "6480"
    short = build_job(qjob(activeDeadlineSeconds=30), SETTINGS)
    assert {e["name"]: e.get("value") for e in _pod(short)["containers"][0]["env"]}[
        "KQUANT_SANDBOX_TIMEOUT_SECONDS"
    ] == "60"


def test_resources_default_to_one_gpu_and_the_spec_replaces_them():
    job = build_job(qjob(), SETTINGS)
    assert _pod(job)["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    cr = qjob(resources={"limits": {"cpu": 4, "memory": "8Gi", "ephemeral-storage": "20Gi"}})
    pod = _pod(build_job(cr, SETTINGS))
    assert pod["containers"][0]["resources"] == {
        "limits": {"cpu": "4", "memory": "8Gi", "ephemeral-storage": "20Gi"}
    }
    work = next(v for v in pod["volumes"] if v["name"] == "work")
    assert work["emptyDir"]["sizeLimit"] == "20Gi"
    # the worker learns the limit (statvfs does not show it) and bounds its downloads by it
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["KQUANT_WORK_BYTES"] == {"name": "KQUANT_WORK_BYTES", "value": str(20 * 2**30)}
    default = {e["name"]: e for e in _pod(build_job(qjob(), SETTINGS))["containers"][0]["env"]}
    assert default["KQUANT_WORK_BYTES"]["value"] == str(50 * 2**30)


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        ({"limits": {"memory": "16GB"}}, "spec.resources.limits.memory"),
        ({"limit": {"memory": "16Gi"}}, "spec.resources.limit"),
        ({"requests": ["cpu"]}, "spec.resources.requests"),
    ],
)
def test_malformed_resources_are_an_invalid_spec(resources, field):
    with pytest.raises(InvalidQuantizationJob, match=re.escape(field)):
        build_job(qjob(resources=resources), SETTINGS)


def test_kueue_queue_label_and_suspend():
    plain = build_job(qjob(), SETTINGS)
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]
    assert "suspend" not in plain["spec"]
    queued = build_job(qjob(queueName="gpu-queue"), SETTINGS)
    assert queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert queued["spec"]["suspend"] is True
    assert "kueue.x-k8s.io/queue-name" not in queued["spec"]["template"]["metadata"]["labels"]
    default_queue = OperatorSettings(default_queue_name="team-a")
    labels = build_job(qjob(), default_queue)["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a"


def test_placement_from_spec_or_settings_defaults():
    settings = OperatorSettings(
        worker_image="registry.local/kquant-job:dev",
        image_pull_policy="Always",
        default_node_selector={"pool": "gpu"},
        default_tolerations=[{"key": "gpu", "operator": "Exists"}],
        default_priority_class_name="batch",
        allowed_images=("my/worker:*",),
        allowed_priority_classes=("hi",),
    )
    pod = _pod(build_job(qjob(), settings))
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert pod["priorityClassName"] == "batch"
    assert pod["containers"][0]["image"] == "registry.local/kquant-job:dev"
    assert pod["containers"][0]["imagePullPolicy"] == "Always"
    assert "affinity" not in pod and "imagePullSecrets" not in pod
    private = OperatorSettings(image_pull_secrets=("registry-creds",))
    assert _pod(build_job(qjob(), private))["imagePullSecrets"] == [{"name": "registry-creds"}]
    with pytest.raises(ValueError, match="KQUANT_IMAGE_PULL_SECRETS"):
        OperatorSettings.from_env({"KQUANT_IMAGE_PULL_SECRETS": "ok,Not_A_Name"})
    assert OperatorSettings.from_env(
        {"KQUANT_IMAGE_PULL_SECRETS": " a, b.c "}
    ).image_pull_secrets == (
        "a",
        "b.c",
    )
    own = _pod(
        build_job(
            qjob(nodeSelector={}, tolerations=[], image="my/worker:1", priorityClassName="hi"),
            settings,
        )
    )
    assert "nodeSelector" not in own and "tolerations" not in own
    assert own["containers"][0]["image"] == "my/worker:1"
    assert own["priorityClassName"] == "hi"
    # An empty image string means "the default".
    assert _pod(build_job(qjob(image=""), settings))["containers"][0]["image"] == (
        "registry.local/kquant-job:dev"
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: s["quantization"].update(keepIOTypes=True), "spec.quantization.keepIOTypes"),
        (lambda s: s["quantization"].update(mode="static"), "spec.quantization.mode"),
        (lambda s: s["model"].update(uri="gs://bucket/m.onnx"), "spec.model.uri"),
        (lambda s: s.update(backoffLimit=-1), "spec.backoffLimit"),
    ],
)
def test_invalid_spec_raises_naming_the_field(change, field):
    cr = qjob()
    change(cr["spec"])
    with pytest.raises(InvalidQuantizationJob, match=re.escape(field)) as info:
        build_job(cr, SETTINGS)
    assert isinstance(info.value, ValueError)


class _View(Mapping):
    """A read-only mapping, as kopf hands a body to handlers."""

    def __init__(self, data: dict) -> None:
        self._data = data

    def __getitem__(self, key: str) -> object:
        value = self._data[key]
        return _View(value) if isinstance(value, dict) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_accepts_a_read_only_mapping_body():
    cr = qjob()
    assert build_job(_View(cr), SETTINGS) == build_job(cr, SETTINGS)


def test_settings_from_environment():
    assert OperatorSettings.from_env({}) == OperatorSettings()
    assert OperatorSettings.from_env({}).cluster_wide
    settings = OperatorSettings.from_env(
        {
            "KQUANT_WORKER_IMAGE": "registry.local/kquant-job:0.2.0",
            "KQUANT_IMAGE_PULL_POLICY": "Always",
            "KQUANT_WATCH_NAMESPACES": "speech, vision,",
            "KQUANT_DEFAULT_RESOURCES": '{"limits": {"nvidia.com/gpu": 1, "memory": "24Gi"}}',
            "KQUANT_DEFAULT_NODE_SELECTOR": '{"pool": "gpu"}',
            "KQUANT_DEFAULT_TOLERATIONS": '[{"key": "gpu", "operator": "Exists"}]',
            "KQUANT_DEFAULT_QUEUE_NAME": "team-a",
            "KQUANT_DEFAULT_PRIORITY_CLASS_NAME": "batch",
            "KQUANT_JOB_TTL_SECONDS": "0",
            "KQUANT_ACTIVE_DEADLINE_SECONDS": "600",
            "KQUANT_BACKOFF_LIMIT": "0",
            "KQUANT_WORK_VOLUME_SIZE": "200Gi",
            "KQUANT_LIVENESS_PORT": "9090",
            "HOME": "/root",
        }
    )
    assert settings.watch_namespaces == ("speech", "vision") and not settings.cluster_wide
    assert settings.default_resources == {"limits": {"nvidia.com/gpu": "1", "memory": "24Gi"}}
    assert (settings.ttl_seconds_after_finished, settings.liveness_port) == (0, 9090)
    job = build_job(qjob(), settings)
    pod = _pod(job)
    assert job["spec"]["ttlSecondsAfterFinished"] == 0
    assert (job["spec"]["activeDeadlineSeconds"], job["spec"]["backoffLimit"]) == (600, 0)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert pod["containers"][0]["resources"]["limits"]["memory"] == "24Gi"
    assert next(v for v in pod["volumes"] if v["name"] == "work")["emptyDir"] == {
        "sizeLimit": "200Gi"
    }
    assert kubernetes_validate.validate(job, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KQUANT_IMAGE_PULL_POLICY", "Sometimes"),
        ("KQUANT_WATCH_NAMESPACES", "speech,Vision_NS"),
        ("KQUANT_DEFAULT_RESOURCES", "{limits: 1}"),
        ("KQUANT_DEFAULT_RESOURCES", '{"limits": {"memory": "16GB"}}'),
        ("KQUANT_DEFAULT_NODE_SELECTOR", '{"pool": 1}'),
        ("KQUANT_DEFAULT_TOLERATIONS", '{"key": "gpu"}'),
        ("KQUANT_JOB_TTL_SECONDS", "a day"),
        ("KQUANT_ACTIVE_DEADLINE_SECONDS", "0"),
        ("KQUANT_BACKOFF_LIMIT", "-1"),
        ("KQUANT_WORK_VOLUME_SIZE", "lots"),
        ("KQUANT_LIVENESS_PORT", "70000"),
        ("KQUANT_S3_MAX_CONCURRENCY", "0"),
        ("KQUANT_S3_READ_TIMEOUT", "inf"),
        ("KQUANT_S3_PART_SIZE", "64"),  # a typo of a known name fails at start-up
    ],
)
def test_bad_settings_name_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        OperatorSettings.from_env({name: value})


@pytest.mark.parametrize("raw", ["soon", "0", "-5", "inf", "nan"])
def test_a_malformed_resync_interval_names_its_variable(raw: str) -> None:
    with pytest.raises(ValueError, match=f"KQUANT_RESYNC_SECONDS: .*{re.escape(repr(raw))}"):
        resync_seconds({"KQUANT_RESYNC_SECONDS": raw})


def test_the_resync_interval_defaults_to_a_minute() -> None:
    assert resync_seconds({}) == 60.0
    assert resync_seconds({"KQUANT_RESYNC_SECONDS": ""}) == 60.0
    assert resync_seconds({"KQUANT_RESYNC_SECONDS": "2.5"}) == 2.5


def test_only_the_worker_image_and_allowed_images_and_service_accounts_run():
    """Whoever may create a QuantizationJob gets a pod: any image as any ServiceAccount of
    the namespace would be any code with any identity there (operator trial)."""
    plain = OperatorSettings()
    with pytest.raises(
        InvalidQuantizationJob, match=r"spec.image: 'evil/miner:1'.*KQUANT_ALLOWED_IMAGES"
    ):
        build_job(qjob(image="evil/miner:1"), plain)
    with pytest.raises(InvalidQuantizationJob, match=r"spec.serviceAccountName: 'admin'"):
        build_job(qjob(serviceAccountName="admin"), plain)
    assert build_job(qjob(image=plain.worker_image), plain)  # the worker image itself
    listed = OperatorSettings.from_env({
        "KQUANT_ALLOWED_IMAGES": " registry.local/kquant/* , ghcr.io/kquant/kquant-job:0.2.?",
        "KQUANT_ALLOWED_SERVICE_ACCOUNTS": "kquant-irsa,team-*",
    })  # fmt: skip
    for image in ("registry.local/kquant/job:dev", "ghcr.io/kquant/kquant-job:0.2.1"):
        assert _pod(build_job(qjob(image=image), listed))["containers"][0]["image"] == image
    with pytest.raises(InvalidQuantizationJob):
        build_job(qjob(image="registry.local/other/job:dev"), listed)
    with pytest.raises(InvalidQuantizationJob, match="lower-case host"):
        build_job(qjob(image="REGISTRY.local/kquant/job:dev"), listed)  # mirrors: as written
    with pytest.raises(InvalidQuantizationJob, match="not an image reference"):
        build_job(qjob(image="registry.local/Kquant/job:dev"), listed)  # paths: lower case
    assert _pod(build_job(qjob(serviceAccountName="team-a"), listed))["serviceAccountName"]
    with pytest.raises(InvalidQuantizationJob):
        build_job(qjob(serviceAccountName="default"), listed)
    with pytest.raises(ValueError, match="KQUANT_ALLOWED_IMAGES"):
        OperatorSettings.from_env({"KQUANT_ALLOWED_IMAGES": "a b"})


def test_a_spec_past_the_annotation_budget_is_refused_naming_its_size():
    """kopf keeps the spec in an annotation (256 KiB in all on a real API server): past it,
    a spec change ran as a create beside the older generation's Job (operator trial)."""
    names = [f"/encoder/layer.{i}/attention/self/MatMul_{j}" for i in range(400) for j in range(20)]
    big = qjob(quantization={"precision": "int8", "nodesToExclude": names})
    with pytest.raises(
        InvalidQuantizationJob, match=r"spec: \d+ bytes, more than the 98304 bytes \(96 KiB\)"
    ):
        build_job(big, SETTINGS)
    fits = qjob(quantization={"precision": "int8", "nodesToExclude": names[:1000]})
    assert build_job(fits, SETTINGS)
