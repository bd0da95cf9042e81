"""The operator image's entrypoint (operator/entrypoint.sh) as a process: ``kopf run -m
kquant_operator`` registers the handlers on import, logs in through the kubeconfig, serves
its liveness endpoint and turns a QuantizationJob of a watched namespace into a Job."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import free_port
from kube_emulator import JOBS, QJOBS, KubeEmulator
from kube_rules import write_kubeconfig
from operator_helpers import Api, silero_example, stored, wait_for

ENTRYPOINT = Path(__file__).resolve().parents[2] / "operator" / "entrypoint.sh"
pytestmark = [pytest.mark.asyncio, pytest.mark.kmock(cls=KubeEmulator)]


async def healthy(port: int) -> bool:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as resp,
        ):
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def test_the_image_entrypoint_runs_the_operator(kmock, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KQUANT_")}
    env.update(
        KUBECONFIG=str(write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url))),
        KQUANT_WATCH_NAMESPACES="speech",
        KQUANT_LIVENESS_PORT=str(port),
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
    )
    proc = await asyncio.create_subprocess_exec(
        str(ENTRYPOINT), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        await wait_for(lambda: healthy(port), timeout=60, what="the liveness endpoint")
        await wait_for(
            lambda: kmock.watches_started[QJOBS] and kmock.watches_started[JOBS], what="watches"
        )
        await Api(kmock).create(QJOBS, "speech", silero_example("http://127.0.0.1:1", "speech"))
        [job] = await wait_for(lambda: stored(kmock, JOBS, "speech"), what="the Job")
    finally:
        proc.terminate()
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert job["metadata"]["name"] == "silero-vad-fp16-1"
    lines = [json.loads(line) for line in output.decode().splitlines() if line.startswith("{")]
    assert any(r.get("message") == "created Job silero-vad-fp16-1" for r in lines), output
    assert proc.returncode == 0, output.decode()[-2000:]
