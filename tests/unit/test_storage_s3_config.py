"""S3Storage configuration and error classification, without a server (no requests made)."""

from __future__ import annotations

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from s3transfer.exceptions import RetriesExceededError

from kquant_api import Reason
from kquant_api.spec import StorageConfig
from kquant_job.errors import InvalidSpec, StorageError
from kquant_job.storage.s3 import S3Storage, parse_uri
from kquant_job.storage.s3_errors import classify, unwrap
from kquant_job.storage.s3_transfer import MIB, TransferSettings


def test_settings_defaults_and_environment():
    assert TransferSettings.from_env({}) == TransferSettings()
    assert TransferSettings().retry_seconds == 60
    s = TransferSettings.from_env(
        {
            "KQUANT_S3_MAX_ATTEMPTS": "2",
            "KQUANT_S3_RETRY_SECONDS": "5",
            "KQUANT_S3_CONNECT_TIMEOUT": "1.5",
            "KQUANT_S3_MULTIPART_THRESHOLD_MIB": "64",
            "KQUANT_S3_MULTIPART_CHUNKSIZE_MIB": "8",
            "KQUANT_S3_MAX_CONCURRENCY": "4",
        }
    )
    assert (s.max_attempts, s.connect_timeout, s.max_concurrency) == (2, 1.5, 4)
    assert s.retry_seconds == 5
    assert (s.multipart_threshold, s.multipart_chunksize) == (64 * MIB, 8 * MIB)
    cfg = s.transfer_config()
    assert (cfg.multipart_threshold, cfg.multipart_chunksize) == (64 * MIB, 8 * MIB)
    assert cfg.max_request_concurrency == 4


@pytest.mark.parametrize(
    ("size_mib", "threads", "part_mib"),
    [
        (10, 8, 16),  # below the chunk size: the chunk size (one request under the threshold)
        (200, 8, 25),  # one ranged GET per thread
        (400, 8, 50),
        (4000, 8, 64),  # capped: 63 parts of 64 MiB, 8 at a time
        (400, 4, 64),
    ],
)
def test_download_parts_one_per_thread_within_bounds(size_mib, threads, part_mib):
    settings = TransferSettings(max_concurrency=threads)
    cfg = settings.download_config(size_mib * MIB)
    assert cfg.multipart_chunksize == part_mib * MIB
    assert (cfg.max_request_concurrency, cfg.multipart_threshold) == (threads, 16 * MIB)


def test_download_parts_never_below_the_chunk_size():
    cfg = TransferSettings(multipart_chunksize=32 * MIB).download_config(100 * MIB)
    assert cfg.multipart_chunksize == 32 * MIB


@pytest.mark.parametrize("value", ["0", "-1", "many", "nan", "inf"])
def test_bad_setting_is_invalid_spec_naming_the_variable(value):
    with pytest.raises(InvalidSpec, match="KQUANT_S3_MAX_ATTEMPTS"):
        TransferSettings.from_env({"KQUANT_S3_MAX_ATTEMPTS": value})


def test_client_config_follows_storage_config(monkeypatch):
    monkeypatch.setenv("KQUANT_S3_MAX_ATTEMPTS", "3")
    with_endpoint = S3Storage(StorageConfig(endpoint="http://minio.storage:9000"))
    cfg = with_endpoint.client.meta.config
    assert cfg.s3["addressing_style"] == "path"
    assert cfg.retries == {"mode": "standard", "total_max_attempts": 3}
    assert with_endpoint.client.meta.endpoint_url == "http://minio.storage:9000"
    aws = S3Storage(StorageConfig(region="eu-west-1"))
    assert aws.client.meta.config.s3["addressing_style"] == "auto"
    assert aws.client.meta.region_name == "eu-west-1"
    virtual = S3Storage(StorageConfig(endpoint="http://x:9000", addressingStyle="virtual"))
    assert virtual.client.meta.config.s3["addressing_style"] == "virtual"
    with pytest.raises(InvalidSpec):
        S3Storage(StorageConfig(endpoint="not a url"))


def test_parse_uri():
    assert parse_uri("s3://bucket/a/b.onnx") == ("bucket", "a/b.onnx")
    assert parse_uri("s3://bucket/") == ("bucket", "")
    assert parse_uri("s3://bucket/a..b/.c") == ("bucket", "a..b/.c")  # only whole segments
    for bad in ("s3:///key", "file:///x"):
        with pytest.raises(InvalidSpec):
            parse_uri(bad)
    for unsafe in ("s3://b/m/..", "s3://b/../m.onnx", "s3://b/m/./x", "s3://b/m/../"):
        with pytest.raises(StorageError) as info:
            parse_uri(unsafe)
        assert info.value.reason is Reason.UnsafePath and info.value.exit_code == 20
    storage = S3Storage(StorageConfig(endpoint="http://x:9000"))
    for prefix in ("s3://bucket", "s3://bucket/dir/"):  # no request is made for these
        with pytest.raises(InvalidSpec, match="names a prefix"):
            storage.stat(prefix)


def _client_error(code: str, status: int) -> ClientError:
    response = {"Error": {"Code": code, "Message": "secret-ish detail"}}
    response["ResponseMetadata"] = {"HTTPStatusCode": status}
    return ClientError(response, "GetObject")


@pytest.mark.parametrize(
    ("code", "status", "reason"),
    [
        ("NoSuchKey", 404, Reason.SourceNotFound),
        ("404", 404, Reason.SourceNotFound),
        ("NoSuchBucket", 404, Reason.SourceNotFound),
        ("AccessDenied", 403, Reason.AccessDenied),
        ("InvalidAccessKeyId", 403, Reason.AccessDenied),
        ("SignatureDoesNotMatch", 403, Reason.AccessDenied),
        ("ExpiredToken", 400, Reason.AccessDenied),
        ("InternalError", 500, Reason.StorageUnavailable),
        ("SlowDown", 503, Reason.StorageUnavailable),
        ("ServiceUnavailable", 503, Reason.StorageUnavailable),
        # permanent: a retry sends the same refused request
        ("KeyTooLong", 400, Reason.StorageRejected),
        ("InvalidArgument", 400, Reason.StorageRejected),
        ("EntityTooLarge", 400, Reason.StorageRejected),
        ("MalformedXML", 400, Reason.StorageRejected),
        ("MethodNotAllowed", 405, Reason.StorageRejected),
        ("NotImplemented", 501, Reason.StorageRejected),
        # transient 4xx
        ("RequestTimeout", 400, Reason.StorageUnavailable),
        ("IncompleteBody", 400, Reason.StorageUnavailable),
        ("ConditionalRequestConflict", 409, Reason.StorageUnavailable),
        ("TooManyRequests", 429, Reason.StorageUnavailable),
        # a conditional write or read lost its race
        ("PreconditionFailed", 412, Reason.ConcurrentWrite),
    ],
)
def test_client_errors_are_classified(code, status, reason):
    err = classify(_client_error(code, status), "s3://b/k")
    assert err.reason is reason
    assert "s3://b/k" in str(err) and code in str(err)
    assert "secret-ish" not in str(err)  # the server's free text is never echoed


def test_transport_and_credential_errors_are_classified():
    down = EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b")
    assert classify(down, "s3://b/k").reason is Reason.StorageUnavailable
    assert classify(NoCredentialsError(), "s3://b/k").reason is Reason.AccessDenied


def test_boto3_wrappers_are_unwrapped():
    inner = _client_error("NoSuchBucket", 404)
    try:
        try:
            raise inner
        except ClientError as e:
            raise S3UploadFailedError("Failed to upload") from e
    except S3UploadFailedError as wrapped:
        assert unwrap(wrapped) is inner
    timeout = ReadTimeoutError(endpoint_url="http://x")
    assert unwrap(RetriesExceededError(timeout)) is timeout
    assert unwrap(ValueError("unrelated")) is None
