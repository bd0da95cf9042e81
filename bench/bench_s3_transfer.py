"""S3 transfer throughput: kquant's S3Storage versus plain boto3 defaults.

Starts moto's S3 server on loopback (or uses --endpoint, e.g. a MinIO), writes one random
object of --mb MB, and times upload and download of it through

* ``S3Storage`` (16 MiB parts, 8 threads, sha256 computed before the upload and stored as
  metadata, atomic rename after the download), and
* ``boto3`` ``client.upload_file`` / ``download_file`` with the default TransferConfig
  (8 MiB parts, 10 threads).

Prints MB/s (1 MB = 10^6 bytes) per client and direction, best of --repeat runs. Against moto
the figures measure moto's Python server as much as the client (it is CPU-bound on the same
machine); use --endpoint for a real store. A benchmark, not a test: it never fails on time.

    .venv/bin/python bench/bench_s3_transfer.py --mb 50
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import boto3

from kquant_api.spec import StorageConfig
from kquant_job.storage import sha256_file
from kquant_job.storage.s3 import S3Storage

BUCKET = "kquant-bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=500, help="object size in MB (10^6 bytes)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (best)")
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
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=BUCKET)
    ours = S3Storage(StorageConfig(endpoint=endpoint))
    with tempfile.TemporaryDirectory(prefix="kquant-bench-") as tmp:
        src = Path(tmp) / "object.bin"
        write_random(src, size)
        hash_s = best_seconds(lambda: sha256_file(src), repeat)
        digest = sha256_file(src)
        rows = []
        for name, up, down in (
            (
                "kquant S3Storage",
                lambda: ours.upload(src, f"s3://{BUCKET}/ours/object.bin"),
                lambda: ours.download(f"s3://{BUCKET}/ours/object.bin", Path(tmp) / "ours"),
            ),
            (
                "boto3 defaults",
                lambda: client.upload_file(str(src), BUCKET, "plain/object.bin"),
                lambda: client.download_file(
                    BUCKET, "plain/object.bin", str(Path(tmp) / "plain.bin")
                ),
            ),
        ):
            up_s = best_seconds(up, repeat)
            down_s = best_seconds(down, repeat)
            rows.append((name, size / 1e6 / up_s, size / 1e6 / down_s))
        for got in (Path(tmp) / "ours" / "object.bin", Path(tmp) / "plain.bin"):
            assert sha256_file(got) == digest, f"{got} differs from the uploaded object"

    print(f"object {size / 1e6:.0f} MB, endpoint {label}, best of {repeat}")
    print(f"sha256 of the file alone: {size / 1e6 / hash_s:,.0f} MB/s (part of our upload)")
    print(f"{'client':<18} {'upload MB/s':>12} {'download MB/s':>14}")
    for name, up_rate, down_rate in rows:
        print(f"{name:<18} {up_rate:>12.1f} {down_rate:>14.1f}")


if __name__ == "__main__":
    main()
