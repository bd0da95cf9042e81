"""Classifying botocore / boto3 failures into StorageError reasons.

Messages name the URI, the S3 error code, the HTTP status and the operation, never the
server's free text (which for some errors echoes request details) and never a credential.
"""

from __future__ import annotations

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    NoCredentialsError,
    PartialCredentialsError,
)

from kquant_api import Reason
from kquant_job.errors import StorageError

NOT_FOUND_CODES = frozenset(
    {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "InvalidBucketName", "NoSuchVersion"}
)
DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidSecurity",
        "AuthorizationHeaderMalformed",
        "InvalidObjectState",  # archived (Glacier) objects cannot be read until restored
    }
)
# 4xx codes that a retry may fix: timeouts, a body cut short in transit, throttling, a
# conditional write racing another one (AWS answers 409 ConditionalRequestConflict).
TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "IncompleteBody",
        "BadDigest",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestTimeTooSkewed",
        "OperationAborted",
        "ConditionalRequestConflict",
    }
)
PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})
_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)


def unwrap(exc: BaseException) -> ClientError | BotoCoreError | None:
    """The botocore error behind ``exc``, following boto3's wrappers (S3UploadFailedError
    keeps the ClientError as its context; RetriesExceededError as ``last_exception``).
    None when no botocore error is involved."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, (ClientError, BotoCoreError)):
            return current
        seen.add(id(current))
        current = (
            getattr(current, "last_exception", None) or current.__cause__ or current.__context__
        )
    return None


def classify(exc: ClientError | BotoCoreError, uri: str) -> StorageError:
    """Map a botocore error to StorageError: not found -> SourceNotFound; 401/403, bad,
    expired or missing credentials -> AccessDenied; 412 (a conditional write or read whose
    condition failed) -> ConcurrentWrite; other 4xx and 501 (a request the server refuses as
    it stands: KeyTooLong, InvalidArgument, EntityTooLarge, NotImplemented...) ->
    StorageRejected, never retried, except the transient ones (TRANSIENT_CODES, 408, 429);
    connection errors, timeouts, throttling, 5xx (all after botocore's own retries) ->
    StorageUnavailable."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        detail = f"{code or 'error'}, HTTP {status or '?'}, {exc.operation_name}"
        if code in NOT_FOUND_CODES or status == 404:
            what = "bucket" if code == "NoSuchBucket" else "object"
            return StorageError(f"{uri}: {what} not found ({detail})", reason=Reason.SourceNotFound)
        if code in DENIED_CODES or status in (401, 403):
            return StorageError(f"{uri}: access denied ({detail})", reason=Reason.AccessDenied)
        if code in PRECONDITION_CODES or status == 412:
            return StorageError(
                f"{uri}: changed by another writer ({detail})", reason=Reason.ConcurrentWrite
            )
        permanent = (400 <= status < 500 and status not in (408, 429)) or status == 501
        if permanent and code not in TRANSIENT_CODES:
            hint = (
                " (the server does not implement this request: kquant needs conditional "
                "writes, If-None-Match / If-Match, as AWS S3 and MinIO provide)"
                if status == 501
                else ""
            )
            return StorageError(
                f"{uri}: request refused by the storage ({detail}){hint}",
                reason=Reason.StorageRejected,
            )
        return StorageError(
            f"{uri}: storage request failed ({detail})", reason=Reason.StorageUnavailable
        )
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return StorageError(
            f"{uri}: no usable S3 credentials ({type(exc).__name__}); set AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (spec.storage.secretRef), a profile or IRSA",
            reason=Reason.AccessDenied,
        )
    return StorageError(
        f"{uri}: storage unreachable ({type(exc).__name__}: {exc})",
        reason=Reason.StorageUnavailable,
    )
