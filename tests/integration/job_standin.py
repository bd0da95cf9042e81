"""A test-only stand-in for Kubernetes' Job controller and kubelet.

It watches batch/v1 Jobs in the emulator over HTTP, as the Job controller does, and for each
new, unsuspended Job:

- creates a Pod from the Job's template (labels ``batch.kubernetes.io/job-name`` and
  ``controller-uid``, ownerReference to the Job) and marks it Running through ``/status``;
- runs the container's command and args as a subprocess, with the container's env
  (``secretKeyRef`` values read from Secrets stored in the emulator), ``emptyDir`` mounts and
  ``TMPDIR`` mapped to temporary directories, and ``--result-file`` pointing at the file
  that stands in for ``terminationMessagePath`` (/dev/termination-log);
  the image's entrypoint ``kquant-job`` is the real worker, ``python -m kquant_job.cli``;
- writes the Pod's ``state.terminated`` (exit code; the termination message, or with
  FallbackToLogsOnError the log tail when it is empty) and the Job's status and conditions
  as the Job controller would: Complete (with SuccessCriteriaMet), or Failed with reason
  PodFailurePolicy (a FailJob rule matched the exit code), BackoffLimitExceeded (after
  ``backoffLimit`` retries) or DeadlineExceeded (``activeDeadlineSeconds`` elapsed: the
  process is killed);
- kills a Job's process when the Job is deleted (garbage collection of its Pod).

``pause_at[job_name] = text`` stops the Job's worker (SIGSTOP) when it logs a line containing
``text``: a pod still busy when its deadline, a kill or an operator restart arrives, whatever
the machine's speed (``resume`` lets it go on).

A missing Secret key leaves the Pod waiting with CreateContainerConfigError, as the kubelet
does. With ``canned`` the worker does not run: the Pod ends with the given JobResult.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from kube_emulator import JOBS, PODS, SECRETS, KubeEmulator
from kube_rules import now_rfc3339
from operator_helpers import Api, wait_for

from kquant_api import JobResult

ENTRYPOINTS = {"kquant-job": [sys.executable, "-m", "kquant_job.cli"]}


class ContainerConfigError(Exception):
    """The kubelet cannot build the container's environment (missing Secret or key)."""


def _cond(ctype: str, reason: str, message: str) -> dict[str, str]:
    now = now_rfc3339()
    return {
        "type": ctype,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": now,
        "lastTransitionTime": now,
    }


def failure_rule(job: dict, container: str, exit_code: int) -> tuple[int, str] | None:
    """The first podFailurePolicy rule matching a container's exit code, as (index, action)."""
    rules = ((job["spec"].get("podFailurePolicy") or {}).get("rules")) or []
    for index, rule in enumerate(rules):
        on = rule.get("onExitCodes")
        if not on or on.get("containerName") not in (None, container):
            continue
        hit = exit_code in on["values"]
        if hit == (on.get("operator", "In") == "In"):
            return index, rule["action"]
    return None


class JobStandIn:
    """Use as ``async with JobStandIn(emulator, tmp_path) as kubelet:``; ``logs`` holds each
    Job's output lines, ``processes`` each Job's running worker."""

    def __init__(
        self,
        emulator: KubeEmulator,
        tmp_path: Path,
        canned: Callable[[dict], JobResult | Awaitable[JobResult]] | None = None,
    ) -> None:
        self.emulator, self.api, self.root, self.canned = emulator, Api(emulator), tmp_path, canned
        self.logs: dict[str, list[str]] = {}
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.pause_at: dict[str, str] = {}  # Job name -> log text at which its worker stops
        self.runs: dict[str, asyncio.Task] = {}  # by Job uid
        self._watch_task: asyncio.Task | None = None
        # The worker's credentials come from the Job's env only: none inherited.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KQUANT_"))}
        self.env.update(
            AWS_EC2_METADATA_DISABLED="true",
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            KQUANT_S3_MAX_ATTEMPTS="2",
            KQUANT_S3_RETRY_SECONDS="2",
        )

    async def __aenter__(self) -> JobStandIn:
        before = self.emulator.watches_started[JOBS]
        self._watch_task = asyncio.create_task(self._watch())
        await wait_for(
            lambda: self.emulator.watches_started[JOBS] > before, what="the stand-in's watch"
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        tasks = [t for t in (self._watch_task, *self.runs.values()) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def resume(self, job_name: str) -> None:
        """SIGCONT a worker stopped by ``pause_at``."""
        self.pause_at.pop(job_name, None)
        self.processes[job_name].send_signal(signal.SIGCONT)

    def kill(self, job_name: str) -> None:
        """SIGKILL the Job's running worker (as an OOM kill or a node loss would)."""
        self.processes[job_name].kill()

    async def _watch(self) -> None:
        url = "/apis/batch/v1/jobs"
        timeout = aiohttp.ClientTimeout(total=None)
        async with self.emulator.get(url, params={"watch": "true"}, timeout=timeout) as resp:
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                job = event["object"]
                uid = job["metadata"]["uid"]
                if event["type"] == "DELETED":
                    proc = self.processes.get(job["metadata"]["name"])
                    if proc and proc.returncode is None:
                        proc.kill()
                    continue
                finished = (job.get("status") or {}).get("conditions")
                if uid in self.runs or finished or job["spec"].get("suspend"):
                    continue
                self.runs[uid] = asyncio.create_task(self._run(job))

    async def _run(self, job: dict) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        spec, started = job["spec"], time.monotonic()
        deadline, backoff = spec.get("activeDeadlineSeconds"), spec.get("backoffLimit", 6)
        await self._job_status(ns, name, {"startTime": now_rfc3339(), "active": 1})
        failed = 0
        while True:
            pod = await self._start_pod(job)
            remaining = deadline - (time.monotonic() - started) if deadline else None
            try:
                code, message, late = await self._execute(job, pod, remaining)
            except ContainerConfigError as exc:
                await self._pod_waiting(pod, str(exc))
                await asyncio.sleep(max(remaining or 0, 0) if deadline else 3600)
                code, message, late = 0, "", True
            else:
                await self._pod_terminated(pod, code, message)
            if late:
                msg = "Job was active longer than specified deadline"
                conds = [_cond(t, "DeadlineExceeded", msg) for t in ("FailureTarget", "Failed")]
                status = {"active": 0, "ready": 0, "failed": failed + 1, "conditions": conds}
                break
            if code == 0:
                msg = "Reached expected number of succeeded pods"
                kinds = ("SuccessCriteriaMet", "Complete")
                conds = [_cond(t, "CompletionsReached", msg) for t in kinds]
                status = {"active": 0, "ready": 0, "succeeded": 1, "completionTime": now_rfc3339()}
                status["conditions"] = conds
                break
            rule = failure_rule(job, pod["spec"]["containers"][0]["name"], code)
            failed += rule is None or rule[1] != "Ignore"
            if rule and rule[1] == "FailJob":
                msg = (
                    f"Container {pod['spec']['containers'][0]['name']} for pod "
                    f"{ns}/{pod['metadata']['name']} failed with exit code {code} matching "
                    f"FailJob rule at index {rule[0]}"
                )
                conds = [_cond(t, "PodFailurePolicy", msg) for t in ("FailureTarget", "Failed")]
                status = {"active": 0, "ready": 0, "failed": failed, "conditions": conds}
                break
            if failed > backoff:
                msg = "Job has reached the specified backoff limit"
                conds = [_cond(t, "BackoffLimitExceeded", msg) for t in ("FailureTarget", "Failed")]
                status = {"active": 0, "ready": 0, "failed": failed, "conditions": conds}
                break
            await self._job_status(ns, name, {"active": 1, "ready": 0, "failed": failed})
        await self._job_status(ns, name, status)

    async def _job_status(self, ns: str, name: str, status: dict) -> None:
        with contextlib.suppress(RuntimeError):  # the Job may be gone (replaced, collected)
            await self.api.patch(JOBS, ns, name, {"status": status}, sub="status")

    async def _start_pod(self, job: dict) -> dict:
        meta, template = job["metadata"], job["spec"]["template"]
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        for key in ("batch.kubernetes.io/job-name", "job-name"):
            labels[key] = meta["name"]
        for key in ("batch.kubernetes.io/controller-uid", "controller-uid"):
            labels[key] = meta["uid"]
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"]}
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": f"{meta['name']}-",
                "labels": labels,
                "ownerReferences": [{**owner, "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": template["spec"],
        }
        pod = await self.api.create(PODS, meta["namespace"], body)
        return await self._pod_status(pod, {"phase": "Pending", "startTime": now_rfc3339()})

    async def _pod_running(self, job: dict, pod: dict) -> None:
        """The pod runs, and the Job counts it ready (``status.ready``, as the Job controller
        does since Kubernetes 1.24): the Job event the operator sees Running by."""
        await self._pod_status(pod, {"phase": "Running"})
        meta = job["metadata"]
        await self._job_status(meta["namespace"], meta["name"], {"ready": 1})

    async def _pod_status(self, pod: dict, status: dict) -> dict:
        meta = pod["metadata"]
        return await self.api.patch(
            PODS, meta["namespace"], meta["name"], {"status": status}, sub="status"
        )

    async def _pod_waiting(self, pod: dict, message: str) -> None:
        name = pod["spec"]["containers"][0]["name"]
        waiting = {"reason": "CreateContainerConfigError", "message": message}
        cs = {"name": name, "ready": False, "restartCount": 0, "state": {"waiting": waiting}}
        await self._pod_status(pod, {"phase": "Pending", "containerStatuses": [cs]})

    async def _pod_terminated(self, pod: dict, code: int, message: str) -> None:
        container = pod["spec"]["containers"][0]
        now = now_rfc3339()
        terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "message": message,
            "startedAt": pod["status"].get("startTime", now),
            "finishedAt": now,
        }
        cs = {
            "name": container["name"],
            "image": container.get("image", ""),
            "ready": False,
            "restartCount": 0,
            "state": {"terminated": terminated},
        }
        phase = "Succeeded" if code == 0 else "Failed"
        await self._pod_status(pod, {"phase": phase, "containerStatuses": [cs]})

    async def _env(self, namespace: str, container: dict, mounts: dict[str, Path]) -> dict:
        env = dict(self.env)
        for var in container.get("env") or []:
            if "value" in var:
                value = var["value"]
                env[var["name"]] = str(mounts.get(value, value))  # a mount path: mapped
                continue
            ref = (var.get("valueFrom") or {}).get("secretKeyRef")
            if ref is None:
                raise NotImplementedError(f"env source not emulated: {var}")
            secret = await self.api.get(SECRETS, namespace, ref["name"])
            data = (secret or {}).get("data") or {}
            if ref["key"] in data:
                env[var["name"]] = base64.b64decode(data[ref["key"]]).decode()
            elif not ref.get("optional"):
                what = f'secret "{ref["name"]}"' if secret is None else f"key {ref['key']}"
                raise ContainerConfigError(f"couldn't find {what} in namespace {namespace}")
        if "/tmp" in mounts:
            env["TMPDIR"] = str(mounts["/tmp"])
        return env

    async def _execute(self, job: dict, pod: dict, remaining: float | None) -> tuple:
        """Run the container; (exit code, termination message, deadline exceeded)."""
        container = pod["spec"]["containers"][0]
        jname, pname = job["metadata"]["name"], pod["metadata"]["name"]
        if self.canned is not None:
            result = self.canned(job)
            if inspect.isawaitable(result):  # the pod runs until the test lets it end
                await self._pod_running(job, pod)
                result = await result
            return result.exit_code, result.to_json(), False
        root = self.root / pname
        mounts = {}
        for mount in container.get("volumeMounts") or []:
            mounts[mount["mountPath"]] = root / "volumes" / mount["name"]
            mounts[mount["mountPath"]].mkdir(parents=True, exist_ok=True)
        env = await self._env(pod["metadata"]["namespace"], container, mounts)
        term_log = root / "termination-log"
        term_log.touch()
        command = container.get("command") or ["kquant-job"]
        argv = [*ENTRYPOINTS.get(command[0], command[:1]), *command[1:], *container["args"]]
        argv += ["--result-file", str(term_log)]
        pipe, merged = asyncio.subprocess.PIPE, asyncio.subprocess.STDOUT
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=root, stdout=pipe, stderr=merged
        )
        self.processes[jname] = proc
        lines = self.logs.setdefault(jname, [])
        await self._pod_running(job, pod)

        async def read() -> None:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                lines.append(raw.decode(errors="replace"))
                if self.pause_at.get(jname, "\0") in lines[-1]:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGSTOP)

        reader = asyncio.create_task(read())
        late = False
        try:
            await asyncio.wait_for(proc.wait(), remaining)
        except TimeoutError:
            late = True
            proc.kill()
            await proc.wait()
        await reader
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        message = term_log.read_text()[:4096]
        if (
            not message.strip()
            and code
            and container.get("terminationMessagePolicy") == ("FallbackToLogsOnError")
        ):
            message = "".join(lines[-80:])[-2048:]
        return code, message, late
