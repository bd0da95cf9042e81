"""The fault-injection proxy (tests/faults.py) between boto3 and moto's S3 server process."""

from __future__ import annotations

import os
import socket
import threading
import time
from urllib.parse import urlsplit

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError
from faults import FaultProxy

MIB = 1024 * 1024
# What a cut looks like to boto3: a reset before the request was sent or answered.
NETWORK_ERRORS = (EndpointConnectionError, ConnectionClosedError)
PARTS = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB, max_concurrency=4)


def _proxy_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("faultproxy")]


@pytest.fixture
def proxy(s3_server):
    upstream = urlsplit(s3_server.endpoint)
    with FaultProxy(upstream.hostname, upstream.port) as p:
        yield p
    assert _proxy_threads() == []  # stop() joined every thread it started


def _client(s3_server, url: str):
    """A boto3 S3 client for ``url``: one attempt, short timeouts, path-style."""
    config = Config(
        retries={"total_max_attempts": 1},
        connect_timeout=1,
        read_timeout=2,
        s3={"addressing_style": "path"},
    )
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
        config=config,
    )


@pytest.fixture
def client(s3_server, proxy):
    return _client(s3_server, proxy.url)


def _exists(s3_server, bucket: str, key: str) -> bool:
    """Whether the server holds the object, asked directly (not through the proxy)."""
    try:
        s3_server.client().head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        assert e.response["Error"]["Code"] == "404"
        return False
    return True


def _big_file(tmp_path, size: int = 12 * MIB):
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(size))
    return path


def test_multipart_upload_and_download_arrive_intact(proxy, client, bucket, tmp_path):
    src = _big_file(tmp_path)
    client.upload_file(str(src), bucket, "big.bin", Config=PARTS)
    client.download_file(bucket, "big.bin", str(tmp_path / "back.bin"), Config=PARTS)
    client.put_object(Bucket=bucket, Key="small", Body=b"hello")

    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    assert client.get_object(Bucket=bucket, Key="small")["Body"].read() == b"hello"
    assert proxy.bytes_up > src.stat().st_size and proxy.bytes_down > src.stat().st_size
    assert proxy.connections >= 8  # moto answers one request per connection, then closes


def test_cut_fails_calls_until_restore(s3_server, proxy, client, bucket):
    client.put_object(Bucket=bucket, Key="k", Body=b"v")

    proxy.cut()
    assert proxy.is_cut and proxy.wait_cut(0)
    with pytest.raises(NETWORK_ERRORS):
        client.get_object(Bucket=bucket, Key="k")
    with pytest.raises(NETWORK_ERRORS):  # a fresh connection is reset as well
        client.put_object(Bucket=bucket, Key="k2", Body=b"v")

    proxy.restore()
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"
    assert not _exists(s3_server, bucket, "k2")


@pytest.mark.parametrize("multipart", [False, True], ids=["put", "multipart"])
def test_cut_after_bytes_fails_the_upload_and_stores_nothing(
    s3_server, proxy, client, bucket, tmp_path, multipart
):
    src = _big_file(tmp_path, 12 * MIB if multipart else 3 * MIB)
    config = PARTS if multipart else TransferConfig(multipart_threshold=64 * MIB)
    before = proxy.bytes_up
    proxy.cut_after(2 * MIB)

    with pytest.raises((*NETWORK_ERRORS, boto3.exceptions.S3UploadFailedError)):
        client.upload_file(str(src), bucket, "big.bin", Config=config)

    assert proxy.wait_cut(0)
    assert proxy.bytes_up - before == 2 * MIB  # exactly the armed bytes went through
    assert not _exists(s3_server, bucket, "big.bin")
    proxy.restore()
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    # The failed transfer tried AbortMultipartUpload, but through the cut proxy.
    assert [u["Key"] for u in uploads] == (["big.bin"] if multipart else [])


def test_cut_when_cuts_at_the_chosen_request(s3_server, proxy, client, bucket):
    puts = []

    def second_put(chunk: bytes) -> bool:
        if chunk.startswith(b"PUT /"):
            puts.append(chunk.split(b" ", 2)[1])
        return len(puts) == 2

    proxy.cut_when(second_put)
    client.put_object(Bucket=bucket, Key="first", Body=b"1")
    assert not proxy.is_cut
    with pytest.raises(NETWORK_ERRORS):
        client.put_object(Bucket=bucket, Key="second", Body=b"2")

    assert proxy.wait_cut(0)
    assert puts == [f"/{bucket}/first".encode(), f"/{bucket}/second".encode()]
    assert _exists(s3_server, bucket, "first")
    assert not _exists(s3_server, bucket, "second")  # the cut request never reached it
    proxy.restore()
    client.put_object(Bucket=bucket, Key="third", Body=b"3")  # the trigger fired once
    assert _exists(s3_server, bucket, "third")


def test_cut_when_at_complete_multipart_upload(s3_server, proxy, client, bucket, tmp_path):
    def complete(chunk: bytes) -> bool:
        line = chunk.split(b"\r\n", 1)[0]
        return line.startswith(b"POST ") and b"uploadId=" in line

    proxy.cut_when(complete)
    with pytest.raises((*NETWORK_ERRORS, boto3.exceptions.S3UploadFailedError)):
        client.upload_file(str(_big_file(tmp_path)), bucket, "big.bin", Config=PARTS)

    assert not _exists(s3_server, bucket, "big.bin")
    proxy.restore()
    (upload,) = client.list_multipart_uploads(Bucket=bucket)["Uploads"]
    parts = client.list_parts(Bucket=bucket, Key="big.bin", UploadId=upload["UploadId"])
    assert [p["Size"] for p in parts["Parts"]] == [5 * MIB, 5 * MIB, 2 * MIB]


def test_cut_for_restores_after_the_delay(proxy, client, bucket):
    client.put_object(Bucket=bucket, Key="k", Body=b"v")
    start = time.monotonic()
    proxy.cut_for(3.0)  # the get below fails within it, however loaded the machine

    with pytest.raises(NETWORK_ERRORS):
        client.get_object(Bucket=bucket, Key="k")
    time.sleep(max(0.0, start + 3.5 - time.monotonic()))
    assert not proxy.is_cut
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"


def test_cut_resets_open_and_new_connections(proxy, bucket):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as conn:
        conn.sendall(f"GET /{bucket} HTTP/1.1\r\nHost: x\r\n".encode())  # half a request
        proxy.cut()
        with pytest.raises(ConnectionResetError):  # RST (SO_LINGER 0), not a clean FIN
            conn.recv(1)
    # A new connection is accepted and reset at once: on loopback the RST can already
    # fail connect() itself, else the first recv().
    with (
        pytest.raises(ConnectionResetError),
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as late,
    ):
        late.recv(1)


def test_stop_resets_connections_frees_the_port_and_joins_threads(s3_server, bucket):
    upstream = urlsplit(s3_server.endpoint)
    with FaultProxy(upstream.hostname, upstream.port) as proxy:
        conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        conn.sendall(f"GET /{bucket} HTTP/1.1\r\n".encode())  # moto waits for the rest
        deadline = time.monotonic() + 2
        while "faultproxy-down" not in _proxy_threads() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "faultproxy-down" in _proxy_threads()
    assert _proxy_threads() == []
    with conn, pytest.raises(ConnectionResetError):
        conn.recv(1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1)
