"""derive_status: Job conditions and the worker's termination message -> the CR's status,
for every stage a Job goes through, with objects shaped as the API server returns them."""

from __future__ import annotations

import pytest
from operator_objects import JOB_UID, T_END, T_START, condition, job, pod, qjob, terminated

from kquant_api import (
    Artifact,
    JobResult,
    LatencyMs,
    QuantizationJobStatus,
    Reason,
    ValidationSummary,
    VariantResult,
)
from kquant_operator.status import (
    derive_status,
    events_for,
    invalid_spec_status,
    is_finished,
    status_patch,
)

NOW = "2025-06-01T10:05:00Z"
LATER = "2025-06-01T11:00:00Z"
ORIGINAL, QUANTIZED = 2_327_524, 1_286_255
PFP_MESSAGE = (
    "Container worker for pod speech/silero-vad-fp16-1-x7k2p failed with exit code {code} "
    "matching FailJob rule at index 1"
)


def _validated() -> JobResult:
    return JobResult(
        phase="Succeeded",
        reason=Reason.Validated,
        message="validated on 100 samples (cuda)",
        precision="fp16",
        originalBytes=ORIGINAL,
        quantizedBytes=QUANTIZED,
        validation=ValidationSummary(
            passed=True,
            samples=100,
            device="cuda",
            maxAbsError=8.3e-06,
            meanAbsError=1.1e-06,
            cosineSimilarity=0.99999,
            latencyMs=LatencyMs(original=0.2, quantized=0.12),
        ),
        artifacts=[
            Artifact(
                uri="s3://models/silero-vad/v6-fp16/silero_vad.onnx",
                sha256="ab" * 32,
                bytes=QUANTIZED,
            )
        ],
        reportUri="s3://models/silero-vad/v6-fp16/report.json",
        manifestUri="s3://models/silero-vad/v6-fp16/manifest.json",
        promotedUri="s3://models/silero-vad/production/",
    )


def _conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status["conditions"]}


def _flags(status: dict) -> dict[str, str]:
    return {t: c["status"] for t, c in _conditions(status).items()}


def _assert_consistent(status: dict, cr: dict) -> None:
    assert QuantizationJobStatus.model_validate(status)
    assert status["observedGeneration"] == cr["metadata"]["generation"]
    for cond in status["conditions"]:
        assert cond["observedGeneration"] == cr["metadata"]["generation"]
        assert cond["reason"] == status["reason"]


def test_no_job_yet_is_pending():
    cr = qjob(generation=2)
    status = derive_status(cr, None, [], now=NOW)
    _assert_consistent(status, cr)
    assert (status["phase"], status["reason"]) == ("Pending", "JobPending")
    assert status["jobName"] == "silero-vad-fp16-2"
    assert _flags(status) == {"Ready": "False", "Reconciling": "True", "Stalled": "False"}
    assert all(c["lastTransitionTime"] == NOW for c in status["conditions"])
    assert "result" not in status


def test_created_job_without_a_pod_is_pending():
    cr = qjob()
    status = derive_status(cr, job(cr), [], now=NOW)
    assert (status["phase"], status["reason"]) == ("Pending", "JobPending")
    assert status["jobName"] == "silero-vad-fp16-1"


def test_job_suspended_by_kueue_is_queued_not_failed():
    cr = qjob(queueName="gpu-queue")
    suspended = job(cr, conditions=[condition("Suspended", "JobSuspended", "Job suspended")])
    status = derive_status(cr, suspended, [], now=NOW)
    _assert_consistent(status, cr)
    assert (status["phase"], status["reason"]) == ("Pending", "Queued")
    assert "gpu-queue" in status["message"]
    assert _flags(status) == {"Ready": "False", "Reconciling": "True", "Stalled": "False"}


def test_running_job():
    cr = qjob()
    j = job(cr, active=1, ready=1, startTime=T_START, terminating=0)
    status = derive_status(cr, j, [pod(j)], now=NOW)
    _assert_consistent(status, cr)
    assert (status["phase"], status["reason"]) == ("Running", "Running")
    assert status["startTime"] == T_START
    assert _flags(status)["Reconciling"] == "True"


def test_unschedulable_pod_says_why():
    cr = qjob()
    j = job(cr, active=1, ready=0, startTime=T_START)
    scheduled = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    }
    waiting = pod(j, phase="Pending", state={"waiting": {}}, conditions=[scheduled])
    status = derive_status(cr, j, [waiting], now=NOW)
    assert (status["phase"], status["reason"]) == ("Pending", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in status["message"]


def test_succeeded_with_the_worker_result():
    cr = qjob()
    result = _validated()
    j = job(
        cr,
        startTime=T_START,
        completionTime=T_END,
        succeeded=1,
        conditions=[
            condition("SuccessCriteriaMet", "CompletionsReached", "Reached expected number"),
            condition("Complete", "CompletionsReached", "Reached expected number"),
        ],
    )
    done = pod(j, phase="Succeeded", state=terminated(0, result.to_json()))
    status = derive_status(cr, j, [done], now=NOW)
    _assert_consistent(status, cr)
    assert (status["phase"], status["reason"]) == ("Succeeded", "Validated")
    assert _flags(status) == {"Ready": "True", "Reconciling": "False", "Stalled": "False"}
    assert (status["startTime"], status["completionTime"]) == (T_START, T_END)
    res = status["result"]
    assert res["artifacts"] == [a.model_dump() for a in result.artifacts]
    assert (res["originalBytes"], res["quantizedBytes"]) == (ORIGINAL, QUANTIZED)
    assert res["reductionPercent"] == pytest.approx(100 * (1 - QUANTIZED / ORIGINAL), abs=0.01)
    assert res["validation"] == result.validation.model_dump(exclude_none=True)
    assert res["promotedUri"] == result.promotedUri
    assert res["manifestUri"] == result.manifestUri


def test_a_variants_run_carries_its_comparison_and_choice():
    cr = qjob()
    result = _validated()
    result.chosen = "fp16"
    result.variants = [
        VariantResult(name="fp16", precision="fp16", passed=True, reason="Validated",
                      quantizedBytes=QUANTIZED, cosineSimilarity=0.99999),
        VariantResult(name="int8", precision="int8", passed=False, reason="NoGain",
                      message="0.99x the original's size", quantizedBytes=ORIGINAL - 10),
    ]  # fmt: skip
    j = job(cr, startTime=T_START, completionTime=T_END, succeeded=1,
            conditions=[condition("Complete", "CompletionsReached", "done")])  # fmt: skip
    done = pod(j, phase="Succeeded", state=terminated(0, result.to_json()))
    status = derive_status(cr, j, [done], now=NOW)
    _assert_consistent(status, cr)
    res = status["result"]
    assert (res["chosen"], res["precision"]) == (
        "fp16",
        "fp16",
    )  # printer columns Chosen, Precision
    assert [v["name"] for v in res["variants"]] == ["fp16", "int8"]
    assert res["variants"][1] == result.variants[1].model_dump(exclude_none=True)


def _failed_job(cr: dict, reason: str, message: str) -> dict:
    return job(
        cr,
        startTime=T_START,
        failed=1,
        conditions=[
            condition("FailureTarget", reason, message),
            condition("Failed", reason, message),
        ],
    )


def test_validation_failed_keeps_metrics_and_is_stalled():
    cr = qjob()
    result = _validated().model_copy(
        update={
            "phase": "Failed",
            "reason": Reason.ValidationFailed,
            "message": "output stateN: cosine similarity 0.91 < 0.999",
            "validation": ValidationSummary(
                passed=False, samples=100, device="cuda", cosineSimilarity=0.91
            ),
            "artifacts": [],
            "manifestUri": None,
            "promotedUri": None,
        }
    )
    j = _failed_job(cr, "PodFailurePolicy", PFP_MESSAGE.format(code=result.exit_code))
    failed = pod(j, phase="Failed", state=terminated(result.exit_code, result.to_json()))
    status = derive_status(cr, j, [failed], now=NOW)
    _assert_consistent(status, cr)
    assert (status["phase"], status["reason"]) == ("Failed", "ValidationFailed")
    assert status["message"] == result.message
    assert _flags(status) == {"Ready": "False", "Reconciling": "False", "Stalled": "True"}
    assert status["result"]["validation"]["passed"] is False
    assert "promotedUri" not in status["result"]
    assert status["completionTime"] == T_END


@pytest.mark.parametrize("reason", [Reason.SourceNotFound, Reason.AccessDenied])
def test_pod_failure_policy_reports_the_worker_reason(reason):
    cr = qjob()
    result = JobResult(phase="Failed", reason=reason, message=f"s3://models/...: {reason.value}")
    j = _failed_job(cr, "PodFailurePolicy", PFP_MESSAGE.format(code=result.exit_code))
    failed = pod(j, phase="Failed", state=terminated(result.exit_code, result.to_json()))
    status = derive_status(cr, j, [failed], now=NOW)
    assert (status["phase"], status["reason"]) == ("Failed", reason.value)
    assert _flags(status)["Stalled"] == "True"


def test_deadline_exceeded_wins_over_a_log_tail():
    cr = qjob()
    j = _failed_job(cr, "DeadlineExceeded", "Job was active longer than specified deadline")
    logs = "INFO fetch s3://models/silero-vad/v6/silero_vad.onnx\nINFO validating 100 samples\n"
    killed = pod(j, phase="Failed", state=terminated(137, logs))
    status = derive_status(cr, j, [killed], now=NOW)
    _assert_consistent(status, cr)
    assert (status["phase"], status["reason"]) == ("Failed", "DeadlineExceeded")
    assert "longer than specified deadline" in status["message"]
    assert "result" not in status


def test_deadline_exceeded_wins_over_an_earlier_attempts_result():
    cr = qjob()
    outage = JobResult(phase="Failed", reason=Reason.StorageUnavailable, message="timeout")
    j = _failed_job(cr, "DeadlineExceeded", "Job was active longer than specified deadline")
    first = pod(j, phase="Failed", state=terminated(outage.exit_code, outage.to_json()))
    status = derive_status(cr, j, [first], now=NOW)
    assert (status["phase"], status["reason"]) == ("Failed", "DeadlineExceeded")
    assert "StorageUnavailable: timeout" in status["message"]


def test_a_run_that_published_before_the_deadline_is_a_success():
    """The worker wrote its Succeeded result (set published, manifest last, promoted) and
    the deadline killed the pod while it exited: the status says what is published."""
    cr = qjob()
    j = _failed_job(cr, "DeadlineExceeded", "Job was active longer than specified deadline")
    late = pod(j, phase="Failed", state=terminated(137, _validated().to_json()))
    status = derive_status(cr, j, [late], now=NOW)
    _assert_consistent(status, cr)
    assert (status["phase"], status["reason"]) == ("Succeeded", "Validated")
    assert "published when the Job failed: DeadlineExceeded" in status["message"]
    assert status["result"]["manifestUri"] == _validated().manifestUri
    assert _flags(status)["Ready"] == "True"


@pytest.mark.parametrize(
    ("kubelet_reason", "expected"), [("Error", "BackoffLimitExceeded"), ("OOMKilled", "OOMKilled")]
)
def test_non_json_termination_message_falls_back_to_the_job_condition(kubelet_reason, expected):
    cr = qjob()
    j = _failed_job(cr, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    logs = "Traceback (most recent call last):\n  ...\nMemoryError: cannot allocate\n"
    dead = pod(j, phase="Failed", state=terminated(137, logs, reason=kubelet_reason))
    status = derive_status(cr, j, [dead], now=NOW)
    assert (status["phase"], status["reason"]) == ("Failed", expected)
    assert "MemoryError: cannot allocate" in status["message"]
    assert "exit code 137" in status["message"]
    assert "result" not in status


def test_a_retried_job_reports_its_last_attempt():
    cr = qjob()
    outage = JobResult(phase="Failed", reason=Reason.StorageUnavailable, message="timeout")
    first = pod(
        job(cr), "aaaaa", "Failed", terminated(outage.exit_code, outage.to_json(), finished=T_START)
    )
    retrying = job(cr, failed=1, active=0, startTime=T_START)
    status = derive_status(cr, retrying, [first], now=NOW)
    assert (status["phase"], status["reason"]) == ("Running", "Retrying")
    assert "StorageUnavailable" in status["message"]
    done = job(
        cr,
        failed=1,
        succeeded=1,
        startTime=T_START,
        completionTime=T_END,
        conditions=[condition("Complete", "CompletionsReached", "Reached expected number")],
    )
    second = pod(done, "bbbbb", "Succeeded", terminated(0, _validated().to_json()))
    status = derive_status(cr, done, [second, first], now=NOW)
    assert (status["phase"], status["reason"]) == ("Succeeded", "Validated")


def test_job_of_an_older_generation_counts_as_no_job():
    old_cr = qjob(generation=1)
    old_job = job(
        old_cr,
        succeeded=1,
        completionTime=T_END,
        conditions=[condition("Complete", "CompletionsReached", "Reached expected number")],
    )
    old_pod = pod(old_job, phase="Succeeded", state=terminated(0, _validated().to_json()))
    previous = derive_status(old_cr, old_job, [old_pod], now=NOW)
    cr = qjob(generation=2, status=previous)
    status = derive_status(cr, old_job, [old_pod], now=LATER)
    _assert_consistent(status, cr)
    assert (status["phase"], status["reason"]) == ("Pending", "JobPending")
    assert status["jobName"] == "silero-vad-fp16-2"
    assert "result" not in status
    # The merge patch for the new generation removes the old result and times.
    patch = status_patch({**previous, "kopf": {"progress": {}}}, status)
    assert patch["result"] is None and patch["completionTime"] is None
    assert "kopf" not in patch


def test_pods_of_an_older_generation_are_ignored():
    bad = JobResult(phase="Failed", reason=Reason.ValidationFailed, message="cosine 0.9")
    old_job = job(qjob(generation=1), uid="0ld-j0b")
    old_pod = pod(old_job, phase="Failed", state=terminated(40, bad.to_json(), finished=LATER))
    cr = qjob(generation=2)
    current = job(
        cr,
        succeeded=1,
        completionTime=T_END,
        conditions=[condition("Complete", "CompletionsReached", "Reached expected number")],
    )
    status = derive_status(cr, current, [old_pod], now=NOW)
    # Complete, but no pod of its own to read a result from: unknown, not Ready
    assert (status["phase"], status["reason"]) == ("Failed", "NoResult")
    assert "result" not in status


def test_last_transition_time_changes_only_with_the_status():
    cr = qjob()
    j = job(cr, active=1, ready=1, startTime=T_START)
    running = derive_status(cr, j, [pod(j)], now=NOW)
    cr["status"] = running
    again = derive_status(cr, j, [pod(j)], now=LATER)
    assert again["conditions"] == running["conditions"]
    j_done = job(
        cr,
        succeeded=1,
        completionTime=T_END,
        conditions=[condition("Complete", "CompletionsReached", "Reached expected number")],
    )
    done_pod = pod(j_done, phase="Succeeded", state=terminated(0, _validated().to_json()))
    done = _conditions(derive_status(cr, j_done, [done_pod], now=LATER))
    assert done["Ready"]["lastTransitionTime"] == LATER  # False -> True
    assert done["Reconciling"]["lastTransitionTime"] == LATER  # True -> False
    assert done["Stalled"]["lastTransitionTime"] == NOW  # False all along


def test_verdict_survives_the_job_ttl():
    cr = qjob()
    j = _failed_job(cr, "DeadlineExceeded", "Job was active longer than specified deadline")
    final = derive_status(cr, j, [], now=NOW)
    cr["status"] = final
    assert is_finished(cr)
    assert derive_status(cr, None, [], now=LATER) == final
    assert not is_finished(qjob(generation=2, status=final))


def test_invalid_spec_status():
    cr = qjob(generation=3)
    status = invalid_spec_status(
        cr, "spec.quantization.keepIOTypes: Extra inputs are not permitted"
    )
    _assert_consistent(status, cr)
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec")
    assert "keepIOTypes" in status["message"]
    assert _flags(status) == {"Ready": "False", "Reconciling": "False", "Stalled": "True"}
    assert "jobName" not in status


def test_events_on_transitions_only():
    cr = qjob()
    j = job(cr, active=1, ready=1, startTime=T_START)
    running = derive_status(cr, j, [pod(j)], now=NOW)
    assert events_for(None, running) == []
    j_done = job(
        cr,
        succeeded=1,
        completionTime=T_END,
        conditions=[condition("Complete", "CompletionsReached", "Reached expected number")],
    )
    done_pod = pod(j_done, phase="Succeeded", state=terminated(0, _validated().to_json()))
    succeeded = derive_status(cr, j_done, [done_pod], now=NOW)
    ((etype, reason, message),) = events_for(running, succeeded)
    assert (etype, reason) == ("Normal", "Succeeded")
    assert str(ORIGINAL) in message and "production" in message
    assert events_for(succeeded, succeeded) == []

    bad = JobResult(phase="Failed", reason=Reason.ValidationFailed, message="cosine 0.9")
    j_bad = _failed_job(cr, "PodFailurePolicy", PFP_MESSAGE.format(code=bad.exit_code))
    bad_pod = pod(j_bad, phase="Failed", state=terminated(bad.exit_code, bad.to_json()))
    failed = derive_status(cr, j_bad, [bad_pod], now=NOW)
    assert events_for(running, failed) == [("Warning", "ValidationFailed", "cosine 0.9")]
    invalid = invalid_spec_status(cr, "spec.model.uri: unsupported scheme 'gs'")
    assert events_for(running, invalid) == [
        ("Warning", "Failed", "InvalidSpec: spec.model.uri: unsupported scheme 'gs'")
    ]


def test_pods_of_an_earlier_job_of_the_same_name_are_not_this_run_s():
    """A QuantizationJob deleted and re-created under its name while the collector lags:
    the old Job's pod (same name, same labels, another uid) holds a Validated result; the
    new Job failed before its pod ran. Before: Succeeded/Validated with the old artifacts."""
    good = JobResult(phase="Succeeded", reason=Reason.Validated, message="validated")
    cr = qjob()
    old_job = job(cr, uid="0ld-j0b")
    old_pod = pod(old_job, phase="Succeeded", state=terminated(0, good.to_json()))
    deadline = condition("Failed", "DeadlineExceeded", "Job was active longer than specified")
    current = job(cr, failed=1, conditions=[deadline])
    status = derive_status(cr, current, [old_pod], now=NOW)
    assert (status["phase"], status["reason"]) == ("Failed", "DeadlineExceeded")
    assert "result" not in status
    labelled = pod(current, suffix="h4nd", phase="Succeeded", state=terminated(0, good.to_json()))
    labelled["metadata"]["ownerReferences"] = []  # kquant's labels, no owner, another uid
    for key in ("batch.kubernetes.io/controller-uid", "controller-uid"):
        labelled["metadata"]["labels"][key] = "s0mebody-else"
    status = derive_status(cr, current, [labelled], now=NOW)
    assert status["reason"] == "DeadlineExceeded"


def test_a_completed_job_without_a_result_is_not_ready():
    cr = qjob()
    done = job(cr, succeeded=1, completionTime=T_END,
               conditions=[condition("Complete", "CompletionsReached", "Reached")])  # fmt: skip
    for message in ("", "INFO publish: done\nINFO exiting", '{"phase": "Succ'):
        worker = pod(done, phase="Succeeded", state=terminated(0, message))
        status = derive_status(cr, done, [worker], now=NOW)
        assert (status["phase"], status["reason"]) == ("Failed", "NoResult")
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "False" and "unknown" in status["message"]


def test_a_log_tail_hides_what_looks_like_a_credential():
    from kquant_operator.podstate import log_tail

    line = (
        "boto: AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG key AKIAIOSFODNN7EXAMPLE "
        'token: "abc.def" password=hunter2 shape=[1, 16]'
    )
    tail = log_tail(line)
    for secret in ("wJalrXUtnFEMI", "AKIAIOSFODNN7EXAMPLE", "abc.def", "hunter2"):
        assert secret not in tail
    assert "AWS_SECRET_ACCESS_KEY=***" in tail and "shape=[1, 16]" in tail


def test_lost_and_blocked_statuses():
    from kquant_operator.status import blocked_status, job_existed, lost_status

    cr = qjob()
    lost = lost_status(cr, "qj-1", now=NOW)
    flags = {c["type"]: c["status"] for c in lost["conditions"]}
    assert (lost["phase"], lost["reason"]) == ("Failed", "JobDeleted")
    assert flags == {"Ready": "False", "Reconciling": "False", "Stalled": "True"}
    blocked = blocked_status(cr, "JobForbidden", "exceeded quota", now=NOW)
    flags = {c["type"]: c["status"] for c in blocked["conditions"]}
    assert (
        blocked["phase"] == "Pending" and flags["Stalled"] == "True" and flags["Ready"] == "False"
    )
    name = cr["metadata"]["name"]
    running = qjob(status={"observedGeneration": 1, "jobName": f"{name}-1", "startTime": T_START})
    assert job_existed(running, f"{name}-1")
    waiting = qjob(status={"observedGeneration": 1, "jobName": f"{name}-1"})  # never started
    assert not job_existed(waiting, f"{name}-1")
    assert not job_existed(qjob(generation=2, status=running["status"]), f"{name}-2")


def test_a_created_job_is_recorded_by_its_uid_before_it_starts():
    """Operator fault-injection trial: a Job created, then removed while the operator was
    down before any status recorded its start, was created again (the generation ran
    twice). The status names the Job's uid right after the create."""
    from kquant_operator.status import derive_status, job_existed

    cr = qjob()
    created = derive_status(cr, job(cr), [], now=NOW)  # no pod, no start time yet
    assert created["jobUid"] == JOB_UID and "startTime" not in created
    assert created["phase"] == "Pending"
    assert job_existed(qjob(status=created), created["jobName"])
