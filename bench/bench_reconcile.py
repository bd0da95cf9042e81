"""Reconcile latency of the operator against the kmock emulator, and its peak memory.

Starts the emulator (tests/integration/kube_emulator.py) on loopback, the test-only Job
controller/kubelet stand-in (tests/integration/job_standin.py) in canned mode (each Job ends
at once with a real JobResult; no worker runs: this measures the operator, not the
conversion), and the operator as its own process, ``kopf run -m kquant_operator``, as the
image runs it. Then it applies --count QuantizationJobs, twice:

* burst: all at once (``asyncio.gather`` of the creates), the operator's queueing under load;
* paced: one every --interval ms, the latency of a single reconcile.

and reports, from watch events the benchmark receives itself (``time.monotonic``):

* CR created -> Job created: the CR's ADDED event to its Job's ADDED event;
* Job finished -> status written: the Job's event carrying Complete/Failed to the CR's event
  carrying the final status of that generation;

as median and p99 (nearest rank) in ms, and the operator process's peak RSS (VmHWM from
/proc, MiB). A benchmark, not a test: it never fails on time. Figures include the emulator's
Python HTTP server on the same machine (the operator's API round trips go through it).

    .venv/bin/python bench/bench_reconcile.py --count 200
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import aiohttp
import kmock
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "integration"), str(ROOT / "tests")]

from job_standin import JobStandIn  # noqa: E402
from kube_emulator import JOBS, QJOBS, KubeEmulator  # noqa: E402
from kube_rules import write_kubeconfig  # noqa: E402
from operator_helpers import Api, silero_example, wait_for  # noqa: E402

from kquant_api import JobResult, Reason  # noqa: E402

NS = "bench"


def canned(job: dict) -> JobResult:
    out = "s3://bench/out/"
    return JobResult(
        phase="Succeeded",
        reason=Reason.Validated,
        precision="fp16",
        originalBytes=2327524,
        quantizedBytes=1286255,
        validation={"passed": True, "samples": 100, "device": "cpu", "maxAbsError": 0.17},
        artifacts=[{"uri": out + "silero_vad_fp16.onnx", "sha256": "0" * 64, "bytes": 1286255}],
        manifestUri=out + "manifest.json",
    )


class Clock:
    """Arrival times of the watch events that mark each step, per CR name."""

    def __init__(self) -> None:
        self.cr_added: dict[str, float] = {}
        self.job_added: dict[str, float] = {}
        self.job_done: dict[str, float] = {}
        self.status_final: dict[str, float] = {}

    async def watch(self, emulator: KubeEmulator, url: str, on_event) -> None:
        timeout = aiohttp.ClientTimeout(total=None)
        async with emulator.get(url, params={"watch": "true"}, timeout=timeout) as resp:
            async for line in resp.content:
                if line.strip():
                    on_event(json.loads(line), time.monotonic())

    def on_qjob(self, event: dict, now: float) -> None:
        obj = event["object"]
        name, status = obj["metadata"]["name"], obj.get("status") or {}
        self.cr_added.setdefault(name, now)
        if status.get("phase") in ("Succeeded", "Failed"):
            self.status_final.setdefault(name, now)

    def on_job(self, event: dict, now: float) -> None:
        obj = event["object"]
        name = obj["metadata"]["labels"]["kquant.io/name"]
        self.job_added.setdefault(name, now)
        conditions = (obj.get("status") or {}).get("conditions") or []
        if any(c["type"] in ("Complete", "Failed") for c in conditions):
            self.job_done.setdefault(name, now)


# API requests the emulator serves during the burst, by client and kind (GET qjob, PATCH pod
# status...), counted by the subclass below when ``Requests.on`` is set.
class Requests:
    on = False
    operator: ClassVar[collections.Counter] = collections.Counter()
    others: ClassVar[collections.Counter] = collections.Counter()

    @staticmethod
    def kind(raw: web.BaseRequest) -> str:
        parts = [p for p in raw.path.split("/") if p]
        if "namespaces" in parts:  # drop the namespace and the object's name
            i = parts.index("namespaces")
            parts = parts[i + 2 :]
            parts = parts[:1] + parts[2:] if len(parts) > 1 else parts
        watch = " watch" if raw.query.get("watch") else ""
        return f"{raw.method} {'/'.join(parts)}{watch}"


class CountingEmulator(KubeEmulator):
    async def __call__(self, raw_request: web.BaseRequest) -> web.StreamResponse:
        if Requests.on:
            agent = raw_request.headers.get("User-Agent", "")
            ours = "kopf" in agent or "kquant-operator" in agent  # kopf's and our client's
            (Requests.operator if ours else Requests.others)[Requests.kind(raw_request)] += 1
        return await super().__call__(raw_request)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc/PID/stat, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run_round(api: Api, clock: Clock, names: list[str], interval: float) -> None:
    qjobs = [silero_example("http://127.0.0.1:1", NS, name) for name in names]
    if interval <= 0:
        await asyncio.gather(*(api.create(QJOBS, NS, q) for q in qjobs))
    else:
        for qjob in qjobs:
            await api.create(QJOBS, NS, qjob)
            await asyncio.sleep(interval)
    await wait_for(
        lambda: all(n in clock.status_final for n in names), timeout=600, what="final statuses"
    )


def rows(label: str, clock: Clock, names: list[str]) -> list[tuple]:
    create = [1000 * (clock.job_added[n] - clock.cr_added[n]) for n in names]
    status = [1000 * (clock.status_final[n] - clock.job_done[n]) for n in names]
    out = []
    for metric, values in (
        ("CR created -> Job created", create),
        ("Job finished -> status", status),
    ):
        med, p99 = percentile(values, 50), percentile(values, 99)
        out.append((label, metric, len(values), med, p99, max(values)))
    return out


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="kquant-bench-"))
    async with CountingEmulator() as emulator, kmock.Server(emulator):
        env = {k: v for k, v in os.environ.items() if not k.startswith("KQUANT_")}
        env["KUBECONFIG"] = str(write_kubeconfig(tmp / "kubeconfig", str(emulator.url)))
        log = (tmp / "operator.log").open("w")
        # --profile: the operator's event loop thread under cProfile (pstats file)
        profile = ["-m", "cProfile", "-o", args.profile] if args.profile else []
        operator = await asyncio.create_subprocess_exec(
            sys.executable, *profile, "-m", "kopf", "run", "-m", "kquant_operator",
            "--standalone", "--all-namespaces", env=env, stdout=log, stderr=log,
        )  # fmt: skip
        clock = Clock()
        watches = [
            asyncio.create_task(clock.watch(emulator, "/apis/kquant.io/v1alpha1/quantizationjobs",
                                            clock.on_qjob)),
            asyncio.create_task(clock.watch(emulator, "/apis/batch/v1/jobs", clock.on_job)),
        ]  # fmt: skip
        try:
            async with JobStandIn(emulator, tmp / "kubelet", canned):
                await wait_for(
                    lambda: (
                        emulator.watches_started[QJOBS] >= 2 and emulator.watches_started[JOBS] >= 3
                    ),
                    timeout=60,
                    what="the operator's watches",
                )
                api, table = Api(emulator), []
                burst = [f"burst-{i:04d}" for i in range(args.count)]
                t0, cpu0, own0 = (
                    time.monotonic(),
                    cpu_seconds(operator.pid),
                    cpu_seconds(os.getpid()),
                )
                Requests.on = True
                await run_round(api, clock, burst, 0)
                Requests.on = False
                burst_s, burst_cpu = time.monotonic() - t0, cpu_seconds(operator.pid) - cpu0
                emulator_cpu = cpu_seconds(os.getpid()) - own0
                table += rows("burst", clock, burst)
                paced = [f"paced-{i:04d}" for i in range(args.count)]
                await run_round(api, clock, paced, args.interval / 1000)
                table += rows(f"paced {args.interval:g} ms", clock, paced)
                rss, cpu = peak_rss_mib(operator.pid), cpu_seconds(operator.pid)
        finally:
            operator.send_signal(signal.SIGINT)  # kopf exits cleanly: cProfile writes its file
            try:
                await asyncio.wait_for(operator.wait(), 30)
            except TimeoutError:
                operator.kill()
                await operator.wait()
            for task in watches:
                task.cancel()
            log.close()
    print(f"{args.count} QuantizationJobs per round; operator log: {tmp / 'operator.log'}")
    print(f"{'round':<14} {'latency':<27} {'n':>4} {'median ms':>10} {'p99 ms':>9} {'max ms':>9}")
    for label, metric, n, med, p99, top in table:
        print(f"{label:<14} {metric:<27} {n:>4} {med:>10.1f} {p99:>9.1f} {top:>9.1f}")
    print(
        f"burst round: all {args.count} final after {burst_s:.1f} s "
        f"(operator CPU {burst_cpu:.1f} s, {burst_cpu / args.count * 1000:.0f} ms per CR; "
        f"emulator, Job stand-in and this benchmark's watches, one process: {emulator_cpu:.1f} s "
        f"CPU, {emulator_cpu / burst_s:.0%} of one core; {os.cpu_count()} cores)"
    )
    print(f"operator peak RSS (VmHWM): {rss:.1f} MiB; operator CPU time: {cpu:.1f} s")
    for who, counts in (("operator", Requests.operator), ("stand-in + benchmark", Requests.others)):
        total = sum(counts.values())
        top = ", ".join(f"{k} {v / args.count:.1f}" for k, v in counts.most_common(8))
        print(f"burst requests served for the {who}: {total / args.count:.1f} per CR ({top})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="QuantizationJobs per round")
    parser.add_argument("--interval", type=float, default=50, help="paced round: ms between CRs")
    parser.add_argument("--profile", help="write a cProfile of the operator to this file")
    asyncio.run(main(parser.parse_args()))
