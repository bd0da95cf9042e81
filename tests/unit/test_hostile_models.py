"""The hostile model builders of tests/hostile_models.py do what they claim: each crash, hang,
file write or allocation is observed in a child process (with a timeout), never in pytest's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hostile_models import (
    _padded_pickle,
    busy_loop_jit,
    example_input,
    file_reader_jit,
    file_writer_jit,
    memory_hog_jit,
    pt_zip_bomb,
    segfault_jit,
    transformer_jit,
)

from kquant_api import ModelFormat
from kquant_job.formats import detect_format

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # torch.jit, 2.13
TESTS = Path(__file__).resolve().parents[1]


def child(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python (tests/ importable); its output captured."""
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def build_all(folder: Path, target: Path) -> dict[str, Path]:
    folder.mkdir()
    return {
        "transformer": transformer_jit(folder / "transformer.pt"),
        "segfault": segfault_jit(folder / "segfault.pt"),
        "writer": file_writer_jit(folder / "writer.pt", target, 64),
        "reader": file_reader_jit(folder / "reader.pt", target, 64),
        "busy": busy_loop_jit(folder / "busy.pt"),
        "hog": memory_hog_jit(folder / "hog.pt", 1 << 20),
    }


def test_torchscript_builders_write_loadable_deterministic_archives(tmp_path):
    target = tmp_path / "target.bin"
    target.write_bytes(bytes(64))
    first, second = build_all(tmp_path / "a", target), build_all(tmp_path / "b", target)
    for name, path in first.items():
        names = zipfile.ZipFile(path).namelist()
        assert any(n.endswith("/constants.pkl") for n in names), name
        assert any("/code/" in n for n in names), name
        assert detect_format(path) is ModelFormat.torchscript, name
        torch.jit.load(str(path))
        assert path.read_bytes() == second[name].read_bytes(), f"{name} differs between builds"


@pytest.mark.parametrize("qconfig", ["default_dynamic_qconfig", "per_channel_dynamic_qconfig"])
def test_quantize_dynamic_jit_segfaults_on_the_transformer(tmp_path, qconfig):
    path = transformer_jit(tmp_path / "transformer.pt")
    x = example_input()
    assert torch.jit.load(str(path))(x).shape == x.shape  # a working model as it is
    done = child(
        f"""
        import torch
        from torch.ao.quantization import quantize_dynamic_jit, {qconfig}
        module = torch.jit.load({str(path)!r})
        print("loaded", flush=True)
        quantize_dynamic_jit(module, {{"": {qconfig}}})
        print("quantized", flush=True)
        """
    )
    assert done.returncode == -signal.SIGSEGV, done.stderr[-2000:]
    assert done.stdout.split() == ["loaded"]


def test_segfault_jit_dies_in_forward(tmp_path):
    path = segfault_jit(tmp_path / "segfault.pt")
    done = child(
        f"""
        import torch
        module = torch.jit.load({str(path)!r})
        print("loaded", flush=True)
        module(torch.zeros(1, 16))
        print("returned", flush=True)
        """
    )
    assert done.returncode == -signal.SIGSEGV, done.stderr[-2000:]
    assert done.stdout.split() == ["loaded"]


def test_file_writer_jit_overwrites_the_target(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_bytes(b"x" * 64 + b"tail")
    path = file_writer_jit(tmp_path / "writer.pt", target, 64)
    assert target.read_bytes() == b"x" * 64 + b"tail"  # building writes nothing
    done = child(
        f"""
        import torch
        from hostile_models import example_input
        x = example_input()
        y = torch.jit.load({str(path)!r})(x)
        assert y.dtype == torch.float32 and torch.equal(y, x), y
        """
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert target.read_bytes() == b"A" * 64 + b"tail"


def test_file_reader_jit_leaks_the_target_into_an_output(tmp_path):
    target = tmp_path / "secret.bin"
    secret = bytes(range(256)) * 2
    target.write_bytes(secret)
    path = file_reader_jit(tmp_path / "reader.pt", target, len(secret))
    target.write_bytes(secret[::-1])  # read at call time, not at build time
    x = example_input()
    same, leaked = torch.jit.load(str(path))(x)
    assert torch.equal(same, x)
    assert leaked.dtype == torch.float32
    assert bytes(leaked.to(torch.uint8).tolist()) == secret[::-1]
    target.write_bytes(b"short")
    with pytest.raises(RuntimeError, match="smaller than the required mapping size"):
        torch.jit.load(str(path))(x)


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_busy_loop_jit_never_returns_and_does_not_grow(tmp_path):
    path = busy_loop_jit(tmp_path / "busy.pt")
    code = f"""
        import torch
        module = torch.jit.load({str(path)!r})
        print("calling", flush=True)
        module(torch.zeros(1, 16))
        print("returned", flush=True)
        """
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout.readline().strip() == "calling"
        time.sleep(0.5)
        before = rss_kib(proc.pid)
        time.sleep(2.0)
        assert proc.poll() is None, "forward returned"
        assert rss_kib(proc.pid) - before < 8 * 1024
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_memory_hog_jit_allocates_what_it_is_told(tmp_path):
    nbytes = 256 << 20
    path = memory_hog_jit(tmp_path / "hog.pt", nbytes)
    done = child(
        f"""
        import resource, torch
        from hostile_models import example_input
        module = torch.jit.load({str(path)!r})
        x = example_input()
        status = open("/proc/self/status").read().split("VmRSS:")[1]
        before = int(status.split()[0])
        y = module(x)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        assert torch.equal(y, x + {nbytes}), y
        """
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) * 1024 >= 0.95 * nbytes  # peak RSS over RSS before


@pytest.mark.parametrize(
    "size", [1 << 20, (1 << 30) + 3, (1 << 30) + 5 + 400, 3 * (1 << 30) + 17, 2 * 1024**3]
)
def test_padded_pickle_is_exactly_the_asked_size(size):
    pickle = b"\x80\x02}q\x00X\x01\x00\x00\x00wK\x01s."
    assert sum(len(piece) for piece in _padded_pickle(pickle, size)) == size


def test_padded_pickle_refuses_a_size_below_its_frame():
    with pytest.raises(ValueError, match="at least"):
        list(_padded_pickle(b"\x80\x02}X\x01\x00\x00\x00wK\x01s.", 20))


def test_pt_zip_bomb_declares_gigabytes_in_a_few_megabytes(tmp_path):
    path = tmp_path / "bomb.pt"
    done = child(
        f"""
        import resource, time
        from pathlib import Path
        from hostile_models import pt_zip_bomb
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.monotonic()
        pt_zip_bomb(Path({str(path)!r}))
        seconds = time.monotonic() - start
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, seconds)
        """
    )
    assert done.returncode == 0, done.stderr[-2000:]
    grown_kib, seconds = done.stdout.split()
    assert int(grown_kib) < 64 * 1024, "the build held the inflated bytes in memory"
    assert float(seconds) < 30
    assert path.stat().st_size < 4 << 20
    assert detect_format(path) is ModelFormat.pytorch
    with zipfile.ZipFile(path) as zf:
        info = {i.filename: i for i in zf.infolist()}
        pkl = info["bomb/data.pkl"]
        assert pkl.compress_type == zipfile.ZIP_DEFLATED
        assert pkl.file_size == 2 * 1024**3
        assert pkl.compress_size < 4 << 20
        assert {"bomb/version", "bomb/byteorder", "bomb/data/0"} <= set(info)
        with zf.open(pkl) as fh:
            assert fh.read(2) == b"\x80\x02"  # a pickle, protocol 2, as torch.save writes


def test_small_pt_zip_bomb_loads_with_weights_only(tmp_path):
    path = pt_zip_bomb(tmp_path / "small.pt", 1 << 20)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # CRCs and sizes hold
        assert zf.getinfo("small/data.pkl").file_size == 1 << 20
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["weight"], torch.arange(4, dtype=torch.float32))
    assert set("".join(loaded["padding"])) == {"\0"}
    assert sum(map(len, loaded["padding"])) > (1 << 20) - 512
