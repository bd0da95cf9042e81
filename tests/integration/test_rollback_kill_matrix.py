"""``kquant-job rollback`` killed (SIGKILL) at every point, then the same command run again,
on both back ends: it ends on the set an uninterrupted single rollback ends on, whole at
every name, with nothing pending and the killed run's leftovers cleaned; run again after it
finished, it changes nothing. Trial: a rollback killed during its clean-up (after it took
``rollbackPending`` off) was finished by nothing, and the rerun rolled back one set more.

The points are the rollback process's storage calls (each method of the back end, and on
``file://`` each rename or link that puts a temporary file in place), counted in an
uninterrupted run, plus the moment ``rollback()`` returned, before the command says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from published import read_set
from test_sets import prefix_of, publish

from kquant_job.sets import Writer
from kquant_job.storage.paths import TEMP_SUFFIX, temp_path

# Reads one request a line ({"args", "kill_at", "out", "err"}), forks a process that runs
# the command with stdout and stderr in the files "out" and "err" and dies by SIGKILL at
# point kill_at (1-based; 0: never), waits for it and answers its exit code (-9: killed).
# Forked, so the imports are paid once: a fresh interpreter per run made the matrix last
# minutes. A process that lives prints the number of points it passed on stderr.
DRIVER = r"""
import json, os, signal, sys, traceback
import kquant_job.sets.rollback as module
from kquant_job import cli
from kquant_job.storage.file import FileStorage
from kquant_job.storage.s3 import S3Storage

kill_at, passed = [0], [0]

def point():
    passed[0] += 1
    if passed[0] == kill_at[0]:
        os.kill(os.getpid(), signal.SIGKILL)

def hooked(real):
    def call(*args, **kwargs):
        point()
        return real(*args, **kwargs)
    return call

OPS = ("stat", "occupied", "list", "read_bytes", "write_bytes", "copy", "delete", "prune",
       "content_sha256", "list_uploads", "abort_upload")
for cls in (FileStorage, S3Storage):
    for name in OPS:
        setattr(cls, name, hooked(getattr(cls, name)))
os.replace, os.link = hooked(os.replace), hooked(os.link)
real_rollback = module.rollback

def rollback(*args, **kwargs):
    done = real_rollback(*args, **kwargs)
    point()  # done, not yet said
    return done

module.rollback = rollback

for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            for fd, path in ((1, req["out"]), (2, req["err"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            kill_at[0] = req["kill_at"]
            code = cli.main(req["args"])
            print(f"kill-points: {passed[0]}", file=sys.stderr)
        except SystemExit as exc:  # argparse's refusals
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


@dataclass
class Result:
    """What a run of the command gave: its exit code (-9: killed) and output."""

    returncode: int
    stdout: str
    stderr: str


class Runner:
    """Runs ``kquant-job rollback`` in processes forked from one driver (:data:`DRIVER`)."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.runs = folder, 0
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip

    def __call__(self, args: list[str], kill_at: int = 0) -> Result:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.runs += 1
        out, err = self.folder / f"{self.runs}.out", self.folder / f"{self.runs}.err"
        req = {"args": ["rollback", *args], "kill_at": kill_at, "out": str(out), "err": str(err)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        code = self.proc.stdout.readline()
        assert code, "the driver died"
        return Result(int(code), out.read_text(), err.read_text())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture
def run_rollback(store, request, tmp_path) -> Iterator[Runner]:
    """A :class:`Runner` for the back end of ``store``."""
    env = dict(os.environ)
    if store.kind == "s3":
        env.update(request.getfixturevalue("worker_env"))
        env["AWS_ENDPOINT_URL"] = request.getfixturevalue("s3_server").endpoint
    folder = tmp_path / "runs"
    folder.mkdir()
    runner = Runner(folder, env)
    yield runner
    runner.close()


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def three_sets(store, tmp_path: Path, key: str, dead_pid: int) -> list[str]:
    """Sets v1, v2, v3 of one job under ``key``, v3 current, and a fixed-name copy a dead
    writer left unfinished (local: the clean-up stage then has an upload to abort)."""
    ids = []
    for gen in (1, 2, 3):
        files = {"model.onnx": f"v{gen} graph".encode() * 20, f"only-v{gen}.txt": b"x"}
        writer = Writer("vad", "speech", "uid-1", gen)
        ids.append(publish(store, tmp_path, writer, files, key=key).set_id)
    if store.kind == "file":
        name = temp_path(Path("model.onnx")).name.replace(f"-{os.getpid()}.", f"-{dead_pid}.")
        store.storage.write_bytes(store.uri(key + name), b"half a copy")
    return ids


def clone(store, src: str, dst: str) -> None:
    """Copy every object under ``src`` to ``dst`` (keys below the store's root), metadata and
    modification times kept."""
    source, target = prefix_of(store, src), prefix_of(store, dst)
    if source.root is not None:
        shutil.copytree(source.root, str(target.root), symlinks=True)
        return
    for key in source.all_keys():
        copied = {"Bucket": source.bucket, "Key": source.key + key}
        source.client.copy_object(Bucket=target.bucket, Key=target.key + key, CopySource=copied)


def settled(store, key: str) -> dict:
    """The prefix as a reader finds it, checked whole (:func:`read_set`), and nothing
    pending or half-written left by the killed run."""
    out = prefix_of(store, key)
    manifest = read_set(out)
    assert "rollbackPending" not in manifest
    assert not [k for k in out.all_keys() if k.endswith(TEMP_SUFFIX)]
    return manifest


@pytest.mark.parametrize("step", ["default", "from"])
def test_a_rollback_killed_at_any_point_then_rerun_ends_where_one_rollback_ends(
    store, tmp_path, step, run_rollback, dead_pid
):
    """``default``: ``rollback P`` from v3 (to v2). ``from``: after that rollback,
    ``rollback P --from v2``, the retry-safe further step (to v1). Each point's prefix is a
    copy of one template, its set ids the same."""
    if store.kind == "s3" and step == "from":
        pytest.skip("the --from decision is the back end's no more than the default's: local")
    ids = three_sets(store, tmp_path, "template/", dead_pid)
    if step == "from":
        assert run_rollback([store.uri("template/")]).returncode == 0

    def prepare(key: str) -> list[str]:
        """The command, on a copy of the template at ``key`` (publishing anew each time
        made the matrix last a minute on S3)."""
        clone(store, "template/", key)
        return [store.uri(key), "--from", ids[1]] if step == "from" else [store.uri(key)]

    def standing(key: str) -> dict:
        """Where the prefix stands: current set, the set left, lineage and history."""
        manifest = settled(store, key)
        return {"set": manifest["set"], "from": manifest["rolledBackFrom"],
                "lineage": manifest["lineage"],
                "history": [h["set"] for h in manifest["history"]]}  # fmt: skip

    baseline = prepare("baseline/")
    clean = run_rollback(baseline)
    assert clean.returncode == 0, clean.stderr
    points = int(clean.stderr.rsplit("kill-points: ", 1)[1])
    want = standing("baseline/")
    assert want["set"] == ids[0 if step == "from" else 1], want
    names = prefix_of(store, "baseline/").fixed_names()
    # after completion, the same command again: nothing more (the trial's rerun went on)
    rerun = run_rollback(baseline)
    assert rerun.returncode == 0 and "rollback already done" in rerun.stdout, rerun.stderr
    assert standing("baseline/") == want
    assert points > 10  # the hooks saw the rollback's storage calls
    seen = set()
    for kill_at in range(1, points + 1):
        key = f"k{kill_at}/"
        args = prepare(key)
        killed = run_rollback(args, kill_at)
        assert killed.returncode == -9, (kill_at, killed.stdout, killed.stderr)
        again = run_rollback(args)  # the same command, as a user retries it
        assert again.returncode == 0, (kill_at, again.stderr)
        seen.add(again.stdout.split(": ", 1)[1].split(":")[0].split(" (")[0])
        assert standing(key) == want, (kill_at, again.stdout)
        assert prefix_of(store, key).fixed_names() == names, kill_at
    # the kills fell before the manifest write, during the copies and after them
    assert {"rollback already done", "finished an interrupted rollback"} <= seen, seen
    assert any(s.startswith("set ") for s in seen), seen  # rolled back by the rerun itself


def test_a_rerun_reports_the_rollback_it_finds_done(store, tmp_path, run_rollback, dead_pid):
    """What the command says: done once, the same command again is a no-op naming the
    rollback; --again goes one set further; --from the set left is a no-op too."""
    v1, v2, v3 = three_sets(store, tmp_path, "out/", dead_pid)
    uri = store.uri("out/")
    first = run_rollback([uri])
    assert f"set {v2} is current again (was {v3})" in first.stdout, first.stderr
    done = json.loads(prefix_of(store).get("manifest.json") or b"")
    again = run_rollback([uri])
    assert again.returncode == 0
    assert (
        f"rollback already done: current set is {v2} (rolled back from {v3} at "
        f"{done['rolledBackAt']}); fixed names in step; pass --again" in again.stdout
    )
    assert run_rollback([uri, "--from", v3]).stdout == again.stdout
    assert run_rollback([uri, "--to", v2]).stdout == again.stdout
    further = run_rollback([uri, "--from", v2])
    assert f"set {v1} is current again (was {v2})" in further.stdout
    assert "rollback already done" in run_rollback([uri, "--from", v2]).stdout
    stale = run_rollback([uri, "--from", v3])
    assert stale.returncode != 0 and f"set {v3} is not current, {v1} is" in stale.stderr
    assert "no set before" in run_rollback([uri, "--again"]).stderr
    assert read_set(prefix_of(store))["set"] == v1
    forward = run_rollback([uri, "--to", v3])
    assert f"set {v3} is current again (was {v1})" in forward.stdout
    both = run_rollback([uri, "--again", "--to", v3])
    assert both.returncode == 2 and "not allowed with" in both.stderr
