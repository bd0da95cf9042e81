"""A verdict stays, and only kquant's own Job drives a QuantizationJob (operator trial, stop
22): kopf and the real handlers against the Kubernetes emulator, the Job stand-in running
the Jobs' pods."""

from __future__ import annotations

import asyncio
import copy

import pytest
from job_standin import JobStandIn
from kube_emulator import JOBS, PODS, QJOBS, KubeEmulator
from operator_helpers import Api, final_status, operator_running, stored, wait_for
from test_operator_loop import NS, canned, example_in, status_of

from kquant_api import JobResult, Reason
from kquant_operator.jobs import _short_hash, job_name

pytestmark = [pytest.mark.asyncio, pytest.mark.kmock(cls=KubeEmulator)]


def history(kmock: KubeEmulator, name: str) -> list[tuple[str, str, str]]:
    """Each stored version of the CR's status, in order: (phase, reason, jobName)."""
    out: list[tuple[str, str, str]] = []
    for raw in kmock.objects[QJOBS, NS, name].history:
        st = (raw or {}).get("status") or {}
        item = (st.get("phase"), st.get("reason"), st.get("jobName"))
        if st and (not out or out[-1] != item):
            out.append(item)
    return out


async def _succeeded_then_pod_gone(kmock: KubeEmulator, api: Api, name: str) -> None:
    await wait_for(lambda: final_status(kmock, NS, name), 30, "verdict")
    for pod in stored(kmock, PODS, NS):
        if pod["metadata"]["labels"].get("kquant.io/name") == name:
            await api.delete(PODS, NS, pod["metadata"]["name"])  # pod GC, a node scaled away


async def test_a_verdict_stays_when_its_pod_is_gone_and_the_operator_restarts(kmock, tmp_path):
    """Before, the restart's listing of the Job (Complete, no pod left) derived NoResult and
    overwrote Succeeded, clearing status.result: Argo CD and Flux then saw a failure."""
    api = Api(kmock)
    async with JobStandIn(kmock, tmp_path / "kubelet", canned):
        async with operator_running(kmock, tmp_path):
            await api.create(QJOBS, NS, example_in("bucket", "http://127.0.0.1:1", name="qj-1"))
            await _succeeded_then_pod_gone(kmock, api, "qj-1")
            # any later change of the Job (a label, the TTL controller's foreground delete)
            await api.patch(JOBS, NS, "qj-1-1", {"metadata": {"labels": {"team": "speech"}}})
            await asyncio.sleep(1)
        async with operator_running(kmock, tmp_path):  # an upgrade, a reschedule
            await asyncio.sleep(2)
    status = status_of(kmock, "qj-1")
    assert (status["phase"], status["reason"]) == ("Succeeded", "Validated")
    assert status["result"]["artifacts"]  # kept
    assert history(kmock, "qj-1")[-1] == ("Succeeded", "Validated", "qj-1-1")


async def test_a_copy_of_our_job_neither_drives_the_status_nor_is_deleted(kmock, tmp_path):
    """A hand re-run (the Job copied under another name, labels and ownerReference kept)
    replaced a final verdict with its own run's."""

    def copy_fails(job: dict) -> JobResult:
        if job["metadata"]["name"] == "qj-1-1":
            return canned(job)
        return JobResult(phase="Failed", reason=Reason.ValidationFailed, message="copy run",
                         precision="fp16")  # fmt: skip

    api = Api(kmock)
    standin = JobStandIn(kmock, tmp_path / "kubelet", copy_fails)
    async with standin, operator_running(kmock, tmp_path):
        await api.create(QJOBS, NS, example_in("bucket", "http://127.0.0.1:1", name="qj-1"))
        await wait_for(lambda: final_status(kmock, NS, "qj-1"), 30, "verdict")
        [job] = [j for j in stored(kmock, JOBS, NS) if j["metadata"]["name"] == "qj-1-1"]
        rerun = copy.deepcopy(job)
        meta = rerun["metadata"]
        rerun["metadata"] = {"name": "qj-1-1-debug", "labels": meta["labels"],
                             "ownerReferences": meta["ownerReferences"]}  # fmt: skip
        rerun.pop("status", None)
        await api.create(JOBS, NS, rerun)
        await asyncio.sleep(2)
        # a spec change deletes the old generation's Job, never the copy
        await api.patch(QJOBS, NS, "qj-1", {"spec": {"output": {"uri": "s3://bucket/v2/"}}})
        await wait_for(
            lambda: (s := final_status(kmock, NS, "qj-1")) and s["observedGeneration"] == 2,
            30, "generation 2's verdict",
        )  # fmt: skip
    assert all(job_name == "qj-1-1" for _, _, job_name in history(kmock, "qj-1")[:3])
    assert not [h for h in history(kmock, "qj-1") if h[2] == "qj-1-1-debug"]
    names = {j["metadata"]["name"] for j in stored(kmock, JOBS, NS)}
    assert names == {"qj-1-1-debug", "qj-1-2"}


async def test_a_job_name_two_live_objects_share_is_blocked_not_awaited(kmock, tmp_path):
    """A dotted name is hashed into its Job name, which a plain name can equal: the second
    CR waited for ever for the first's Job "of a deleted QuantizationJob" to go."""
    dotted = "my.model"
    plain = f"my-model-{_short_hash(dotted)}"
    assert job_name(dotted, 1) == job_name(plain, 1)
    api = Api(kmock)
    standin = JobStandIn(kmock, tmp_path / "kubelet", lambda _job: None)  # never finish
    async with standin, operator_running(kmock, tmp_path):
        await api.create(QJOBS, NS, example_in("bucket", "http://127.0.0.1:1", name=dotted))
        await wait_for(lambda: status_of(kmock, dotted).get("jobName"), what="first Job")
        await api.create(QJOBS, NS, example_in("bucket", "http://127.0.0.1:2", name=plain))
        status = await wait_for(
            lambda: (s := status_of(kmock, plain)).get("reason") and s, 20, "a reason"
        )
    assert status["reason"] == "JobNameTaken" and f"QuantizationJob/{dotted}" in status["message"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Stalled"] == "True"


async def test_a_spec_change_while_the_operator_is_down_never_runs_two_generations(kmock, tmp_path):
    """On restart the resume handler created generation 2's Job before the update handler
    deleted generation 1's: both ran at once."""
    hold = asyncio.Event()

    async def held(job: dict) -> JobResult:
        await hold.wait()
        return canned(job)

    api = Api(kmock)
    both: list[bool] = []

    async def sample() -> None:
        while True:
            names = {j["metadata"]["name"] for j in stored(kmock, JOBS, NS)}
            both.append({"qj-1-1", "qj-1-2"} <= names)
            await asyncio.sleep(0.002)

    async with JobStandIn(kmock, tmp_path / "kubelet", held):
        async with operator_running(kmock, tmp_path):
            await api.create(QJOBS, NS, example_in("bucket", "http://127.0.0.1:1", name="qj-1"))
            await wait_for(lambda: status_of(kmock, "qj-1").get("phase") == "Running", what="run")
        await api.patch(QJOBS, NS, "qj-1", {"spec": {"output": {"uri": "s3://bucket/v7/"}}})
        sampler = asyncio.create_task(sample())
        async with operator_running(kmock, tmp_path):
            names = lambda: {j["metadata"]["name"] for j in stored(kmock, JOBS, NS)}  # noqa: E731
            await wait_for(lambda: "qj-1-2" in names(), 20, "generation 2")
            hold.set()
            status = await wait_for(
                lambda: (s := final_status(kmock, NS, "qj-1")) and s["observedGeneration"] == 2
                and s, 20, "generation 2's verdict",
            )  # fmt: skip
        sampler.cancel()
    assert status["jobName"] == "qj-1-2" and status["reason"] == "Validated"
    assert both and not any(both)
    assert [j["metadata"]["name"] for j in stored(kmock, JOBS, NS)] == ["qj-1-2"]


async def test_an_invalid_spec_change_stops_the_previous_generations_job(kmock, tmp_path):
    """A spec change the operator refuses (here an image not allowed) ended the new
    generation in InvalidSpec and left the previous generation's Job running, untracked,
    free to publish and promote (operator trial). It is deleted as on any spec change."""
    hold = asyncio.Event()

    async def held(job: dict) -> JobResult:
        await hold.wait()
        return canned(job)

    api = Api(kmock)
    async with JobStandIn(kmock, tmp_path / "kubelet", held), operator_running(kmock, tmp_path):
        await api.create(QJOBS, NS, example_in("bucket", "http://127.0.0.1:1", name="qj-1"))
        await wait_for(lambda: status_of(kmock, "qj-1").get("phase") == "Running", what="run")
        await api.patch(QJOBS, NS, "qj-1", {"spec": {"image": "evil.example/miner:1"}})
        status = await wait_for(
            lambda: (s := final_status(kmock, NS, "qj-1")) and s["observedGeneration"] == 2
            and s, 20, "generation 2's verdict",
        )  # fmt: skip
        await wait_for(lambda: not stored(kmock, JOBS, NS), 20, "generation 1's Job deleted")
        hold.set()
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec")
    assert "spec.image: 'evil.example/miner:1'" in status["message"]
