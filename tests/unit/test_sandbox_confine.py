"""The confinement the sandboxed child applies to itself (kquant_job.sandbox.confine), probed
from a real child process: what it can still read and write, and what it cannot reach."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import landlockpy
import pytest

from kquant_job.sandbox.limits import Limits, machine_memory
from kquant_job.sandbox.runner import ENV_ALLOWED, child_env

needs_landlock = pytest.mark.skipif(
    landlockpy.abi_version() < 4, reason="the kernel has no Landlock with network rules"
)

PROBE = textwrap.dedent(
    """
    import json, os, socket, sys
    from pathlib import Path
    from kquant_job.sandbox.confine import confine
    work, box, port, parent = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    report = confine([work], [box], 2**33, require_landlock=False)
    tries = {}
    def attempt(name, fn):
        try:
            fn()
            tries[name] = "allowed"
        except OSError as exc:
            tries[name] = type(exc).__name__
    attempt("read work", lambda: (work / "model.onnx").read_bytes())
    attempt("write box", lambda: (box / "out.bin").write_bytes(b"x"))
    attempt("write work", lambda: (work / "evil").write_bytes(b"x"))
    attempt("read outside", lambda: Path(os.environ["OUTSIDE"]).read_bytes())
    attempt("write outside", lambda: Path(os.environ["OUTSIDE"]).write_bytes(b"x"))
    attempt("parent environ", lambda: Path(f"/proc/{parent}/environ").read_bytes())
    attempt("tcp connect", lambda: socket.create_connection(("127.0.0.1", port), 2).close())
    attempt("import numpy", lambda: __import__("numpy"))
    print(json.dumps({"report": report, "tries": tries}))
    """
)


@needs_landlock
def test_the_child_reads_its_inputs_writes_its_folder_and_reaches_nothing_else(tmp_path):
    work, box, outside = tmp_path / "work", tmp_path / "work" / "sandbox", tmp_path / "creds"
    box.mkdir(parents=True)
    (work / "model.onnx").write_bytes(b"model")
    outside.write_text("aws_secret_access_key = s3cr3t\n")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        # a process holding a secret, like the worker that starts the sandbox
        holder = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"],
            env={"AWS_SECRET_ACCESS_KEY": "s3cr3t"},
        )
        try:
            done = subprocess.run(
                [sys.executable, "-c", PROBE, str(work), str(box), str(port), str(holder.pid)],
                env={**os.environ, "OUTSIDE": str(outside)},
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            holder.kill()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["tries"] == {
        "read work": "allowed",
        "write box": "allowed",
        "write work": "PermissionError",
        "read outside": "PermissionError",
        "write outside": "PermissionError",
        "parent environ": "PermissionError",
        "tcp connect": "PermissionError",
        "import numpy": "allowed",
    }
    landlock = result["report"]["landlock"]
    assert landlock["enforced"] is True and landlock["tcp"] == "denied"
    assert landlock["abi"] == landlockpy.abi_version()
    assert outside.read_text() == "aws_secret_access_key = s3cr3t\n"


def test_the_child_environment_is_an_allow_list(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-sentinel")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-sentinel")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/secrets/token")
    monkeypatch.setenv("KQUANT_JOB", '{"spec": {}}')
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    env = child_env(tmp_path)
    assert not [k for k in env if k.startswith("AWS_") or k == "KQUANT_JOB"]
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["HOME"] == str(tmp_path / "home") and env["TMPDIR"] == str(tmp_path / "tmp")
    assert set(env) <= ENV_ALLOWED | {"HOME", "TMPDIR", "PYTHONUNBUFFERED"}


def test_limits_from_the_environment_and_the_machine(tmp_path):
    assert Limits.from_env({}).memory_bytes == int(machine_memory() * 0.9)
    assert Limits.from_env({}).timeout_seconds == 10800
    env = {
        "KQUANT_SANDBOX_MEMORY_BYTES": "1000000",
        "KQUANT_SANDBOX_TIMEOUT_SECONDS": "30",
        "KQUANT_SANDBOX_REQUIRE_LANDLOCK": "true",
    }
    assert Limits.from_env(env) == Limits(1_000_000, 30.0, True)
    for bad in ("0", "-5", "lots"):
        with pytest.raises(Exception, match="KQUANT_SANDBOX_TIMEOUT_SECONDS"):
            Limits.from_env({"KQUANT_SANDBOX_TIMEOUT_SECONDS": bad})
    cgroup = tmp_path / "memory.max"
    cgroup.write_text("1073741824\n")
    assert machine_memory((cgroup,)) == 2**30
    cgroup.write_text("max\n")  # no limit set: the machine's RAM
    assert machine_memory((cgroup,)) == machine_memory((tmp_path / "absent",))


def test_the_worker_is_not_dumpable_once_it_starts_a_sandbox(tmp_path):
    code = textwrap.dedent(
        """
        import ctypes
        from kquant_job.sandbox.runner import make_non_dumpable
        libc = ctypes.CDLL(None)
        before = libc.prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
        make_non_dumpable()
        print(before, libc.prctl(3, 0, 0, 0, 0))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1", "0"]


def test_a_missing_landlock_is_reported_or_refused(monkeypatch):
    from kquant_job.sandbox import confine as confine_mod

    monkeypatch.setattr(landlockpy, "abi_version", lambda: 0)
    assert confine_mod.landlock([], [], required=False) == {
        "abi": 0,
        "enforced": False,
        "why": "the kernel has no Landlock",
    }
    with pytest.raises(confine_mod.ConfinementError, match="no Landlock"):
        confine_mod.landlock([], [], required=True)

    def refused() -> int:  # a seccomp profile that does not know the Landlock syscalls
        raise landlockpy.LandlockError(1, "Operation not permitted")

    monkeypatch.setattr(landlockpy, "abi_version", refused)
    report = confine_mod.landlock([], [], required=False)
    assert report["enforced"] is False and "refused" in report["why"]


def test_python_read_roots_cover_kquant_and_the_interpreter():
    from kquant_job.sandbox.confine import python_read_roots

    roots = python_read_roots()
    import kquant_job

    here = Path(kquant_job.__file__).resolve()
    assert any(r in here.parents for r in roots)
    assert any(Path(sys.base_prefix) == r for r in roots)


@pytest.mark.parametrize(
    ("signum", "reason", "words"),
    [
        (11, "ModelCrashed", "SIGSEGV"),
        (6, "ModelCrashed", "SIGABRT"),
        (7, "ModelCrashed", "SIGBUS"),
        (9, "MemoryLimitExceeded", "out-of-memory killer"),
    ],
)
def test_a_signal_becomes_a_precise_reason(signum, reason, words):
    from kquant_job.sandbox.runner import _Relay, _signalled

    relay = _Relay(b"k" * 32)
    relay.stage, relay.model = "convert", "encoder.pt"
    error = _signalled(signum, relay, Limits(2**30, 60.0))
    assert error.reason.value == reason and error.exit_code == 30
    assert words in str(error) and "during convert of encoder.pt" in str(error)


KEY = bytes(range(32))


def _signed(payload: bytes) -> bytes:
    from kquant_job.sandbox.channel import sign_outcome

    return sign_outcome(KEY, payload)


def test_an_outcome_names_its_error_class_or_is_refused():
    from kquant_job.errors import InvalidSpec, KquantError, PassError, StorageError
    from kquant_job.sandbox.runner import _outcome, error_from, stage_outcome

    assert type(error_from("InvalidSpec", "x")) is InvalidSpec
    assert type(error_from("UnsafePath", "x")) is StorageError
    assert type(error_from("MemoryLimitExceeded", "x")) is PassError
    assert error_from("NoSuchReason", "x").reason.value == "InternalError"
    with pytest.raises(PassError, match="m"):
        _outcome(_signed(b'{"error": {"reason": "CorruptModel", "message": "m"}}'), 0, KEY, "c")
    for bad in (b"[]", b"not json", b'{"sandbox": {}}', b"\xff\xfe"):
        with pytest.raises(KquantError) as info:
            _outcome(_signed(bad), 0, KEY, "c")
        assert info.value.reason.value == "InternalError"
    with pytest.raises(KquantError) as info:
        stage_outcome(_outcome(_signed(b'{"ok": {"models": 3}}'), 0, KEY, "c")[0])
    assert info.value.reason.value == "InternalError"
    with pytest.raises(KquantError, match="without an outcome"):
        _outcome(b"", 0, KEY, "c")


@pytest.mark.parametrize(
    "sent",
    [
        b'{"ok": {"models": []}}',  # unsigned: written by someone without the key
        b'{"ok": 1}\n' + b"0" * 64,  # a MAC that is not the key's
        b"garbage" + _signed(b'{"ok": 1}'),  # bytes before kquant's outcome
        _signed(b'{"ok": 1}') + b"garbage",  # ... or after it
    ],
)
def test_an_outcome_kquants_code_did_not_send_is_an_unsafe_model(sent):
    """Trial: TorchScript's aten::save into /proc/self/fd/N reached the outcome pipe."""
    from kquant_job.errors import PassError
    from kquant_job.sandbox.runner import _outcome

    with pytest.raises(PassError, match="did not send") as info:
        _outcome(sent, 0, KEY, "conversion")
    assert info.value.reason.value == "UnsafeModel"


def test_log_lines_count_only_with_the_childs_mac(caplog):
    """Trial: forged 'publish: done uri=s3://attacker/...' ERROR records in the worker's log."""
    import io

    from kquant_job.sandbox.channel import sign_line
    from kquant_job.sandbox.runner import _Relay

    real = sign_line(KEY, '{"message":"convert: start","level":"info","stage":"convert"}')
    forged = '{"message":"publish: done","level":"error","stage":"publish","uri":"s3://x/"}'
    relay = _Relay(KEY)
    with caplog.at_level("INFO", logger="kquant"):
        relay._pump(io.StringIO(f"{real}\n{forged}\n{forged}\t{'0' * 64}\n"), True)
    assert relay.stage == "convert" and relay.forged == 2
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("INFO", "convert: start") in messages
    assert not any(m == "publish: done" for _, m in messages)
    assert sum("did not write" in m for _, m in messages) == 2


def test_only_plain_files_leave_the_sandbox(tmp_path):
    from kquant_job.errors import PassError
    from kquant_job.pipeline import staged_files

    staged = tmp_path / "staged"
    (staged / "sub").mkdir(parents=True)
    (staged / "m.onnx").write_bytes(b"m")
    (staged / "sub" / "vocab.txt").write_bytes(b"v")
    assert staged_files(staged) == ["m.onnx", "sub/vocab.txt"]
    secret = tmp_path / "secret"
    secret.write_text("s")
    for make in (
        lambda: (staged / "link").symlink_to(secret),
        lambda: os.link(secret, staged / "hard"),
        lambda: (staged / "dirlink").symlink_to(tmp_path, target_is_directory=True),
    ):
        make()
        with pytest.raises(PassError) as info:
            staged_files(staged)
        assert info.value.reason.value == "UnsafeModel"
        for extra in ("link", "hard", "dirlink"):
            (staged / extra).unlink(missing_ok=True)


def test_the_child_names_memory_and_sandbox_refusals():
    from kquant_job.errors import InvalidSpec
    from kquant_job.sandbox.child import classify

    oom = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
    )
    assert classify(oom, 2**30, True)[0].value == "MemoryLimitExceeded"
    assert classify(MemoryError(), 2**30, False)[0].value == "MemoryLimitExceeded"
    try:
        try:
            raise PermissionError(13, "Permission denied", "/etc/shadow")
        except PermissionError as inner:
            raise InvalidSpec("the original model fails on the validation inputs") from inner
    except InvalidSpec as wrapped:
        assert classify(wrapped, 2**30, True)[0].value == "UnsafeModel"
        assert classify(wrapped, 2**30, False)[0].value == "InvalidSpec"  # not confined
    reason, message, detail = classify(ValueError("boom"), 2**30, True)
    assert reason.value == "InternalError" and "boom" in message and "traceback" in detail


def test_the_disk_allowance_is_what_the_work_volume_has_left(tmp_path):
    from kquant_job.sandbox.limits import allocated_bytes, disk_allowance

    work = tmp_path / "work"
    (work / "source").mkdir(parents=True)
    (work / "source" / "model.onnx").write_bytes(os.urandom(3 * 2**20))
    box = work / "sandbox"
    box.mkdir()
    (box / "request.json").write_bytes(os.urandom(2**20))
    sparse = box / "sparse.bin"
    with open(sparse, "wb") as fh:
        fh.truncate(2**30)  # a GiB long, nothing written: no disk taken
    assert allocated_bytes(box) < 2 * 2**20
    source = allocated_bytes(work / "source")
    allowance = disk_allowance(box, {"KQUANT_WORK_BYTES": str(64 * 2**20)})
    assert allowance == 64 * 2**20 - source  # the box's own bytes count against it
    unset = disk_allowance(box, {})
    assert unset > allowance and unset <= shutil.disk_usage(box).free + allocated_bytes(box)


def test_unlinked_files_a_process_still_holds_are_counted(tmp_path):
    """Disk that no walk of the folder shows: a file mapped (or open) by the process, then
    unlinked (model code maps a file; kquant renames its output over that name)."""
    import mmap

    from kquant_job.sandbox.limits import allocated_bytes, held_bytes

    box = tmp_path / "box"
    box.mkdir()
    mapped_path, opened_path = box / "mapped.bin", box / "opened.bin"
    with open(mapped_path, "wb") as fh:
        fh.truncate(8 * 2**20)
    with open(mapped_path, "r+b") as fh:
        mapping = mmap.mmap(fh.fileno(), 8 * 2**20)
    mapping[:] = b"x" * (8 * 2**20)
    opened = open(opened_path, "wb")  # noqa: SIM115
    opened.write(os.urandom(4 * 2**20))
    opened.flush()
    assert held_bytes(os.getpid(), box) == 0  # nothing unlinked yet
    mapped_path.unlink()
    opened_path.unlink()
    try:
        assert allocated_bytes(box) == 0
        held = held_bytes(os.getpid(), box)
        assert 12 * 2**20 <= held < 13 * 2**20
        assert held_bytes(os.getpid(), tmp_path / "elsewhere") == 0
    finally:
        mapping.close()
        opened.close()
    assert held_bytes(os.getpid(), box) == 0


def test_a_child_that_filled_its_folder_and_exited_between_polls_is_caught(tmp_path, monkeypatch):
    """The last measure comes after the child's exit: still DiskLimitExceeded (before: the
    kill of a group already gone raised ProcessLookupError, an InternalError)."""
    from kquant_job.errors import PassError
    from kquant_job.sandbox.limits import Limits
    from kquant_job.sandbox.runner import _Relay, _watch

    box = tmp_path / "work" / "sandbox"
    box.mkdir(parents=True)
    monkeypatch.setenv("KQUANT_WORK_BYTES", str(4 * 2**20))
    code = f"open({str(box / 'hog.bin')!r}, 'wb').write(b'x' * (8 * 2**20))"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, text=True)
    with pytest.raises(PassError) as info:
        _watch(proc, box, Limits(2**30, 60.0), _Relay(b"k" * 32), "conversion")
    assert info.value.reason.value == "DiskLimitExceeded"
    assert proc.returncode == 0  # it had ended on its own


def test_a_file_where_the_stage_makes_a_folder_is_model_code_once_it_ran():
    from kquant_job import pinned
    from kquant_job.sandbox.child import classify

    pinned._CODE_RAN.clear()  # a TorchScript conversion earlier in this process set it
    exc = NotADirectoryError(20, "Not a directory", "/work/sandbox/scratch/0")
    assert classify(exc, 2**30, True)[0].value == "InternalError"  # no model code: a bug
    pinned.note_model_code()
    try:
        reason, message, _ = classify(exc, 2**30, True)
        assert reason.value == "UnsafeModel" and "/work/sandbox/scratch/0" in message
    finally:
        pinned._CODE_RAN.clear()


def test_a_child_whose_worker_died_before_it_confined_itself_exits_at_once():
    """A worker killed during the child's imports (before the prctl call) left the child
    running its whole task: its parent was already the reaper, both reads of getppid()
    agreed, and no death signal ever came. The worker's pid from the request is compared."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; from kquant_job.sandbox.confine import die_with_parent; "
        "die_with_parent(int(sys.argv[1])); print('still running')"
    )
    gone = subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True)
    assert (gone.returncode, gone.stdout) == (1, "")  # pid 1 is not its parent
    alive = subprocess.run([sys.executable, "-c", code, str(os.getpid())], capture_output=True,
                           text=True)  # fmt: skip
    assert (alive.returncode, alive.stdout.strip()) == (0, "still running")


def test_a_log_line_without_a_newline_is_read_in_bounded_pieces():
    """Trial: 80 MB without a newline was read whole into the worker's memory."""
    import io

    from kquant_job.sandbox import runner

    relay = runner._Relay(KEY)
    relay._pump(io.StringIO("x" * (3 * runner.MAX_LINE_CHARS + 5)), True)
    assert relay.forged == 4  # pieces of at most MAX_LINE_CHARS, none signed


def test_a_long_signed_record_is_kquants_own():
    """A record past 64 KiB (a long list in a field) was cut before its MAC was checked."""
    import io
    import json

    from kquant_job.sandbox.channel import sign_line
    from kquant_job.sandbox.runner import _Relay

    record = json.dumps({"message": "validated", "stage": "validate", "names": ["n"] * 50_000})
    relay = _Relay(KEY)
    relay._pump(io.StringIO(sign_line(KEY, record) + "\n"), True)
    assert relay.forged == 0 and relay.stage == "validate"


def test_an_outcome_channel_past_its_bound_is_an_unsafe_model(tmp_path, monkeypatch):
    """kquant's own outcomes are capped far below MAX_OUTCOME_BYTES: more on the channel is
    model code writing into it (trial: 80 MB through /proc/self/fd was an InternalError).
    The bound is lowered here so the child's real outcome crosses it."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from kquant_job.errors import PassError
    from kquant_job.sandbox import runner

    weights = numpy_helper.from_array(np.zeros((4, 4), np.float32), "W")
    weights.ClearField("raw_data")
    weights.data_location = TensorProto.EXTERNAL
    entry = weights.external_data.add()
    entry.key, entry.value = "location", "w.bin"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weights],
    )  # fmt: skip
    model = tmp_path / "m.onnx"
    model.write_bytes(helper.make_model(graph).SerializeToString())
    task = {"task": "external", "external": {"path": str(model)}}
    found, _ = runner.run_task(task, tmp_path / "box", [tmp_path], Limits(2**31, 60.0))
    assert found == ["w.bin"]  # within the bound: the child's own answer
    monkeypatch.setattr(runner, "MAX_OUTCOME_BYTES", 16)
    with pytest.raises(PassError, match="more than 16 bytes arrived") as info:
        runner.run_task(task, tmp_path / "box2", [tmp_path], Limits(2**31, 60.0))
    assert info.value.reason.value == "UnsafeModel"


def test_the_stages_of_one_job_share_its_time_limit(tmp_path):
    """Variants trial: each variant's stage got the whole limit, so a job of 8 variants ran
    8 times KQUANT_SANDBOX_TIMEOUT_SECONDS, past the Job's deadline (killed, no result). A
    started job's stages end by one deadline: a second stage gets what the first left."""
    import time

    from kquant_job.errors import PassError
    from kquant_job.sandbox.limits import Limits
    from kquant_job.sandbox.runner import _Relay, _watch

    box = tmp_path / "box"
    box.mkdir()
    limits = Limits(2**30, 4.0).started()

    def stage(seconds: float) -> int:
        code = f"import time; time.sleep({seconds})"
        proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, text=True)
        return _watch(proc, box, limits, _Relay(b"k" * 32), "conversion")

    assert stage(2.0) == 0  # within the job's 4 s (margins for a loaded CI machine)
    start = time.monotonic()
    with pytest.raises(PassError) as info:
        stage(3.5)  # alone it fits 4 s; after the first, about 2 s are left
    assert info.value.reason.value == "TimeLimitExceeded"
    assert time.monotonic() - start < 3.0
    assert "for the job's model stages" in str(info.value)
    fresh = Limits(2**30, 4.0)  # not started: each stage its own limit, as before
    assert fresh.stage_deadline() - time.monotonic() > 3.9
