"""Running the model stage in a child process that holds no credentials (parent side).

The worker keeps storage credentials and network transfers to itself; the child gets the
job, the fetched files and a folder of its own (``<work>/sandbox``), nothing else:

- its environment is an allow-list (:data:`ENV_ALLOWED`): no ``AWS_*``, no token paths;
- it inherits no file descriptor but its log pipe and its outcome pipe (and stdout/stderr,
  relayed line by line as escaped log records, so its output cannot forge the worker's log
  lines); what arrives on the two pipes counts only when signed with the key it got on
  standard input (:mod:`kquant_job.sandbox.channel`);
- this process is made non-dumpable, so a same-user process cannot read its memory or
  environment through ``/proc`` even where the kernel has no Landlock;
- the child confines itself (:mod:`kquant_job.sandbox.confine`), and is killed with its whole
  process group at the time limit.

Its end becomes a precise reason: its outcome (success, or the error it classified), a
signal (SIGSEGV and friends: ModelCrashed; SIGKILL: MemoryLimitExceeded, the kernel's OOM
killer), or the time limit (TimeLimitExceeded).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from kquant_api import REASON_EXIT_CODE, ExitCode, QuantizationJob, Reason
from kquant_job import logs
from kquant_job.errors import InvalidSpec, KquantError, PassError, StorageError, ValidationFailed
from kquant_job.sandbox.accept import accept_staged
from kquant_job.sandbox.channel import new_key, open_line, open_outcome
from kquant_job.sandbox.limits import Limits, allocated_bytes, disk_allowance, held_bytes
from kquant_job.stage import StageInput, StageOutcome

LOG = logging.getLogger("kquant")
PR_SET_DUMPABLE = 4
MAX_OUTCOME_BYTES = 64 * 1024 * 1024
MAX_LINE_CHARS = 1 << 20  # a log line read at a time: longer ones arrive in pieces
# Variables the child may see: locale, paths to find libraries and GPUs, thread counts.
ENV_ALLOWED = frozenset(
    {
        "PATH",
        "LANG",
        "LC_ALL",
        "TZ",
        "LD_LIBRARY_PATH",
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "NVIDIA_VISIBLE_DEVICES",
        "NVIDIA_DRIVER_CAPABILITIES",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "ORT_NUM_THREADS",
    }
)
_ERROR_CLASSES: dict[ExitCode, type[KquantError]] = {
    ExitCode.INVALID_SPEC: InvalidSpec,
    ExitCode.STORAGE: StorageError,
    ExitCode.STORAGE_UNAVAILABLE: StorageError,
    ExitCode.PASS: PassError,
    ExitCode.VALIDATION: ValidationFailed,
}


def make_non_dumpable() -> None:
    """``prctl(PR_SET_DUMPABLE, 0)``: this process's memory and ``/proc/<pid>/environ``
    become unreadable to other processes of the same user (the sandboxed child among them);
    no core dumps either."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def child_env(box: Path) -> dict[str, str]:
    """The child's environment: the allow-listed variables, and HOME and TMPDIR inside its
    sandbox folder."""
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOWED}
    env.update(HOME=str(box / "home"), TMPDIR=str(box / "tmp"), PYTHONUNBUFFERED="1")
    return env


def error_from(reason: str, message: str, detail: dict[str, Any] | None = None) -> KquantError:
    """The worker's exception (the class of the reason's exit code) for a reason the child
    named; an unknown reason is an InternalError."""
    try:
        why = Reason(reason)
    except ValueError:
        why = Reason.InternalError
    cls = _ERROR_CLASSES.get(REASON_EXIT_CODE[why], KquantError)
    return cls(message, reason=why, **(detail or {}))


class _OutcomeReader:
    """Reads the child's outcome pipe to its end in a thread (the child never blocks on a
    full pipe), keeping at most MAX_OUTCOME_BYTES. A pipe, not a file in the child's
    folder: model code in the child may map and rewrite files there (TorchScript's
    ``torch.from_file(..., shared=True)``), and a pipe cannot be mapped. It can still be
    written to through ``/proc/self/fd``, so the outcome counts only with the child's
    MAC (:mod:`kquant_job.sandbox.channel`)."""

    def __init__(self, fd: int) -> None:
        self.data = bytearray()
        self.overflow = False
        self._thread = threading.Thread(target=self._read, args=(fd,), daemon=True)
        self._thread.start()

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 20):
                if len(self.data) + len(chunk) > MAX_OUTCOME_BYTES:
                    self.overflow = True  # drained, not kept
                else:
                    self.data += chunk

    def join(self) -> None:
        self._thread.join(timeout=10)


class _Relay:
    """Reads the child's log pipe and output, re-logs each line, remembers where it was. A
    log-pipe line without the MAC of ``key`` (:func:`~kquant_job.sandbox.channel.open_line`)
    is not kquant's record: it is logged as a warning with its text, never as a record."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.forged = 0
        self.stage = "starting"
        self.model: str | None = None
        self.threads: list[threading.Thread] = []

    def start(self, stream: IO[str], structured: bool) -> None:
        thread = threading.Thread(target=self._pump, args=(stream, structured), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _pump(self, stream: IO[str], structured: bool) -> None:
        # bounded reads: a line of 80 MB without a newline was held whole (trial)
        while chunk := stream.readline(MAX_LINE_CHARS):
            line = chunk.rstrip("\n")
            if not line:
                continue
            if not structured:
                LOG.info("model output", extra={"fields": {"line": line[:4096]}})
                continue
            record = open_line(self.key, line)  # whole: a cut signed line would not verify
            if record is None:
                self.forged += 1
                why = "sandbox: a line on its log channel that kquant's code did not write"
                LOG.warning(why, extra={"fields": {"line": line[:4096]}})
                continue
            fields = logs.relay_record(record, "sandbox")
            if isinstance(fields.get("stage"), str):
                self.stage = fields["stage"]
            if isinstance(fields.get("model"), str):
                self.model = fields["model"]
        stream.close()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=10)

    def where(self) -> str:
        return f"during {self.stage}" + (f" of {self.model}" if self.model else "")


def _io_request(io: StageInput) -> dict[str, Any]:
    return {
        "source": str(io.source),
        "data": [str(p) for p in io.data],
        "dataDir": str(io.data_dir),
        "calib": [str(p) for p in io.calib],
        "calibDir": str(io.calib_dir),
        "staged": str(io.staged),
        "scratch": str(io.scratch),
        "sharedReference": str(io.shared_reference) if io.shared_reference else None,
        "externalNames": None if io.external_names is None else list(io.external_names),
    }


def run_stage(job: QuantizationJob, io: StageInput, work: Path, limits: Limits) -> dict[str, Any]:
    """Run :func:`kquant_job.stage.convert_and_validate` for ``job`` in a sandboxed child
    whose folder is ``io.staged``'s and ``io.scratch``'s parent, and accept what it staged
    (:func:`~kquant_job.sandbox.accept.accept_staged`: the copies are made then); return
    ``{"stage": StageOutcome, "sandbox": <what was enforced>}``.

    Raises the error the child reported (its class and reason), PassError with ModelCrashed
    (killed by a signal), MemoryLimitExceeded (SIGKILL, or an allocation failure),
    TimeLimitExceeded (``limits.timeout_seconds`` passed; the child's process group is
    killed), or KquantError(InternalError) when it ended without an outcome."""
    io = StageInput(*(_absolute(v) for v in vars(io).values()))
    request = {
        "task": "stage",
        "job": job.model_dump(mode="json", by_alias=True, exclude_none=True),
        "io": _io_request(io),
    }
    result, sandbox = run_task(request, io.staged.parent, _reads(work, io), limits)
    stage = stage_outcome(result)
    accept_staged(stage, io)
    return {"stage": stage, "sandbox": sandbox}


def stage_outcome(result: Any) -> StageOutcome:
    """Parse the stage task's result; raises KquantError(InternalError) when malformed."""
    try:
        return StageOutcome.from_json(result)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise KquantError(
            f"malformed sandbox outcome: {exc!r}", reason=Reason.InternalError
        ) from None


def run_plan(job: QuantizationJob, io: StageInput, work: Path, limits: Limits) -> dict[str, Any]:
    """The dry run's plan (:func:`kquant_job.stage.plan_stage`), computed in the sandbox as
    :func:`run_stage` would convert; raises as :func:`run_stage`."""
    io = StageInput(*(_absolute(v) for v in vars(io).values()))
    request = {
        "task": "plan",
        "job": job.model_dump(mode="json", by_alias=True, exclude_none=True),
        "io": _io_request(io),
    }
    result, _ = run_task(request, io.staged.parent, _reads(work, io), limits, what="planning")
    if not isinstance(result, dict):
        raise KquantError("malformed sandbox outcome", reason=Reason.InternalError)
    return result


def _reads(work: Path, io: StageInput) -> list[Path]:
    """What a stage may read: the work directory, and a source (with the external-data files
    beside it) read in place outside it."""
    work = work.resolve()
    outside = [p.resolve() for p in (io.source, *io.companions)]
    return [work, *(p for p in outside if not p.is_relative_to(work))]


def run_task(
    task: dict[str, Any],
    box: Path,
    read: list[Path],
    limits: Limits,
    what: str = "conversion",
) -> tuple[Any, dict[str, Any]]:
    """Run one request (``task``: its ``task`` name and arguments, see
    :mod:`kquant_job.sandbox.child`) in a sandboxed child that may read ``read`` (files or
    directories) and write ``box`` (created); return the task's result and
    what the sandbox enforced. ``what`` names the activity in error messages. Raises as
    :func:`run_stage`."""
    reads = [p.resolve() for p in read]
    box = box.resolve()  # the child runs in ``box``
    for sub in ("home", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    request = {
        **task,
        "read": [str(p) for p in reads],
        "write": [str(box)],
        "memoryBytes": limits.memory_bytes,
        "requireLandlock": limits.require_landlock,
        "parent": os.getpid(),  # the child dies at once if this process is gone by then
    }
    request_path = box / "request.json"
    request_path.write_text(json.dumps(request), encoding="utf-8")
    make_non_dumpable()
    read_fd, write_fd = os.pipe()
    outcome_fd, outcome_write_fd = os.pipe()
    cmd = [sys.executable, "-I", "-B", "-m", "kquant_job.sandbox.child", str(request_path)]
    key = new_key()
    proc = subprocess.Popen(
        [*cmd, str(write_fd), str(outcome_write_fd)],
        env=child_env(box),
        cwd=box,
        pass_fds=(write_fd, outcome_write_fd),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="backslashreplace",
        start_new_session=True,  # its own process group: killed whole at the time limit
    )
    os.close(write_fd)
    os.close(outcome_write_fd)
    assert proc.stdin is not None
    with contextlib.suppress(OSError):  # a child dead at once says so by its exit
        proc.stdin.write(key.hex() + "\n")
        proc.stdin.close()
    outcome = _OutcomeReader(outcome_fd)
    relay = _Relay(key)
    relay.start(os.fdopen(read_fd, encoding="utf-8", errors="backslashreplace"), True)
    assert proc.stdout is not None
    relay.start(proc.stdout, False)
    try:
        code = _watch(proc, box, limits, relay, what)
    finally:
        _kill_group(proc.pid)
    relay.join()
    outcome.join()
    if code < 0:
        raise _signalled(-code, relay, limits, what)
    if outcome.overflow:  # kquant's own outcome is far smaller (its lists are capped)
        raise PassError(
            f"more than {MAX_OUTCOME_BYTES} bytes arrived on the sandboxed {what}'s outcome "
            f"channel {relay.where()}: model code wrote into it; nothing was published",
            reason=Reason.UnsafeModel,
        )
    if relay.forged:
        raise PassError(
            f"model code wrote {relay.forged} line(s) into the sandboxed {what}'s log channel "
            f"{relay.where()} (shown as warnings above); nothing was published",
            reason=Reason.UnsafeModel,
        )
    return _outcome(bytes(outcome.data), code, key, what)


WATCH_SECONDS = 1.0  # how often the sandbox folder's size is measured


def _watch(proc: subprocess.Popen[str], box: Path, limits: Limits, relay: _Relay, what: str) -> int:
    """Wait for the child's exit status, killing its process group when it runs past the
    time limit (PassError TimeLimitExceeded) or when its folder grows past the room the work
    volume has left for it (:func:`~kquant_job.sandbox.limits.disk_allowance`; PassError
    DiskLimitExceeded): model code may write what it likes in its folder, and a full work
    volume gets the pod evicted with no result at all."""
    deadline = limits.stage_deadline()
    allowance = disk_allowance(box)
    while True:
        left = deadline - time.monotonic()
        try:
            code = proc.wait(timeout=max(0.0, min(WATCH_SECONDS, left)))
        except subprocess.TimeoutExpired:
            code = None
        if code is not None and allocated_bytes(box) <= allowance:
            return code  # (measured once more: a child quicker than a poll is measured too)
        if code is None and time.monotonic() >= deadline:
            error = PassError(
                f"the {what} ran past the sandbox's time limit ({limits.timeout_seconds:g} s "
                f"for the job's model stages, KQUANT_SANDBOX_TIMEOUT_SECONDS) {relay.where()} "
                "and was killed",
                reason=Reason.TimeLimitExceeded,
            )
        elif (used := allocated_bytes(box) + held_bytes(proc.pid, box)) > allowance:
            error = PassError(
                f"the {what} wrote {used} bytes into its folder {relay.where()}, past the "
                f"{allowance} bytes the work volume has left for it (KQUANT_WORK_BYTES, or "
                "the free space), and was stopped: model code writing files, or a conversion "
                "larger than its estimate (raise spec.resources.limits.ephemeral-storage)",
                reason=Reason.DiskLimitExceeded,
            )
        else:
            continue
        _kill_group(proc.pid)  # (gone already when the last measure came after its exit)
        proc.wait()
        relay.join()
        raise error


def _absolute(value: Any) -> Any:
    if isinstance(value, Path):
        return value.resolve()
    if isinstance(value, list | tuple):
        return type(value)(_absolute(v) for v in value)
    return value


def _kill_group(pgid: int) -> None:
    """Kill what the child may have left running in its process group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _signalled(signum: int, relay: _Relay, limits: Limits, what: str = "conversion") -> PassError:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if signum == signal.SIGKILL:
        return PassError(
            f"the {what} process was killed (SIGKILL) {relay.where()}: most likely the "
            f"kernel's out-of-memory killer (sandbox limit {limits.memory_bytes} bytes; raise "
            "the pod's memory limit)",
            reason=Reason.MemoryLimitExceeded,
        )
    return PassError(
        f"the {what} process crashed with {name} {relay.where()}: a defect of the "
        "converting library on this model, or a hostile model; nothing was published",
        reason=Reason.ModelCrashed,
    )


def _outcome(sent: bytes, code: int, key: bytes, what: str) -> tuple[Any, dict[str, Any]]:
    """The child's result and sandbox entry from the bytes it sent, signed with ``key``;
    raises the error it reported, PassError(UnsafeModel) for bytes its own code did not
    send (model code writing into the outcome pipe), or KquantError(InternalError) for no
    outcome or a malformed one."""
    if not sent:
        raise KquantError(
            f"the sandboxed process ended (exit status {code}) without an outcome",
            reason=Reason.InternalError,
        )
    payload = open_outcome(key, sent)
    if payload is None:
        raise PassError(
            f"the sandboxed {what}'s outcome holds bytes kquant's code did not send: model "
            "code wrote into its channel (through /proc/self/fd); nothing was published",
            reason=Reason.UnsafeModel,
        )
    try:
        data = json.loads(payload.decode("utf-8"))
    except ValueError as exc:
        raise KquantError(
            f"the sandboxed process ended (exit status {code}) with a malformed outcome: {exc}",
            reason=Reason.InternalError,
        ) from None
    if not isinstance(data, dict):
        raise KquantError("malformed sandbox outcome", reason=Reason.InternalError)
    sandbox = data.get("sandbox") if isinstance(data.get("sandbox"), dict) else {}
    error = data.get("error")
    if isinstance(error, dict):
        detail = error.get("detail") if isinstance(error.get("detail"), dict) else {}
        exc = error_from(str(error.get("reason")), str(error.get("message")), detail)
        exc.detail["sandbox"] = sandbox
        raise exc
    if "ok" not in data:
        raise KquantError("malformed sandbox outcome: no result", reason=Reason.InternalError)
    return data["ok"], sandbox
