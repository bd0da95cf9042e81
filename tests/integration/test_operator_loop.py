"""The whole loop: QuantizationJob -> kopf operator (real handlers, ``kopf run`` in a thread)
-> batch/v1 Job -> the real worker -> status, against the kmock Kubernetes emulator.

No cluster runs here: ``KubeEmulator`` (kube_emulator.py) is the API server, and
``JobStandIn`` (job_standin.py) plays the Job controller and kubelet, running the Job's
container command as a subprocess of the real worker against moto's S3 server, with the
credentials it resolves from the Secret stored in the emulator. See those modules for what
they emulate and what not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from job_standin import JobStandIn
from kube_emulator import EVENTS, JOBS, PODS, QJOBS, SECRETS, KubeEmulator
from operator_helpers import (
    Api,
    final_status,
    operator_running,
    silero_example,
    stored,
    upload_silero_example,
    wait_for,
)
from worker_helpers import failure_report, list_keys, published_keys

from kquant_api import NON_RETRIABLE_EXIT_CODES, JobResult, Reason
from kquant_operator.jobs import LABEL_GENERATION, LABEL_NAME, job_name

pytestmark = [pytest.mark.asyncio, pytest.mark.kmock(cls=KubeEmulator)]
NS = "speech"


@dataclass
class Loop:
    emulator: KubeEmulator
    api: Api
    kubelet: JobStandIn
    tmp: Path

    async def apply(self, qjob: dict) -> dict:
        return await self.api.create(QJOBS, qjob["metadata"]["namespace"], qjob)

    async def secret(self, name: str, key_id: str, secret: str) -> None:
        data = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}
        body = {"metadata": {"name": name}, "type": "Opaque", "stringData": data}
        await self.api.create(SECRETS, NS, body)

    def jobs_of(self, name: str) -> list[dict]:
        jobs = stored(self.emulator, JOBS, NS)
        return [j for j in jobs if j["metadata"]["labels"][LABEL_NAME] == name]

    async def final(self, name: str, timeout: float = 60) -> dict:
        return await wait_for(
            lambda: final_status(self.emulator, NS, name), timeout, f"a final status of {name}"
        )

    def events(self, name: str) -> list[tuple[str, str]]:
        return sorted(
            (e["type"], e["reason"])
            for e in stored(self.emulator, EVENTS, NS)
            if e["involvedObject"]["name"] == name
        )


@contextlib.asynccontextmanager
async def loop_for(kmock: KubeEmulator, tmp_path: Path, canned=None):
    async with (
        JobStandIn(kmock, tmp_path / "kubelet", canned) as kubelet,
        operator_running(kmock, tmp_path),
    ):
        yield Loop(kmock, Api(kmock), kubelet, tmp_path)


@pytest_asyncio.fixture
async def loop(kmock, tmp_path):
    async with loop_for(kmock, tmp_path) as running:
        yield running


def example_in(bucket: str, endpoint: str, name: str | None = None, samples: int = 100) -> dict:
    """The Silero example with its buckets moved under a fresh test bucket."""
    qjob = json.loads(
        json.dumps(silero_example(endpoint, NS, name))
        .replace("s3://models/", f"s3://{bucket}/models/")
        .replace("s3://datasets/", f"s3://{bucket}/datasets/")
    )
    qjob["spec"]["validation"]["samples"] = samples
    return qjob


def condition(status: dict, ctype: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == ctype)


async def test_example_becomes_a_job_a_validated_model_and_status(loop, s3_server, bucket):
    client = s3_server.client()
    qjob = example_in(bucket, s3_server.endpoint)
    upload_silero_example(client, qjob, loop.tmp)
    await loop.secret("s3-credentials", s3_server.access_key, s3_server.secret_key)
    cr = await loop.apply(qjob)

    [job] = await wait_for(lambda: loop.jobs_of("silero-vad-fp16"), what="the Job")
    assert job["metadata"]["name"] == job_name("silero-vad-fp16", 1) == "silero-vad-fp16-1"
    assert job["metadata"]["labels"][LABEL_GENERATION] == "1"
    [owner] = job["metadata"]["ownerReferences"]
    assert owner["kind"] == "QuantizationJob" and owner["controller"] is True
    assert owner["uid"] == cr["metadata"]["uid"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["run", "--spec-env", "KQUANT_JOB"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail_job = next(r for r in rules if r["action"] == "FailJob")
    assert fail_job["onExitCodes"]["values"] == list(NON_RETRIABLE_EXIT_CODES)
    env = {e["name"]: e for e in container["env"]}
    assert json.loads(env["KQUANT_JOB"]["value"])["spec"] == qjob["spec"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "s3-credentials", "key": key}
    assert s3_server.secret_key not in json.dumps(job)

    status = await loop.final("silero-vad-fp16")
    assert (status["phase"], status["reason"]) == ("Succeeded", "Validated"), status
    assert status["observedGeneration"] == 1 and status["jobName"] == "silero-vad-fp16-1"
    ready = condition(status, "Ready")
    assert (ready["status"], ready["observedGeneration"]) == ("True", 1)
    for ctype in ("Reconciling", "Stalled"):
        assert condition(status, ctype)["status"] == "False"
    result = status["result"]
    assert result["validation"]["passed"] and result["validation"]["samples"] == 100
    assert result["validation"]["maxAbsError"] > 0
    assert result["validation"]["cosineSimilarity"] > 0.999
    assert result["quantizedBytes"] < result["originalBytes"] and result["reductionPercent"] > 0
    out = f"s3://{bucket}/models/silero-vad/v6-fp16/"
    assert result["manifestUri"] == out + "manifest.json"
    assert result["promotedUri"] == f"s3://{bucket}/models/silero-vad/production/"
    keys = published_keys(client, bucket, "models/silero-vad/v6-fp16/")
    assert keys == ["manifest.json", "report.json", "silero_vad_fp16.onnx"]
    assert published_keys(client, bucket, "models/silero-vad/production/") == keys
    [artifact] = result["artifacts"]
    key = "models/silero-vad/v6-fp16/silero_vad_fp16.onnx"
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    sha = hashlib.sha256(body).hexdigest()
    assert artifact["uri"].startswith(out + ".kquant/sets/")  # the immutable copy
    assert artifact["uri"].endswith("/silero_vad_fp16.onnx")
    assert (artifact["sha256"], artifact["bytes"]) == (sha, len(body))
    await wait_for(lambda: ("Normal", "Succeeded") in loop.events("silero-vad-fp16"), what="events")
    assert loop.events("silero-vad-fp16") == [("Normal", "JobCreated"), ("Normal", "Succeeded")]

    # Deleting the CR removes its Job and pods through their ownerReferences (no finalizer).
    assert not cr["metadata"].get("finalizers")
    await loop.api.delete(QJOBS, NS, "silero-vad-fp16")
    assert loop.jobs_of("silero-vad-fp16") == [] and stored(loop.emulator, PODS, NS) == []


FAILURES = {
    # name: (change to the example, expected reason). 8 validation samples keep the runs
    # short. The deadline case's worker is stopped once it has fetched the model (pause_at),
    # so that the 1 s deadline cuts it mid-run on any machine, before it could publish.
    "missing-source": ({"model": {"uri": "s3://{bucket}/models/absent.onnx"}}, "SourceNotFound"),
    "tolerance": (
        {
            "quantization": {"precision": "fp16", "repair": False},
            "validation": {"tolerance": {"maxAbsError": 1e-9}},
        },
        "ValidationFailed",
    ),
    "deadline": ({"activeDeadlineSeconds": 1}, "DeadlineExceeded"),
}


@pytest.mark.parametrize("case", FAILURES)
async def test_failures_end_in_their_reason_with_nothing_published(case, loop, s3_server, bucket):
    client = s3_server.client()
    qjob = example_in(bucket, s3_server.endpoint, name=case, samples=8)
    upload_silero_example(client, qjob, loop.tmp)
    change, reason = FAILURES[case]
    change = json.loads(json.dumps(change).replace("{bucket}", bucket))
    for key, value in change.items():
        if isinstance(value, dict):
            qjob["spec"][key].update(value)
        else:
            qjob["spec"][key] = value
    await loop.secret("s3-credentials", s3_server.access_key, s3_server.secret_key)
    if case == "deadline":
        loop.kubelet.pause_at[f"{case}-1"] = "fetch: done"
    await loop.apply(qjob)
    status = await loop.final(case)
    assert (status["phase"], status["reason"]) == ("Failed", reason), status
    assert condition(status, "Stalled")["status"] == "True"
    assert condition(status, "Ready")["status"] == "False"
    out = list_keys(client, bucket, "models/silero-vad/v6-fp16/")
    assert "manifest.json" not in out
    assert not [k for k in out if not k.startswith(".kquant/")]  # no fixed name either
    assert list_keys(client, bucket, "models/silero-vad/production/") == []
    if reason == "ValidationFailed":
        report = failure_report(client, bucket, "models/silero-vad/v6-fp16/")
        assert report["outcome"]["reason"] == "ValidationFailed"
        assert not status["result"]["validation"]["passed"]
        assert "promotedUri" not in status["result"]
    await wait_for(lambda: len(loop.events(case)) == 2, what="events")
    expected = "ValidationFailed" if reason == "ValidationFailed" else "Failed"
    assert loop.events(case) == [("Normal", "JobCreated"), ("Warning", expected)]


async def test_bad_credentials_end_in_access_denied(loop, s3_auth_server):
    admin = s3_auth_server.client()
    qjob = example_in("kq-operator-auth", s3_auth_server.endpoint, samples=8)
    upload_silero_example(admin, qjob, loop.tmp)
    await loop.secret("s3-credentials", s3_auth_server.access_key, "not-the-secret")
    await loop.apply(qjob)
    status = await loop.final("silero-vad-fp16")
    assert (status["phase"], status["reason"]) == ("Failed", "AccessDenied"), status
    assert "not-the-secret" not in json.dumps(status) + json.dumps(loop.events("silero-vad-fp16"))
    keys = [o["Key"] for o in admin.list_objects_v2(Bucket="kq-operator-auth")["Contents"]]
    assert not any(k.startswith("models/silero-vad/v6-fp16/") for k in keys)


async def test_worker_killed_mid_run_publishes_nothing(loop, s3_server, bucket):
    client = s3_server.client()
    qjob = example_in(bucket, s3_server.endpoint)
    qjob["spec"]["backoffLimit"] = 0  # a killed pod (exit 137) is retriable: no retry here
    upload_silero_example(client, qjob, loop.tmp)
    await loop.secret("s3-credentials", s3_server.access_key, s3_server.secret_key)
    jname = "silero-vad-fp16-1"
    loop.kubelet.pause_at[jname] = "convert: done"  # killed after converting, before publishing
    await loop.apply(qjob)
    await wait_for(
        lambda: any("convert: done" in line for line in loop.kubelet.logs.get(jname, [])),
        what="the worker to convert",
    )
    loop.kubelet.kill(jname)
    status = await loop.final("silero-vad-fp16")
    assert (status["phase"], status["reason"]) == ("Failed", "BackoffLimitExceeded"), status
    assert "exit code 137" in status["message"]
    assert "manifest.json" not in list_keys(client, bucket, "models/silero-vad/v6-fp16/")


async def test_invalid_spec_is_rejected_before_any_job_exists(loop, s3_server, bucket):
    qjob = example_in(bucket, s3_server.endpoint)
    qjob["spec"]["quantization"]["mode"] = "dynamic"  # an int8 knob with precision fp16
    await loop.apply(qjob)
    status = await loop.final("silero-vad-fp16", timeout=20)
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec")
    assert "spec.quantization.mode" in status["message"]
    assert condition(status, "Stalled")["status"] == "True"
    await wait_for(lambda: loop.events("silero-vad-fp16"), what="the event")
    assert loop.events("silero-vad-fp16") == [("Warning", "Failed")]
    assert stored(loop.emulator, JOBS, NS) == [] and loop.kubelet.runs == {}


async def test_operator_restart_while_a_job_runs_adopts_it(
    kmock, s3_server, bucket, tmp_path, caplog
):
    client = s3_server.client()
    qjob = example_in(bucket, s3_server.endpoint)
    upload_silero_example(client, qjob, tmp_path)
    async with JobStandIn(kmock, tmp_path / "kubelet") as kubelet:
        loop = Loop(kmock, Api(kmock), kubelet, tmp_path)
        await loop.secret("s3-credentials", s3_server.access_key, s3_server.secret_key)
        jname = "silero-vad-fp16-1"
        kubelet.pause_at[jname] = "fetch: done"  # still running while the operator restarts
        async with operator_running(kmock, tmp_path):
            await loop.apply(qjob)
            await wait_for(lambda: kubelet.logs.get(jname), what="the worker")
            created = ("Normal", "JobCreated")
            await wait_for(lambda: created in loop.events("silero-vad-fp16"), what="the event")
        assert final_status(kmock, NS, "silero-vad-fp16") is None  # stopped mid-run
        assert "adopted existing Job" not in caplog.text
        kubelet.resume(jname)
        async with operator_running(kmock, tmp_path):
            status = await loop.final("silero-vad-fp16")
    assert "adopted existing Job silero-vad-fp16-1" in caplog.text  # resumed: 409, adopted
    assert status["phase"] == "Succeeded", status
    assert len(loop.jobs_of("silero-vad-fp16")) == 1 and len(kubelet.runs) == 1
    history = kmock.objects[JOBS, NS, "silero-vad-fp16-1"].history
    assert None not in history  # created once, never deleted and re-created
    assert loop.events("silero-vad-fp16").count(("Normal", "JobCreated")) == 1


def canned(job: dict) -> JobResult:
    """A real JobResult (the worker's contract type) for Jobs the stand-in does not run:
    every 10th CR fails validation, the rest succeed."""
    spec = json.loads(job["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"])
    name, out = spec["metadata"]["name"], spec["spec"]["output"]["uri"]
    passed = not name.endswith("0")
    return JobResult(
        phase="Succeeded" if passed else "Failed",
        reason=Reason.Validated if passed else Reason.ValidationFailed,
        message="" if passed else "cosine similarity 0.95 < 0.999",
        precision="fp16",
        originalBytes=2327524,
        quantizedBytes=1286255,
        validation={"passed": passed, "samples": 100, "device": "cpu", "maxAbsError": 0.17},
        artifacts=[{"uri": out + "silero_vad_fp16.onnx", "sha256": "0" * 64, "bytes": 1286255}]
        if passed
        else [],
        manifestUri=out + "manifest.json" if passed else None,
    )


async def test_a_hundred_jobs_at_once_each_get_one_job_and_a_final_status(kmock, tmp_path):
    """100 CRs applied at once; the stand-in completes their Jobs with canned JobResults
    (see :func:`canned`) instead of running 100 workers."""
    async with loop_for(kmock, tmp_path, canned) as loop:
        names = [f"qj-{i:03d}" for i in range(100)]
        qjobs = [example_in("bucket", "http://127.0.0.1:1", name=n) for n in names]
        await asyncio.gather(*(loop.apply(q) for q in qjobs))
        statuses = {n: await loop.final(n, timeout=120) for n in names}
    jobs = stored(kmock, JOBS, NS)
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(f"{n}-1" for n in names)
    assert len(loop.kubelet.runs) == 100
    for name, status in statuses.items():
        expected = "ValidationFailed" if name.endswith("0") else "Validated"
        assert status["reason"] == expected and status["jobName"] == f"{name}-1"


async def test_a_spec_change_replaces_the_job_of_the_previous_generation(kmock, tmp_path):
    async with loop_for(kmock, tmp_path, canned) as loop:
        await loop.apply(example_in("bucket", "http://127.0.0.1:1", name="qj-1"))
        first = await loop.final("qj-1")
        assert first["observedGeneration"] == 1
        change = {"spec": {"output": {"uri": "s3://bucket/models/silero-vad/v7-fp16/"}}}
        await loop.api.patch(QJOBS, NS, "qj-1", change)
        status = await wait_for(
            lambda: (s := final_status(kmock, NS, "qj-1")) and s["observedGeneration"] == 2 and s,
            what="generation 2's status",
        )
    assert status["jobName"] == "qj-1-2"
    assert status["result"]["manifestUri"] == "s3://bucket/models/silero-vad/v7-fp16/manifest.json"
    assert [j["metadata"]["name"] for j in loop.jobs_of("qj-1")] == ["qj-1-2"]
    assert {p["metadata"]["labels"][LABEL_GENERATION] for p in stored(kmock, PODS, NS)} == {"2"}


async def test_only_the_configured_namespaces_are_handled(kmock, tmp_path, monkeypatch):
    """KQUANT_WATCH_NAMESPACES limits the handlers even when kopf watches every namespace."""
    monkeypatch.setenv("KQUANT_WATCH_NAMESPACES", NS)
    async with loop_for(kmock, tmp_path, canned) as loop:
        outside = example_in("bucket", "http://127.0.0.1:1", name="qj-outside")
        outside["metadata"]["namespace"] = "elsewhere"
        await loop.apply(outside)
        await loop.apply(example_in("bucket", "http://127.0.0.1:1", name="qj-inside"))
        await loop.final("qj-inside")
    assert [j["metadata"]["namespace"] for j in stored(kmock, JOBS, NS)] == [NS]
    assert stored(kmock, JOBS, "elsewhere") == []
    [other] = stored(kmock, QJOBS, "elsewhere")
    assert "status" not in other


async def test_a_finished_run_is_not_repeated_after_its_job_expired(kmock, tmp_path, caplog):
    """After ttlSecondsAfterFinished removes the Job, a restarted operator keeps the verdict
    and creates no second Job for the same generation."""
    async with loop_for(kmock, tmp_path, canned) as loop:
        await loop.apply(example_in("bucket", "http://127.0.0.1:1", name="qj-1"))
        before = await loop.final("qj-1")
    await loop.api.delete(JOBS, NS, "qj-1-1")  # what the TTL controller does
    async with operator_running(kmock, tmp_path):
        await wait_for(lambda: "already finished: no Job" in caplog.text, what="the resume")
    assert stored(kmock, JOBS, NS) == [] and len(loop.kubelet.runs) == 1
    assert final_status(kmock, NS, "qj-1") == before


async def test_a_job_deleted_mid_run_ends_its_generation_in_job_deleted(kmock, tmp_path):
    """The Job of a running generation deleted by a person: the status says so (before: it
    stayed Running for good, and an operator restart ran the conversion again)."""
    release = asyncio.Event()

    async def held(job: dict) -> JobResult:
        await release.wait()
        return canned(job)

    async with loop_for(kmock, tmp_path, held) as loop:
        await loop.apply(example_in("bucket", "http://127.0.0.1:1", name="qj-1"))
        await wait_for(
            lambda: status_of(kmock, "qj-1").get("phase") == "Running",
            what="the run",
        )
        await loop.api.delete(JOBS, NS, "qj-1-1")
        status = await loop.final("qj-1")
        release.set()
    assert (status["phase"], status["reason"]) == ("Failed", "JobDeleted")
    assert condition(status, "Stalled")["status"] == "True"
    assert "not run again" in status["message"]
    async with operator_running(kmock, tmp_path):  # a restart does not run it again
        await asyncio.sleep(2)
    assert stored(kmock, JOBS, NS) == [] and final_status(kmock, NS, "qj-1") == status


async def test_a_foreign_job_holding_the_name_is_left_and_reported(kmock, tmp_path):
    foreign = {"metadata": {"name": "qj-1-1"}, "spec": {"template": {"spec": {"containers": []}}}}
    async with loop_for(kmock, tmp_path, canned) as loop:
        await loop.api.create(JOBS, NS, foreign)
        await loop.apply(example_in("bucket", "http://127.0.0.1:1", name="qj-1"))
        status = await wait_for(
            lambda: (s := status_of(kmock, "qj-1")).get("reason") == "JobNameTaken" and s,
            what="the blocked status",
        )
    assert status["phase"] == "Pending" and condition(status, "Stalled")["status"] == "True"
    assert condition(status, "Ready")["status"] == "False"
    assert "not created for this QuantizationJob" in status["message"]
    [job] = stored(kmock, JOBS, NS)
    assert not job["metadata"].get("ownerReferences")  # neither adopted nor replaced


@pytest.mark.parametrize(
    ("message", "reason", "stalled"),
    [
        # a ResourceQuota on count/jobs.batch: frees up as other Jobs finish
        ('jobs.batch "qj-1-1" is forbidden: exceeded quota: jobs, requested: count/jobs.batch=1,'
         " used: count/jobs.batch=4, limited: count/jobs.batch=4", "QuotaExceeded", "False"),
        # an admission plugin (or RBAC): someone must act
        ('jobs.batch "qj-1-1" is forbidden: admission webhook "policy.example.com" denied the '
         "request: GPU jobs need a cost-center label", "JobForbidden", "True"),
    ],
)  # fmt: skip
async def test_a_refused_job_create_is_reported_and_tried_again(
    kmock, tmp_path, monkeypatch, message, reason, stalled
):
    """A 403 on the Job create: the status says why, and the create is tried again once the
    refusal is gone. A quota is waited for (Reconciling), not Stalled: Argo CD and Flux read
    Stalled as Degraded and failed a promotion that only had to wait for a free slot."""
    import kquant_operator.handlers as handlers

    monkeypatch.setattr(handlers, "BLOCKED_DELAY", 1.0)
    kmock.refusals[(JOBS, kmock_action_create())] = (403, "Forbidden", message)
    async with loop_for(kmock, tmp_path, canned) as loop:
        await loop.apply(example_in("bucket", "http://127.0.0.1:1", name="qj-1"))
        blocked = await wait_for(
            lambda: (s := status_of(kmock, "qj-1")).get("reason") == reason and s,
            what="the refused create",
        )
        assert message in blocked["message"] and blocked["phase"] == "Pending"
        assert condition(blocked, "Stalled")["status"] == stalled
        assert condition(blocked, "Reconciling")["status"] == (
            "False" if stalled == "True" else "True"
        )
        kmock.refusals.clear()
        status = await loop.final("qj-1")
    assert status["reason"] == "Validated" and status["jobName"] == "qj-1-1"


def status_of(kmock: KubeEmulator, name: str) -> dict:
    """The CR's status as it is now (any phase)."""
    for obj in stored(kmock, QJOBS, NS):
        if obj["metadata"]["name"] == name:
            return obj.get("status") or {}
    return {}


def kmock_action_create():
    import kmock

    return kmock.action.CREATE


async def test_a_job_gone_while_the_operator_was_down_is_not_run_again(kmock, tmp_path):
    """The Job ran (the status saw it start), finished and was removed by its TTL while the
    operator was down: the restarted operator reports JobDeleted rather than creating the
    Job again (before: a second run of the same generation)."""
    release = asyncio.Event()

    async def held(job: dict) -> JobResult:
        await release.wait()
        return canned(job)

    def complete() -> bool:
        jobs = stored(kmock, JOBS, NS)
        conds = (jobs[0].get("status") or {}).get("conditions") or [] if jobs else []
        return any(c["type"] == "Complete" for c in conds)

    api = Api(kmock)
    async with JobStandIn(kmock, tmp_path / "kubelet", held) as kubelet:
        async with operator_running(kmock, tmp_path):
            await api.create(QJOBS, NS, example_in("bucket", "http://127.0.0.1:1", name="qj-1"))
            await wait_for(lambda: status_of(kmock, "qj-1").get("phase") == "Running", what="run")
        release.set()
        await wait_for(complete, what="the Job's completion")
        await api.delete(JOBS, NS, "qj-1-1")  # what the TTL controller does
        async with operator_running(kmock, tmp_path):
            status = await wait_for(lambda: final_status(kmock, NS, "qj-1"), what="a verdict")
        assert len(kubelet.runs) == 1
    assert (status["phase"], status["reason"]) == ("Failed", "JobDeleted")
    assert stored(kmock, JOBS, NS) == []


@pytest.mark.parametrize("scope", ["cluster", "namespaced"])
async def test_a_status_refused_through_a_burst_of_conflicts_is_written_later(
    kmock, tmp_path, monkeypatch, scope
):
    """Fault-injection trial: the Job completed while the API server answered 409 to every
    status write; the event handler gave up after its 8 tries, no further Job event came,
    and the CR stayed Running for good. The resync loop writes it once the API answers."""
    import kquant_operator.handlers as handlers

    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 1.0)
    namespaces = (NS,) if scope == "namespaced" else ()
    if namespaces:  # the resync lists the watched namespace, not all of them
        monkeypatch.setenv("KQUANT_WATCH_NAMESPACES", NS)
    release = asyncio.Event()

    async def held(job: dict) -> JobResult:
        await release.wait()
        return canned(job)

    api = Api(kmock)
    conflict = (409, "Conflict", "the object has been modified; please apply your changes")
    running = operator_running(kmock, tmp_path, namespaces)
    async with JobStandIn(kmock, tmp_path / "kubelet", held), running:
        await api.create(QJOBS, NS, example_in("bucket", "http://127.0.0.1:1", name="qj-1"))
        await wait_for(lambda: status_of(kmock, "qj-1").get("phase") == "Running", what="run")
        kmock.refusals[(QJOBS, kmock_action_update())] = conflict
        release.set()
        jobs = stored(kmock, JOBS, NS)
        await wait_for(
            lambda: any(c["type"] == "Complete" for c in
                        (stored(kmock, JOBS, NS)[0].get("status") or {}).get("conditions") or []),
            what="the Job's completion",
        )  # fmt: skip
        await asyncio.sleep(1.5)  # the Job event's tries are spent (Conflicts retry at once)
        assert status_of(kmock, "qj-1").get("phase") == "Running" and len(jobs) == 1
        kmock.refusals.clear()
        status = await wait_for(lambda: final_status(kmock, NS, "qj-1"), what="a verdict")

        def verdict_events() -> list[dict]:
            named = [e for e in stored(kmock, EVENTS, NS) if e["involvedObject"]["name"] == "qj-1"]
            return [e for e in named if e["reason"] == "Succeeded"]

        # its Event too, posted by the resync itself (trial: kopf has no poster there, the
        # Event was lost and the resync logged a failure)
        [event] = await wait_for(verdict_events, what="the verdict's Event")
    assert (status["phase"], status["reason"]) == ("Succeeded", "Validated")
    assert event["type"] == "Normal" and event["involvedObject"]["kind"] == "QuantizationJob"


async def test_a_running_cr_holds_no_finalizer_and_is_deleted_while_the_operator_is_down(
    kmock, tmp_path
):
    """The resync was a kopf timer, and kopf puts a finalizer on every object a timer serves:
    a CR without a verdict could not be deleted while the operator was down or uninstalled
    (the emulator, like an API server, keeps an object until its finalizers are removed)."""
    release = asyncio.Event()

    async def held(job: dict) -> JobResult:
        await release.wait()
        return canned(job)

    api = Api(kmock)
    async with JobStandIn(kmock, tmp_path / "kubelet", held):
        async with operator_running(kmock, tmp_path):
            await api.create(QJOBS, NS, example_in("bucket", "http://127.0.0.1:1", name="qj-1"))
            await wait_for(lambda: status_of(kmock, "qj-1").get("phase") == "Running", what="run")
            await asyncio.sleep(0.5)  # what kopf would do after the handlers, it has done
            [cr] = stored(kmock, QJOBS, NS)
            assert not cr["metadata"].get("finalizers")
        await api.delete(QJOBS, NS, "qj-1")  # the operator is stopped
        assert stored(kmock, QJOBS, NS) == []
        release.set()


async def test_the_finalizer_an_earlier_operator_put_on_a_cr_is_taken_off(kmock, tmp_path):
    """CRs of the stop that ran the resync as a kopf timer hold kopf's finalizer: the
    operator takes it off when it starts, so they can be deleted again."""
    release = asyncio.Event()

    async def held(job: dict) -> JobResult:
        await release.wait()
        return canned(job)

    api = Api(kmock)
    doc = example_in("bucket", "http://127.0.0.1:1", name="qj-1")
    doc["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker"]
    async with JobStandIn(kmock, tmp_path / "kubelet", held):
        await api.create(QJOBS, NS, doc)
        async with operator_running(kmock, tmp_path):
            await wait_for(
                lambda: not (stored(kmock, QJOBS, NS)[0]["metadata"].get("finalizers")),
                what="the finalizer taken off",
            )
        await api.delete(QJOBS, NS, "qj-1")
        assert stored(kmock, QJOBS, NS) == []
        release.set()


def kmock_action_update():
    import kmock

    return kmock.action.UPDATE
