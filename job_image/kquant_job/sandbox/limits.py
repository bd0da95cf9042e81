"""The sandbox's bounds, from the environment, with defaults read from the machine.

=====================================  ==========================================================
variable                               meaning (default)
=====================================  ==========================================================
KQUANT_SANDBOX_MEMORY_BYTES            data memory of the sandboxed process, bytes (90 % of the
                                       container's cgroup memory limit, else of the RAM)
KQUANT_SANDBOX_TIMEOUT_SECONDS         wall-clock time of the job's model stages together,
                                       seconds, from the job's start (10800; the operator sets
                                       90 % of the Job's activeDeadlineSeconds)
KQUANT_SANDBOX_REQUIRE_LANDLOCK        ``true``: refuse to run model code when the kernel has no
                                       Landlock (default: run, and report what was enforced)
=====================================  ==========================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kquant_job.errors import InvalidSpec

MEMORY_ENV = "KQUANT_SANDBOX_MEMORY_BYTES"
TIMEOUT_ENV = "KQUANT_SANDBOX_TIMEOUT_SECONDS"
REQUIRE_LANDLOCK_ENV = "KQUANT_SANDBOX_REQUIRE_LANDLOCK"
MEMORY_SHARE = 0.9  # the rest: the parent (transfers, publishing) and the kernel's slack
DEFAULT_TIMEOUT = 10800.0
_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)


def machine_memory(limits: tuple[Path, ...] = _CGROUP_LIMITS) -> int:
    """Bytes of memory this container may use: its cgroup limit when one is set, else the
    machine's RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in limits:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < ram:
            return int(text)
    return int(ram)


@dataclass(frozen=True)
class Limits:
    """Bounds of the sandboxed stages: memory (bytes, RLIMIT_DATA), wall time (seconds),
    whether running without Landlock is refused, and ``deadline`` (``time.monotonic()``):
    set by :meth:`started`, the end of the time every stage of one job shares; unset, each
    stage gets ``timeout_seconds`` of its own."""

    memory_bytes: int
    timeout_seconds: float
    require_landlock: bool = False
    deadline: float | None = None

    def started(self) -> Limits:
        """These bounds with the time limit counted from now for every stage to come: a job
        of N variants ran N stages of the whole limit each, past the Job's deadline, and
        the pod was killed with no result (variants trial)."""
        return dataclasses.replace(self, deadline=time.monotonic() + self.timeout_seconds)

    def stage_deadline(self) -> float:
        """When the stage starting now must end (``time.monotonic()``)."""
        if self.deadline is not None:
            return self.deadline
        return time.monotonic() + self.timeout_seconds

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Limits:
        """The bounds from the environment (see the module table). Raises InvalidSpec naming
        a variable that is not a positive number."""
        env = os.environ if env is None else env
        memory = _positive(env, MEMORY_ENV)
        timeout = _positive(env, TIMEOUT_ENV)
        require = env.get(REQUIRE_LANDLOCK_ENV, "").strip().lower() in ("1", "true", "yes")
        return cls(
            memory_bytes=int(memory) if memory else int(machine_memory() * MEMORY_SHARE),
            timeout_seconds=timeout or DEFAULT_TIMEOUT,
            require_landlock=require,
        )


def _positive(env: Mapping[str, str], name: str) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InvalidSpec(f"{name}={raw!r}: expected a positive number")
    return value


def allocated_bytes(root: Path) -> int:
    """Bytes of disk the files below ``root`` occupy (``st_blocks``: a sparse file counts what
    it holds, not its length); entries vanishing while walked are skipped."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                continue
    return total


def held_bytes(pid: int, root: Path) -> int:
    """Bytes of files below ``root`` that the process ``pid`` still holds after they were
    unlinked (an open descriptor or a mapping, read from ``/proc/<pid>/fd`` and
    ``/proc/<pid>/maps``): they take disk space that no walk of ``root`` shows (model code
    maps a file, kquant renames its output over that name, the mapping fills the old inode).
    A mapping counts its length, an open file its blocks; each inode once. 0 when the
    process is gone or its ``/proc`` entries are closed."""
    prefix, suffix = str(root) + os.sep, " (deleted)"
    sizes: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or not fields[5].rstrip("\n").endswith(suffix):
                    continue
                if not fields[5].startswith(prefix):
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inode = f"{fields[3]}:{fields[4]}"
                sizes[inode] = max(sizes.get(inode, 0), end - start)
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = f"/proc/{pid}/fd/{fd}"
            with contextlib.suppress(OSError):
                target = os.readlink(link)
                if target.startswith(prefix) and target.endswith(suffix):
                    st = os.stat(link)
                    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
                    sizes[inode] = max(sizes.get(inode, 0), st.st_blocks * 512)
    except OSError:
        return sum(sizes.values())
    return sum(sizes.values())


def disk_allowance(box: Path, env: Mapping[str, str] | None = None) -> int:
    """Bytes a sandboxed stage may hold in its folder ``box`` (inside the job's work
    directory, ``box.parent``): what the work volume has left, that is ``KQUANT_WORK_BYTES``
    (the emptyDir's sizeLimit, past which the kubelet evicts the pod) less what the rest of
    the work directory holds (the fetched source and samples), and at most 95 % of the file
    system's free space (the last 5 % left to the node). The budget checked before the
    fetch (:mod:`kquant_job.budget`) keeps a conversion within it."""
    import shutil

    from kquant_job.budget import WORK_BYTES_ENV

    env = os.environ if env is None else env
    box.mkdir(parents=True, exist_ok=True)
    mine = allocated_bytes(box)
    free = int(shutil.disk_usage(box).free * 0.95) + mine
    raw = env.get(WORK_BYTES_ENV, "").strip()
    if raw.isdigit() and int(raw) > 0:
        others = allocated_bytes(box.parent) - mine
        return min(free, int(raw) - others)
    return free
