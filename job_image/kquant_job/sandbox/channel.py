"""Authenticated messages from the sandboxed child: its log lines and its outcome.

Model code runs inside the child, and TorchScript's ``aten::save`` can write to
``/proc/self/fd/N``: into the child's own log and outcome pipes, which Landlock does not
guard (pipes are on no mounted file system). A hostile-input trial forged ERROR records such
as "publish: done uri=s3://attacker/..." in the worker's log that way, and corrupted the
outcome. The parent therefore hands the child a fresh random key on its standard input,
which the child reads and closes before any model code runs (the key is then in its memory
only, and no file or descriptor holds it); every log line and the outcome carry an
HMAC-SHA256 of their bytes under that key, and the parent trusts nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_BYTES = 32
MAC_CHARS = 64  # hex SHA-256
SEPARATOR = "\t"  # never inside a JSON line: json.dumps escapes tabs in strings


def new_key() -> bytes:
    """A fresh key for one child (32 random bytes)."""
    return secrets.token_bytes(KEY_BYTES)


def mac(key: bytes, payload: bytes) -> str:
    """Hex HMAC-SHA256 of ``payload`` under ``key``."""
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def sign_line(key: bytes, line: str) -> str:
    """``line`` (one JSON log record, no newline) with its MAC appended after a tab."""
    return f"{line}{SEPARATOR}{mac(key, line.encode('utf-8'))}"


def open_line(key: bytes, signed: str) -> str | None:
    """The record of a line :func:`sign_line` made with ``key``; None when its MAC is
    missing or wrong (bytes someone else wrote into the channel)."""
    line, sep, tag = signed.rpartition(SEPARATOR)
    if not sep or len(tag) != MAC_CHARS:
        return None
    return line if hmac.compare_digest(mac(key, line.encode("utf-8")), tag) else None


def sign_outcome(key: bytes, payload: bytes) -> bytes:
    """The outcome ``payload`` followed by a newline and its MAC."""
    return payload + b"\n" + mac(key, payload).encode("ascii")


def open_outcome(key: bytes, data: bytes) -> bytes | None:
    """The payload of an outcome :func:`sign_outcome` made with ``key``; None when the bytes
    are not exactly that (a missing or wrong MAC, bytes added before or after)."""
    payload, sep, tag = data.rpartition(b"\n")
    if not sep or len(tag) != MAC_CHARS:
        return None
    ok = hmac.compare_digest(mac(key, payload).encode("ascii"), tag)
    return payload if ok else None
