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
    expired or missing credentials -> AccessDenied; connection errors, timeouts, throttling,
    5xx (all after botocore's own retries) and anything else -> StorageUnavailable."""
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
