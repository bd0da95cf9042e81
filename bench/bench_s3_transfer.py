"""S3 transfer throughput: kquant's S3Storage against the best plain boto3 configuration.

Starts moto's S3 server on loopback (or uses --endpoint: a MinIO, an ``s3rver``, real S3),
writes one random object of --mb MB, and times, on that one server:

1. plain boto3 ``upload_file`` / ``download_file`` for each TransferConfig of a grid (part
   sizes 8, 16, 64 MiB and one part per thread; 4, 8 or 16 threads; one single request),
   to find the best configuration per direction on this server;
2. kquant's ``S3Storage`` at its defaults, sha256 included (the upload hashes the file and
   stores the digest as metadata; the download lands under a temporary name and is renamed);
3. kquant's ``S3Storage`` set, through its ``KQUANT_S3_*`` variables, to the best
   configuration of step 1: what our layer costs at equal settings.

Each kquant figure is timed next to a fresh run of the boto3 configuration it is compared
with (best of --repeat, alternating), and printed as a ratio: ``kquant / best boto3``, above 1
when kquant is faster. Which configuration is best depends on the server: loopback servers
written in one process (moto, s3rver) serve few large requests best, while real S3 scales with
parallel ranged requests. A benchmark, not a test: it never fails on time.

    .venv/bin/python bench/bench_s3_transfer.py --mb 400
    .venv/bin/python bench/bench_s3_transfer.py --mb 400 --endpoint http://127.0.0.1:4569
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig

from kquant_api.spec import StorageConfig
from kquant_job.storage import sha256_file
from kquant_job.storage.s3 import S3Storage
from kquant_job.storage.s3_transfer import MIB, TransferSettings

BUCKET = "kquant-bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
SINGLE = 5 * 1024  # MiB: a threshold above the object makes boto3 send one request


@dataclass(frozen=True)
class Setting:
    """One transfer configuration: part size (MiB; SINGLE for one request) and threads."""

    part_mib: int
    threads: int

    def label(self) -> str:
        if self.part_mib >= SINGLE:
            return "one request"
        return f"{self.part_mib} MiB x {self.threads}"

    def boto3_config(self) -> TransferConfig:
        return TransferConfig(
            multipart_threshold=self.part_mib * MIB,
            multipart_chunksize=self.part_mib * MIB,
            max_concurrency=self.threads,
            preferred_transfer_client="classic",
        )

    def kquant_settings(self) -> TransferSettings:
        return TransferSettings(
            multipart_threshold=self.part_mib * MIB,
            multipart_chunksize=self.part_mib * MIB,
            max_concurrency=self.threads,
        )


def grid(size: int) -> list[Setting]:
    """The boto3 configurations tried: fixed part sizes, one part per thread, one request."""
    out = [Setting(part, threads) for part in (8, 16, 64) for threads in (4, 8, 16)]
    out += [Setting(max(8, math.ceil(size / threads / MIB)), threads) for threads in (4, 8)]
    return [*dict.fromkeys(out), Setting(SINGLE, 1)]


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


def write_random(path: Path, size: int) -> None:
    with path.open("wb") as fh:
        left = size
        while left:
            block = os.urandom(min(left, 16 * 1024 * 1024))
            fh.write(block)
            left -= len(block)


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def paired(ours: Callable[[], object], theirs: Callable[[], object], repeat: int) -> tuple:
    """Best seconds of each, run alternately so drift in the server weighs on both alike."""
    a, b = [], []
    for _ in range(repeat):
        for fn, times in ((theirs, b), (ours, a)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return min(a), min(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=400, help="object size in MB (10^6 bytes)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement (best)")
    parser.add_argument("--endpoint", help="use this S3 endpoint instead of starting moto")
    args = parser.parse_args()

    proc = None
    if args.endpoint:
        endpoint = args.endpoint
    else:
        os.environ.update(CREDENTIALS)
        proc, endpoint = start_moto()
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    try:
        label = endpoint if args.endpoint else f"{endpoint} (moto)"
        run(endpoint, label, args.mb * 1_000_000, args.repeat)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)


def run(endpoint: str, label: str, size: int, repeat: int) -> None:
    client = boto3.client("s3", endpoint_url=endpoint)
    exists = (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists)
    with contextlib.suppress(*exists):
        client.create_bucket(Bucket=BUCKET)
    config = StorageConfig(endpoint=endpoint)
    with tempfile.TemporaryDirectory(prefix="kquant-bench-") as tmp:
        src = Path(tmp) / "object.bin"
        write_random(src, size)
        digest = sha256_file(src)
        hash_s = best_seconds(lambda: sha256_file(src), repeat)
        client.upload_file(str(src), BUCKET, "plain/object.bin")

        def up(s: Setting) -> Callable[[], object]:
            return lambda: client.upload_file(
                str(src), BUCKET, "plain/up.bin", Config=s.boto3_config()
            )

        def down(s: Setting) -> Callable[[], object]:
            return lambda: client.download_file(
                BUCKET, "plain/object.bin", str(Path(tmp) / "plain.bin"), Config=s.boto3_config()
            )

        print(f"object {size / 1e6:.0f} MB, endpoint {label}, best of {repeat}")
        print(f"sha256 of the file alone: {size / 1e6 / hash_s:,.0f} MB/s (part of our upload)")
        print(f"\nplain boto3, MB/s\n{'configuration':<16} {'upload':>8} {'download':>9}")
        rates: dict[Setting, tuple[float, float]] = {}
        for s in grid(size):
            up_s, down_s = best_seconds(up(s), repeat), best_seconds(down(s), repeat)
            rates[s] = (size / 1e6 / up_s, size / 1e6 / down_s)
            print(f"{s.label():<16} {rates[s][0]:>8.1f} {rates[s][1]:>9.1f}", flush=True)
        best_up = max(rates, key=lambda s: rates[s][0])
        best_down = max(rates, key=lambda s: rates[s][1])

        def ours(settings: TransferSettings) -> tuple[Callable, Callable]:
            storage = S3Storage(config, settings)
            uri = f"s3://{BUCKET}/ours/object.bin"
            return (
                lambda: storage.upload(src, uri),
                lambda: storage.download(f"s3://{BUCKET}/plain/object.bin", Path(tmp) / "ours"),
            )

        defaults = TransferSettings.from_env({})
        print(f"\nkquant S3Storage against the best boto3 ({size / 1e6:.0f} MB, sha256 included)")
        print(f"{'kquant settings':<24} {'direction':<9} {'boto3 best':<16} {'ratio':>6}")
        for name, settings_up, settings_down in (
            ("defaults", defaults, defaults),
            ("best boto3's", best_up.kquant_settings(), best_down.kquant_settings()),
        ):
            our_up, _ = ours(settings_up)
            _, our_down = ours(settings_down)
            for direction, fn, best, theirs in (
                ("upload", our_up, best_up, up(best_up)),
                ("download", our_down, best_down, down(best_down)),
            ):
                a, b = paired(fn, theirs, repeat)
                print(f"{name:<24} {direction:<9} {best.label():<16} {b / a:>6.2f}x", flush=True)
        got = Path(tmp) / "ours" / "object.bin"
        assert sha256_file(got) == digest, f"{got} differs from the uploaded object"
        stored = client.head_object(Bucket=BUCKET, Key="ours/object.bin")["Metadata"]
        assert stored.get("sha256") == digest, "the upload's sha256 metadata is wrong"


if __name__ == "__main__":
    main()
