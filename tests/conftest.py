"""Shared fixtures: the real Silero VAD models from the silero-vad package, the speech
fixture, and a moto S3 server process on loopback (real HTTP)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
# the clip kquant ships for zero-config validation (made by tests/fixtures/make_speech.sh)
SPEECH_WAV = Path(__file__).parents[1] / "job_image/kquant_job/data/speech_16k.wav"


def silero_dir() -> Path:
    """The data folder of the installed silero-vad package."""
    import importlib.util

    spec = importlib.util.find_spec("silero_vad")
    assert spec and spec.origin, "silero-vad is not installed (pip install -e '.[test]')"
    return Path(spec.origin).parent / "data"


def save_external(src: Path, folder: Path, location: str = "model.onnx.data") -> Path:
    """``src`` saved as ``folder/model.onnx`` (``folder`` created) with every tensor in the
    data file ``location`` beside it; returns the .onnx path."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "model.onnx"
    onnx.save(onnx.load(str(src)), str(out), save_as_external_data=True, location=location,
              size_threshold=0)  # fmt: skip
    return out


def silero_onnx_variants() -> list[Path]:
    """Every FP32 ONNX variant shipped in the silero-vad package, sorted by name."""
    return sorted(silero_dir().glob("*.onnx"))


@pytest.fixture(scope="session")
def silero_onnx() -> Path:
    """The default Silero VAD ONNX model (FP32, If subgraphs, 16 and 8 kHz branches)."""
    return silero_dir() / "silero_vad.onnx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """A running moto server: its endpoint and credentials that it accepts."""

    endpoint: str
    access_key: str = "testing-key"
    secret_key: str = "testing-secret"
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """Environment for a worker subprocess talking to this server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_DEFAULT_REGION=self.region,
            AWS_EC2_METADATA_DISABLED="true",
        )
        return env

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server as a separate process on a free loopback port."""
    proc, endpoint = _start_moto({})
    try:
        yield S3Server(endpoint=endpoint)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point this process's AWS credential chain at the moto server's accepted keys."""
    for key, value in s3_server.env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def worker_env(s3_server: S3Server) -> dict[str, str]:
    """Environment for a ``kquant-job`` subprocess using the moto server (2 S3 attempts and
    a 2 s retry window, so outage tests end quickly)."""
    env = s3_server.env()
    env["KQUANT_S3_MAX_ATTEMPTS"] = "2"
    env["KQUANT_S3_RETRY_SECONDS"] = "2"
    return env


@pytest.fixture
def bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket per test."""
    name = "kq-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40]
    # Truncated names of parametrized tests collide: a hash of the node id keeps them apart.
    name = name.strip("-") + "-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]
    client = s3_server.client()
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=name)
    return name


@dataclass
class S3AuthServer(S3Server):
    """A moto server that checks signatures and IAM policies. ``access_key``/``secret_key``
    belong to an allow-all user; ``denied_*`` authenticate but are allowed nothing."""

    denied_access_key: str = ""
    denied_secret_key: str = ""


def _start_moto(extra_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = shutil.which("moto_server") or ""
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **extra_env},
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
    raise RuntimeError("moto server did not start")


@pytest.fixture(scope="session")
def s3_auth_server() -> Iterator[S3AuthServer]:
    """A second moto server process that enforces authentication.

    moto checks credentials only after its first INITIAL_NO_AUTH_ACTION_COUNT requests; with
    3, those three (unauthenticated) IAM calls create an allow-all user and its access key.
    Every later request must be signed with a key moto's IAM knows (else 403
    InvalidAccessKeyId / SignatureDoesNotMatch) and be allowed by the user's policy (else 403
    AccessDenied); the admin then creates a second user with no policy for the latter.
    """
    import json

    import boto3

    proc, endpoint = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        anon = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", **anon)
        allow_all = {"Effect": "Allow", "Action": "*", "Resource": "*"}
        iam.create_user(UserName="kquant-admin")
        iam.put_user_policy(
            UserName="kquant-admin",
            PolicyName="allow-all",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [allow_all]}),
        )
        admin = iam.create_access_key(UserName="kquant-admin")["AccessKey"]
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=admin["AccessKeyId"],
            aws_secret_access_key=admin["SecretAccessKey"],
        )
        iam.create_user(UserName="kquant-nobody")
        nobody = iam.create_access_key(UserName="kquant-nobody")["AccessKey"]
        yield S3AuthServer(
            endpoint=endpoint,
            access_key=admin["AccessKeyId"],
            secret_key=admin["SecretAccessKey"],
            denied_access_key=nobody["AccessKeyId"],
            denied_secret_key=nobody["SecretAccessKey"],
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@dataclass
class Store:
    """A storage back end under test and a fresh root prefix in it (ends in '/')."""

    storage: Any
    root: str
    kind: str

    def uri(self, key: str) -> str:
        """The URI of ``key`` below the root."""
        return self.root + key


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same test against a local directory (``file://``) and the moto S3 server."""
    if request.param == "file":
        from kquant_job.storage.file import FileStorage

        return Store(FileStorage(), f"file://{tmp_path}/store/", "file")
    from kquant_api.spec import StorageConfig
    from kquant_job.storage.s3 import S3Storage

    server = request.getfixturevalue("s3_env")
    name = request.getfixturevalue("bucket")
    storage = S3Storage(StorageConfig(endpoint=server.endpoint, region=server.region))
    return Store(storage, f"s3://{name}/", "s3")
