"""Confining the sandboxed process: called by the child itself, first thing, before it
imports a model library or opens a model file.

- **Landlock** (Linux >= 5.13; ABI detected, never assumed; landlockpy, best effort): the
  process and its threads may read only the Python installation, the system's libraries and
  configuration (``/usr``, ``/lib*``, ``/etc``, ``/sys``, ``/dev``), its own ``/proc/<pid>``
  and a few machine-wide ``/proc`` files (:data:`PROC_READ`), and the job's work directory;
  it may write only inside its sandbox folder (plus ``/dev/null`` and GPU device files). Not
  readable: other processes' ``/proc`` entries (the worker's environment holds the storage
  credentials; Landlock's own ptrace rule does not cover ``/proc/<pid>/environ``, measured on
  Linux 6.18), ``/home``, ``/root``, ``/var``, ``/run``, ``/tmp`` (service-account and
  web-identity token files live there) and anything else. With ABI >= 4 it may neither open
  nor accept TCP connections; with ABI >= 6 it may not signal processes outside its domain
  nor reach abstract Unix sockets.
- **rlimits**: data memory (``RLIMIT_DATA``: heap and private writable mappings, which is what
  numpy, onnxruntime and torch allocate; address-space reservations such as CUDA's do not
  count), no core dumps.
- the child dies with its parent (``PR_SET_PDEATHSIG``).

What Landlock does not cover is reported, never silently assumed (:func:`confine` returns
what holds); the pod's read-only root file system and ``emptyDir`` volumes still bound what
any process of the pod can write.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any

SYSTEM_READ_ROOTS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/sys")
# Of /proc, only this process's own entries and machine-wide facts libraries read (CPU and
# memory, sysctls, the GPU driver's parameters): never another process's environ or memory.
PROC_READ = ("cpuinfo", "meminfo", "stat", "loadavg", "filesystems", "sys", "driver/nvidia")
DEVICE_FILES = ("/dev/null", "/dev/zero", "/dev/full")
GPU_DEVICE_PREFIXES = ("nvidia", "dri")
PR_SET_PDEATHSIG = 1


class ConfinementError(RuntimeError):
    """The sandbox could not be set up as required (e.g. Landlock required, not present)."""


def die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies, and die now if the parent
    is already gone (a kill -9 of the worker must not leave model code running).

    ``parent``: the worker's pid, as it wrote it in the request. Compared after the prctl
    call, it catches a worker killed before it (during the child's imports, ~0.7 s): the
    parent is then the reaper and no death signal ever comes; comparing two reads of
    getppid() around the call missed exactly that case."""
    before = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != (parent if parent is not None else before):
        os._exit(1)


def python_read_roots() -> list[Path]:
    """Where this interpreter loads code from: its prefixes, every sys.path directory and
    the folders of kquant's own packages (an editable install maps them elsewhere)."""
    roots = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix)}
    roots.update(Path(p) for p in sys.path if p)
    import kquant_api
    import kquant_job

    for module in (kquant_api, kquant_job):
        roots.add(Path(module.__file__).resolve().parent.parent)
    return sorted(r for r in roots if r.exists())


def _gpu_devices() -> list[Path]:
    dev = Path("/dev")
    try:
        return sorted(p for p in dev.iterdir() if p.name.startswith(GPU_DEVICE_PREFIXES))
    except OSError:
        return []


def _allow(rules: Any, path: Path, access: Any) -> None:
    """One path rule; a file gets only the file rights of ``access`` (Landlock refuses
    directory rights on a file)."""
    from landlockpy import AccessFS

    if not path.is_dir():
        files = AccessFS.EXECUTE | AccessFS.WRITE_FILE | AccessFS.READ_FILE
        access &= files | AccessFS.TRUNCATE | AccessFS.IOCTL_DEV
    rules.allow_path(path, access)


def set_limits(memory_bytes: int) -> dict[str, Any]:
    """RLIMIT_DATA to ``memory_bytes`` (bytes), no core dumps; returns what was set."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
    return {"memoryBytes": memory_bytes, "coreDumps": False}


def landlock(read: list[Path], write: list[Path], *, required: bool) -> dict[str, Any]:
    """Restrict this process (and threads and children it starts later) to reading
    ``read`` and the system roots and writing only ``write``; no TCP, no signals or abstract
    sockets outside, where the kernel's Landlock ABI allows. Returns what is enforced.

    Raises ConfinementError when ``required`` and the kernel has no Landlock."""
    import landlockpy
    from landlockpy import AccessFS, AccessNet, Ruleset, Scope

    why = "the kernel has no Landlock"
    try:
        abi = landlockpy.abi_version()
    except landlockpy.LandlockError as exc:  # e.g. EPERM: a seccomp profile refusing it
        abi, why = 0, f"the Landlock system calls were refused ({exc})"
    if abi < 1:
        if required:
            raise ConfinementError(
                f"{why} (KQUANT_SANDBOX_REQUIRE_LANDLOCK is set): model code is not run unconfined"
            )
        return {"abi": 0, "enforced": False, "why": why}
    handled_fs = landlockpy.fs_for_abi(abi)
    reading = AccessFS.READ_FILE | AccessFS.READ_DIR | AccessFS.EXECUTE
    device = AccessFS.READ_FILE | AccessFS.WRITE_FILE | AccessFS.TRUNCATE | AccessFS.IOCTL_DEV
    net = AccessNet.BIND_TCP | AccessNet.CONNECT_TCP
    scopes = Scope.SIGNAL | Scope.ABSTRACT_UNIX_SOCKET
    with Ruleset(handled_fs=handled_fs, handled_net=net, scoped=scopes) as rules:
        own_proc = [Path(f"/proc/{os.getpid()}"), *(Path("/proc") / p for p in PROC_READ)]
        for root in [*map(Path, SYSTEM_READ_ROOTS), Path("/dev"), *own_proc, *read]:
            if root.exists():
                _allow(rules, root, reading)
        for path in [*map(Path, DEVICE_FILES), *_gpu_devices()]:
            if path.exists():
                _allow(rules, path, device)
        for root in write:
            _allow(rules, root, handled_fs)
        rules.restrict()
        return {
            "abi": abi,
            "enforced": True,
            "write": [str(p) for p in write],
            "read": sorted({*SYSTEM_READ_ROOTS, "/dev", *(str(p) for p in [*own_proc, *read])}),
            "tcp": "denied" if rules.handled_net else "not restricted (Landlock ABI < 4)",
            "signalsAndAbstractSockets": (
                "confined" if rules.scoped else "not restricted (Landlock ABI < 6)"
            ),
        }


def confine(
    read: list[Path],
    write: list[Path],
    memory_bytes: int,
    *,
    require_landlock: bool,
    parent: int | None = None,
) -> dict[str, Any]:
    """Everything above, in order (``parent``: the worker's pid, see
    :func:`die_with_parent`); returns the report's ``sandbox`` entry. Raises
    ConfinementError (see :func:`landlock`) and OSError from the rlimit calls."""
    die_with_parent(parent)
    report = set_limits(memory_bytes)
    report["landlock"] = landlock([*python_read_roots(), *read], write, required=require_landlock)
    report["environment"] = "no storage credentials (only an allow-list of variables)"
    return report
