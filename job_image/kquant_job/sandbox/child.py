"""The sandboxed process:
``python -I -B -m kquant_job.sandbox.child REQUEST LOG_FD OUTCOME_FD``.

It confines itself (:mod:`kquant_job.sandbox.confine`) before importing any model library,
then runs the request's task (:func:`kquant_job.stage.convert_and_validate` by default; the
dry run's plan, or ``inspect``) and sends its outcome as JSON down the pipe OUTCOME_FD:
``{"ok": <the task's result>, "sandbox": {...}}`` or
``{"error": {"reason", "message", "detail"}, "sandbox": {...}}``. Logs go to LOG_FD as
JSON lines. Both are signed with the key the parent writes on standard input
(:mod:`kquant_job.sandbox.channel`): model code can write into the pipes through
``/proc/self/fd``, not sign. Exit status 0 whenever an outcome was sent; a crash shows as a
signal.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from kquant_api import QuantizationJob, Reason
from kquant_job import logs
from kquant_job.errors import ALLOCATION_FAILURE, KquantError
from kquant_job.pinned import model_code_ran
from kquant_job.sandbox.channel import sign_line, sign_outcome
from kquant_job.sandbox.confine import ConfinementError, confine

_DENIED = re.compile(r"permission denied|operation not permitted|errno 13\b", re.IGNORECASE)


def _chain(exc: BaseException) -> list[BaseException]:
    seen, found = set(), []
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def classify(exc: BaseException, memory_bytes: int, confined: bool) -> tuple[Reason, str, dict]:
    """The reason, message and detail for an exception that ended the stage: allocation
    failures (MemoryError, or a runtime's "cannot allocate" anywhere in the chain) ->
    MemoryLimitExceeded; a refused file access while confined -> UnsafeModel (model code
    reaching outside its sandbox); KquantErrors keep theirs; the rest -> InternalError."""
    chain = _chain(exc)
    text = " | ".join(str(e) for e in chain)
    if any(isinstance(e, MemoryError) for e in chain) or ALLOCATION_FAILURE.search(text):
        return (
            Reason.MemoryLimitExceeded,
            f"the conversion needed more memory than the sandbox allows ({memory_bytes} bytes, "
            f"KQUANT_SANDBOX_MEMORY_BYTES; raise the pod's memory limit): {_short(exc)}",
            {},
        )
    if model_code_ran() and (path := _taken_path(chain)):
        return (
            Reason.UnsafeModel,
            f"{path} was not what the stage had left there (a file where it makes a folder, or "
            "the reverse) after the model's code ran: model code writes files (a model file is "
            f"code; it may only read itself): {_short(exc)}",
            {},
        )
    if confined and _DENIED.search(text):
        return (
            Reason.UnsafeModel,
            "the model's code tried to reach a file or resource outside its sandbox, which "
            f"refused it (a model file is code: it may only read itself): {_short(exc)}",
            {},
        )
    if isinstance(exc, KquantError):
        return exc.reason, str(exc), _jsonable(exc.detail)
    trace = "".join(traceback.format_exception(exc)[-3:])
    return Reason.InternalError, f"{type(exc).__name__}: {exc}", {"traceback": trace}


def _taken_path(chain: list[BaseException]) -> str | None:
    """The path of a FileExistsError, NotADirectoryError or IsADirectoryError in ``chain``
    (the stage found a file or folder of the wrong kind at a path it owns), else None."""
    kinds = (FileExistsError, NotADirectoryError, IsADirectoryError)
    for exc in chain:
        if isinstance(exc, kinds) and exc.filename is not None:
            return os.fsdecode(exc.filename)
    return None


def _short(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _send(fd: int, outcome: dict[str, Any], key: bytes) -> None:
    with os.fdopen(fd, "wb") as pipe:
        pipe.write(sign_outcome(key, json.dumps(outcome, default=str).encode("utf-8")))


def _read_key() -> bytes:
    """The channel key the parent wrote on standard input (hex, one line); standard input
    is then /dev/null, before any model code runs, so no descriptor leads to the key."""
    text = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return bytes.fromhex(text)


def stage_input(io: dict[str, Any]) -> Any:
    """The :class:`kquant_job.stage.StageInput` of a request's ``io`` object."""
    from kquant_job.stage import StageInput

    names = io.get("externalNames")
    return StageInput(
        source=Path(io["source"]),
        data=[Path(p) for p in io["data"]],
        data_dir=Path(io["dataDir"]),
        calib=[Path(p) for p in io["calib"]],
        calib_dir=Path(io["calibDir"]),
        staged=Path(io["staged"]),
        scratch=Path(io["scratch"]),
        shared_reference=Path(io["sharedReference"]) if io.get("sharedReference") else None,
        external_names=None if names is None else tuple(names),
    )


def _run_task(request: dict[str, Any]) -> Any:
    """Run the request's ``task``: ``stage`` (convert and validate, the default), ``plan``
    (the dry run: plan and choose validation inputs, convert nothing), ``inspect`` (report
    on the model files at ``inspect.path``) or ``external`` (the external-data locations
    named by the ONNX file at ``external.path``); returns its JSON-able result."""
    task = request.get("task", "stage")
    if task == "inspect":
        from kquant_job.inspect_model import inspect_path

        args = request["inspect"]
        return inspect_path(Path(args["path"]), args.get("opType"), args.get("name"))
    if task == "external":
        from kquant_job.formats import external_locations

        return external_locations(Path(request["external"]["path"]))
    from kquant_job.stage import convert_and_validate, plan_stage

    job = QuantizationJob.model_validate(request["job"])
    if task == "plan":
        return plan_stage(job, stage_input(request["io"]))
    return convert_and_validate(job, stage_input(request["io"])).to_json()


def main(argv: list[str] | None = None) -> int:
    """Run the request at ``argv[0]``, logging to the file descriptor ``argv[1]``, sending
    the outcome down ``argv[2]``."""
    args = sys.argv[1:] if argv is None else argv
    request_path, log_fd, outcome_fd = Path(args[0]), int(args[1]), int(args[2])
    key = _read_key()
    logs.setup_stream_logging(
        os.fdopen(log_fd, "w", buffering=1, encoding="utf-8"), sign=lambda s: sign_line(key, s)
    )
    request = json.loads(request_path.read_text(encoding="utf-8"))
    memory = int(request["memoryBytes"])
    sandbox: dict[str, Any] = {}
    try:
        sandbox = confine(
            [Path(p) for p in request["read"]],
            [Path(p) for p in request["write"]],
            memory,
            require_landlock=bool(request["requireLandlock"]),
            parent=request.get("parent"),
        )
    except Exception as exc:  # ConfinementError, or a rule the kernel refused
        message = str(exc) if isinstance(exc, ConfinementError) else f"cannot confine: {exc!r}"
        _send(outcome_fd, {"error": {"reason": "SandboxUnavailable", "message": message}}, key)
        return 0
    landlock = sandbox.get("landlock", {})
    confined = bool(landlock.get("enforced"))
    fields = {
        "landlockAbi": landlock.get("abi"),
        "tcp": landlock.get("tcp", "not restricted"),
        "memoryBytes": sandbox.get("memoryBytes"),
        "why": landlock.get("why"),
    }
    logs.info(
        "sandbox: confined" if confined else "sandbox: NOT confined by Landlock",
        **{k: v for k, v in fields.items() if v is not None},
    )
    try:
        outcome: dict[str, Any] = {"ok": _run_task(request), "sandbox": sandbox}
    except BaseException as exc:  # every end writes an outcome the parent can report
        reason, message, detail = classify(exc, memory, confined)
        error = {"reason": reason.value, "message": message, "detail": detail}
        outcome = {"error": error, "sandbox": sandbox}
    _send(outcome_fd, outcome, key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
