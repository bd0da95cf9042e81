"""The test's side of the operator loop: an API client for the emulator, the operator run in
its own thread (``kopf.testing.KopfRunner``), polling helpers, and the S3 data of the Silero
VAD example.

The emulator shares the test's event loop, so nothing here blocks it: API calls go through
kmock's own aiohttp client, and the KopfRunner is entered and left in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
import yaml
from conftest import silero_dir
from kube_emulator import JOBS, QJOBS, KubeEmulator
from kube_rules import write_kubeconfig
from worker_helpers import VARIANTS, speech_feeds, upload_dir

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MERGE = {"Content-Type": "application/merge-patch+json"}


def api_path(resource: kmock.resource, namespace: str, name: str = "", sub: str = "") -> str:
    root = f"/apis/{resource.group}/{resource.version}" if resource.group else "/api/v1"
    out = f"{root}/namespaces/{namespace}/{resource.plural}"
    return out + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


class Api:
    """JSON calls to the emulator over HTTP, as kubectl or a controller would make them."""

    def __init__(self, emulator: KubeEmulator) -> None:
        self.emulator = emulator

    async def _call(self, method: str, url: str, **kwargs: Any) -> Any:
        async with self.emulator.request(method, url, **kwargs) as resp:
            data = await resp.json(content_type=None)
            if resp.status >= 300:
                raise RuntimeError(f"{method} {url}: {resp.status} {data.get('message')}")
            return data

    async def create(self, resource: kmock.resource, namespace: str, body: dict) -> dict:
        return await self._call("POST", api_path(resource, namespace), json=body)

    async def get(self, resource: kmock.resource, namespace: str, name: str) -> dict | None:
        async with self.emulator.get(api_path(resource, namespace, name)) as resp:
            return await resp.json() if resp.status == 200 else None

    async def list(self, resource: kmock.resource, namespace: str, selector: str = "") -> list:
        params = {"labelSelector": selector} if selector else {}
        data = await self._call("GET", api_path(resource, namespace), params=params)
        return data["items"]

    async def patch(
        self, resource: kmock.resource, namespace: str, name: str, body: dict, sub: str = ""
    ) -> dict:
        url = api_path(resource, namespace, name, sub)
        return await self._call("PATCH", url, data=json.dumps(body), headers=MERGE)

    async def delete(self, resource: kmock.resource, namespace: str, name: str) -> dict:
        return await self._call("DELETE", api_path(resource, namespace, name))


async def wait_for(
    check: Callable[[], Any], timeout: float = 30.0, what: str = "condition", poll: float = 0.05
) -> Any:
    """Poll ``check`` (sync or async) until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(poll)


def stored(emulator: KubeEmulator, resource: kmock.resource, namespace: str) -> list[dict]:
    """Live objects of ``resource`` in ``namespace``, straight from the emulator's store."""
    return [
        obj.raw
        for (res, ns, _), obj in list(emulator.objects.items())
        if res == resource and ns == namespace and not obj.deleted
    ]


def final_status(emulator: KubeEmulator, namespace: str, name: str) -> dict | None:
    """The CR's status once it holds a verdict for the current generation, else None."""
    for obj in stored(emulator, QJOBS, namespace):
        if obj["metadata"]["name"] == name:
            status = obj.get("status") or {}
            current = status.get("observedGeneration") == obj["metadata"].get("generation")
            if current and status.get("phase") in ("Succeeded", "Failed"):
                return status
    return None


@contextlib.asynccontextmanager
async def operator_running(
    emulator: KubeEmulator,
    tmp_path: Path,
    namespaces: tuple[str, ...] = (),
    peering: tuple[str, ...] = ("--standalone",),
) -> AsyncIterator[Any]:
    """The real handlers in ``kopf run`` (KopfRunner: its own thread and loop) against the
    emulator; returns once the operator watches QuantizationJobs and Jobs. ``peering``: kopf's
    peering flags (``--peering=NAME --priority=N`` for a replica of several)."""
    import kopf
    from kopf.testing import KopfRunner

    from kquant_operator import handlers

    url = str(emulator.url).rstrip("/")
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url)
    registry = kopf.OperatorRegistry()  # fresh: the module's import registered only once
    handlers.register(registry)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, token="kmock-token")

    scope = [f"--namespace={ns}" for ns in namespaces] or ["--all-namespaces"]
    before = {r: emulator.watches_started[r] for r in (QJOBS, JOBS)}
    saved = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig)  # read by the handlers' API client at start-up
    runner = KopfRunner(["run", *peering, *scope], registry=registry, timeout=30)
    await asyncio.to_thread(runner.__enter__)
    try:
        await wait_for(
            lambda: all(emulator.watches_started[r] > before[r] for r in before),
            what="the operator's watches",
        )
        yield runner
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)
        if saved is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = saved


def silero_example(endpoint: str, namespace: str, name: str | None = None) -> dict:
    """examples/silero-vad-fp16.yaml with its MinIO endpoint pointed at ``endpoint``."""
    qjob = yaml.safe_load((EXAMPLES / "silero-vad-fp16.yaml").read_text())
    qjob["metadata"] = {"name": name or qjob["metadata"]["name"], "namespace": namespace}
    qjob["spec"]["storage"]["endpoint"] = endpoint
    qjob["spec"]["validation"].update(latencyRuns=3, warmupRuns=1)
    return copy.deepcopy(qjob)


def upload_silero_example(client: Any, qjob: dict, tmp_path: Path) -> None:
    """The real Silero VAD model and real speech feeds where the example expects them."""
    from kquant_job.audio import write_feeds

    spec = qjob["spec"]
    for uri in (spec["model"]["uri"], spec["validation"]["dataUri"]):
        bucket = uri.removeprefix("s3://").split("/", 1)[0]
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
    bucket, key = spec["model"]["uri"].removeprefix("s3://").split("/", 1)
    client.upload_file(str(silero_dir() / "silero_vad.onnx"), bucket, key)
    variant = next(v for v in VARIANTS if v.file == "silero_vad.onnx")
    feeds = speech_feeds(variant, spec["validation"]["samples"])
    eval_dir = write_feeds(feeds, tmp_path / "eval")[0].parent
    bucket, prefix = spec["validation"]["dataUri"].removeprefix("s3://").split("/", 1)
    upload_dir(client, bucket, prefix, eval_dir)
