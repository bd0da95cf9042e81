"""Line-oriented logs with stage timings, as text for people or JSON lines for machines."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, TextIO

LOG = logging.getLogger("kquant")


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=timezone.utc).strftime("%H:%M:%S")
        fields = getattr(record, "fields", None) or {}
        extra = "".join(f" {printable(str(k))}={_text(v)}" for k, v in fields.items())
        line = f"{ts} {record.levelname:<7} {printable(record.getMessage())}{extra}"
        if record.exc_info and record.levelno >= logging.ERROR:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    def __init__(self, sign: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self.sign = sign

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(getattr(record, "fields", None) or {})
        line = json.dumps(data, default=str, separators=(",", ":"))
        return self.sign(line) if self.sign else line


def printable(text: str) -> str:
    """``text`` with every non-printable character (newline, carriage return, escape
    sequences, other control and format characters) written as a Python escape, so a file
    name or a model's message cannot start a forged log line or recolour a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _text(value: Any) -> str:
    """A field value for the text format: quoted (JSON) when it is empty or holds a space, a
    quote, '=' or any non-printable character, so one record is always one parseable line."""
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "='):
        return text
    return printable(json.dumps(text, ensure_ascii=False))


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Send kquant's logs to stderr, one record per line, as ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger("kquant")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def setup_stream_logging(
    stream: TextIO, level: int = logging.INFO, sign: Callable[[str], str] | None = None
) -> None:
    """Send kquant's logs to ``stream`` as JSON lines (the sandboxed process's log pipe,
    which the parent reads back with :func:`relay_record`), each passed through ``sign``
    when given (:func:`kquant_job.sandbox.channel.sign_line`)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_JsonFormatter(sign))
    root = logging.getLogger("kquant")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# Keys of a JSON log record that are not fields of the record.
_RECORD_KEYS = frozenset({"time", "level", "logger", "message"})


def relay_record(line: str, source: str) -> dict[str, Any]:
    """Log one JSON line another kquant process wrote (with :func:`setup_stream_logging`)
    through this process's handlers, and return its fields. A line that is not such a
    record (a library printing to the pipe) is logged as ``<source> output`` with the text
    as a field. Values are untrusted text: the formatters escape them."""
    try:
        data = json.loads(line)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("message"), str):
        LOG.info(f"{source} output", extra={"fields": {"line": line[:4096]}})
        return {}
    level = logging.getLevelName(str(data.get("level", "info")).upper())
    fields = {str(k): v for k, v in data.items() if k not in _RECORD_KEYS}
    name = str(data.get("logger", "kquant"))
    logger = logging.getLogger(name if name.startswith("kquant") else "kquant")
    logger.log(level if isinstance(level, int) else logging.INFO, data["message"][:4096],
               extra={"fields": fields})  # fmt: skip
    return fields


def info(message: str, **fields: Any) -> None:
    """Log ``message`` with structured ``fields`` (key=value in text, keys in JSON)."""
    LOG.info(message, extra={"fields": fields})


@contextmanager
def stage(name: str, timings: dict[str, float], **fields: Any) -> Iterator[None]:
    """Time a pipeline stage (fetch, convert, validate, publish): logs its start and its end
    with ``duration_ms``, and adds the duration (ms) to ``timings[name]``."""
    info(f"{name}: start", stage=name, **fields)
    start = time.perf_counter()
    outcome = "failed"
    try:
        yield
        outcome = "done"
    finally:
        ms = (time.perf_counter() - start) * 1000.0
        timings[name] = round(timings.get(name, 0.0) + ms, 1)
        info(f"{name}: {outcome}", stage=name, duration_ms=round(ms, 1))
