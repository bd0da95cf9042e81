"""Hostile and crashing PyTorch model files for the sandbox tests: TorchScript archives that
crash PyTorch's quantizer or their own forward, write or read a file named at build time,
never return, or allocate a given number of bytes, and a ``torch.save``-style zip whose pickle
inflates to gigabytes.

Every TorchScript builder writes a ``torch.jit.save`` archive (``code/`` and
``constants.pkl``: kquant detects it as TorchScript) whose ``forward`` takes a float32 tensor
of shape [1, 16]. Builds are deterministic (fixed seed, the caller's RNG state untouched:
same arguments and file name, same bytes; torch names the archive's folder after the file)
and take seconds.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

INPUT_SHAPE = (1, 16)


def example_input() -> torch.Tensor:
    """The input every builder's ``forward`` takes: float32 [1, 16]."""
    return torch.linspace(-1.0, 1.0, 16).reshape(INPUT_SHAPE)


def _save(module: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


class _Encoder(nn.Module):
    """One Transformer encoder layer (d_model 16, 4 heads), sequence-first."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def transformer_jit(path: Path) -> Path:
    """A scripted ``nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0)`` (batch_first False;
    the [1, 16] input is an unbatched sequence of one token). It runs and returns [1, 16].

    ``torch.ao.quantization.quantize_dynamic_jit(torch.jit.load(path), {"": qconfig})`` with
    ``default_dynamic_qconfig`` or ``per_channel_dynamic_qconfig`` kills the process with
    SIGSEGV (torch 2.13 CPU, every run): inside ``prepare_dynamic_jit``, in
    ``torch._C._jit_pass_insert_observers`` (native frame
    ``InsertObserversHelper::insertObserversFor``, recursing into the nested blocks of the
    scripted ``MultiheadAttention``), before any quantized forward runs. A scripted
    ``nn.MultiheadAttention`` or ``nn.TransformerEncoder`` crashes the same way, batch_first
    or not; the same layer traced (batch_first False) quantizes and runs.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _save(_Encoder(), path)


class _OutOfBoundsRead(nn.Module):
    """Sums a two-element view whose second element lies 2**48 bytes past the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        far = torch.ops.aten._reshape_alias(x.reshape(-1), [2], [70368744177664])  # 2**46
        return x + far.sum()


def segfault_jit(path: Path) -> Path:
    """``forward`` dies with SIGSEGV: ``aten::_reshape_alias`` (which checks no storage bounds)
    makes a view with a 2**46-element stride and ``sum`` reads 2**48 bytes past the input's
    data, an address no process maps. The crash is in the model's own forward, not in a
    quantizer."""
    return _save(_OutOfBoundsRead(), path)


class _FileWriter(nn.Module):
    def __init__(self, target: str, nbytes: int) -> None:
        super().__init__()
        self.target = target
        self.nbytes = nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        written = torch.from_file(self.target, True, self.nbytes, dtype=torch.uint8).fill_(65)
        return x * 1.0 + 0 * written.sum()  # the fill feeds the output: no dead-code removal


def file_writer_jit(path: Path, target: Path, nbytes: int) -> Path:
    """``forward(x)`` maps ``target`` (path baked in at build time) shared and fills its first
    ``nbytes`` bytes with ``A`` (65), then returns ``x`` unchanged (float32 [1, 16]).

    ``torch.from_file(..., shared=True)`` also creates ``target`` when it does not exist and
    extends it to ``nbytes`` when it is shorter."""
    return _save(_FileWriter(str(target), nbytes), path)


class _ConvertedWriter(nn.Module):
    def __init__(self, writes: list[tuple[str, bytes]]) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.targets = [t for t, _ in writes]
        self.contents = [list(c) for _, c in writes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if self.lin.weight.dtype == torch.float16:  # the converted copy only
            for i in range(len(self.targets)):  # TorchScript has no zip(strict=)
                content = self.contents[i]
                data = torch.tensor(content, dtype=torch.uint8)
                mapped = torch.from_file(self.targets[i], True, len(content), dtype=torch.uint8)
                mapped.copy_(data)
                y = y + 0 * mapped.sum().to(y.dtype)
        return y


def converted_writer_jit(path: Path, writes: list[tuple[str, bytes]]) -> Path:
    """A Linear(16, 16) whose ``forward`` (float32 [1, 16] -> float32 [1, 16]), once its
    weights are float16 (the converted copy, run by validation), writes each ``content`` over
    the start of its ``target`` (a path relative to the process's working directory, created
    when absent): the original passes as a model, its conversion rewrites files the sandboxed
    stage wrote or would read."""
    return _save(_ConvertedWriter([(str(t), bytes(c)) for t, c in writes]), path)


class _FileReader(nn.Module):
    def __init__(self, target: str, nbytes: int) -> None:
        super().__init__()
        self.target = target
        self.nbytes = nbytes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        leaked = torch.from_file(self.target, False, self.nbytes, dtype=torch.uint8)
        return x * 1.0, leaked.to(torch.float32)


def file_reader_jit(path: Path, target: Path, nbytes: int) -> Path:
    """``forward(x)`` returns ``(x, bytes)``: the input unchanged and the first ``nbytes``
    bytes of ``target`` (path baked in at build time) as a float32 [nbytes] tensor, one value
    0-255 per byte. Raises RuntimeError when ``target`` is shorter than ``nbytes``."""
    return _save(_FileReader(str(target), nbytes), path)


class _BusyLoop(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spin = 0
        while x.dim() >= 0:  # always true; the compiler cannot know
            spin = (spin + 1) % 7  # ints only: nothing allocated per turn
        return x + spin


def busy_loop_jit(path: Path) -> Path:
    """``forward`` never returns: an integer loop that spins one core and allocates nothing.
    Only a signal with default action (SIGTERM, SIGKILL) stops it; Python's SIGINT handler
    never gets to run."""
    return _save(_BusyLoop(), path)


class _MemoryHog(nn.Module):
    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes = nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hog = torch.ones(self.nbytes // 8, dtype=torch.float64)  # written: every page resident
        return x + hog.sum() * 8  # float64 sums of ones are exact, and fast unlike uint8's


def memory_hog_jit(path: Path, nbytes: int) -> Path:
    """``forward(x)`` allocates and fills ``nbytes`` bytes (``torch.ones``, float64, nbytes
    rounded down to a multiple of 8) and returns ``x + nbytes`` (float32 [1, 16]); the tensor
    is freed when forward returns."""
    return _save(_MemoryHog(nbytes), path)


# --- a torch.save zip whose data.pkl inflates to gigabytes ------------------------------

_CHUNK = 16 << 20  # zeros fed to the compressor at a time
_MAX_STRING = 1 << 30  # one pickled str per GiB of padding
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01: a fixed timestamp, deterministic bytes


def _real_checkpoint() -> dict[str, bytes]:
    """The records of ``torch.save({"weight": arange(4)})``, by name under the archive."""
    buffer = io.BytesIO()
    torch.save({"weight": torch.arange(4, dtype=torch.float32)}, buffer)
    with zipfile.ZipFile(buffer) as zf:
        return {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()}


def _padded_pickle(pickle: bytes, inflated_bytes: int) -> Iterator[bytes]:
    """The pieces of ``pickle`` (a one-item dict) with a ``"padding"`` item added: a list of
    strings of NUL characters sized so that the whole pickle is ``inflated_bytes`` long.
    Only opcodes torch's ``weights_only`` unpickler accepts (EMPTY_LIST, MARK, BINUNICODE,
    APPENDS, SETITEM)."""
    if not pickle.endswith(b"s."):
        raise ValueError("expected torch.save's pickle of a one-item dict")
    head = pickle[:-1] + b"X" + struct.pack("<I", 7) + b"padding" + b"]("
    tail = b"es."
    body = inflated_bytes - len(head) - len(tail)
    count = max(1, -(-body // (_MAX_STRING + 5)))
    content = body - 5 * count
    if content < 0:
        raise ValueError(f"inflated_bytes must be at least {len(head) + len(tail) + 5}")
    size, extra = divmod(content, count)
    zeros = memoryview(bytes(_CHUNK))
    yield head
    for i in range(count):
        left = size + (i < extra)
        yield b"X" + struct.pack("<I", left)
        while left:
            step = min(left, _CHUNK)
            yield zeros[:step]
            left -= step
    yield tail


_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")


def _zip64(method: int, csize: int, usize: int) -> tuple[int, tuple[int, int], bytes]:
    """Version needed, the (compressed, uncompressed) header fields and the extra field:
    zip64 sizes for the deflated record (as ``force_zip64``) or any record over 4 GiB."""
    if method == zipfile.ZIP_DEFLATED or max(csize, usize) >= 0xFFFFFFFF:
        return 45, (0xFFFFFFFF, 0xFFFFFFFF), struct.pack("<HHQQ", 1, 16, usize, csize)
    return 20, (csize, usize), b""


def _local_header(name: bytes, method: int, crc: int, csize: int, usize: int) -> bytes:
    version, sizes, extra = _zip64(method, csize, usize)
    fields = (version, 0, method, 0, _DOS_DATE, crc, *sizes, len(name), len(extra))
    return _LOCAL.pack(0x04034B50, *fields) + name + extra


def _central_header(
    name: bytes, method: int, crc: int, csize: int, usize: int, offset: int
) -> bytes:
    version, sizes, extra = _zip64(method, csize, usize)
    fields = (version, version, 0, method, 0, _DOS_DATE, crc, *sizes, len(name), len(extra))
    return _CENTRAL.pack(0x02014B50, *fields, 0, 0, 0, 0, offset) + name + extra


def pt_zip_bomb(path: Path, inflated_bytes: int = 2 * 1024**3) -> Path:
    """A ``torch.save`` zip (the records and order torch writes: ``<stem>/data.pkl``,
    ``.format_version``, ``.storage_alignment``, ``byteorder``, ``data/0``, ``version``,
    ``.data/serialization_id``) holding ``{"weight": arange(4), "padding": [NUL strings]}``.
    ``data.pkl`` is DEFLATE-compressed (zip64 sizes) and inflates to exactly
    ``inflated_bytes``, the size its headers declare; the other records are stored.

    2 GiB of padding compresses about 1000:1 (about 2 MB on disk, built in about 4 s): the
    zip is written here rather than through ``zipfile`` so that zlib's run-length strategy
    (``Z_RLE``, four times faster than ``zipfile``'s level 6-9 for the same size) can be
    used; the build streams 16 MiB at a time and holds only the compressed bytes.

    Small ones (say 1 MiB) load with ``torch.load(path, weights_only=True)`` (also with
    ``mmap=True``); a large one needs several times ``inflated_bytes`` of memory to load
    (torch reads the record whole, then unpickles).
    """
    records = _real_checkpoint()
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
    crc, deflated = 0, []
    for piece in _padded_pickle(records["data.pkl"], inflated_bytes):
        crc = zlib.crc32(piece, crc)
        deflated.append(compressor.compress(piece))
    deflated.append(compressor.flush())
    payload = b"".join(deflated)
    archive = path.stem or "archive"
    central = []
    with path.open("wb") as fh:
        for name, data in records.items():
            raw = f"{archive}/{name}".encode()
            if name == "data.pkl":
                entry = (zipfile.ZIP_DEFLATED, crc, len(payload), inflated_bytes)
                data = payload
            else:
                entry = (zipfile.ZIP_STORED, zlib.crc32(data), len(data), len(data))
            central.append(_central_header(raw, *entry, fh.tell()))
            fh.write(_local_header(raw, *entry))
            fh.write(data)
        start = fh.tell()
        fh.write(b"".join(central))
        size = fh.tell() - start
        n = len(central)
        fh.write(_END.pack(0x06054B50, 0, 0, n, n, size, start, 0))
    return path


class _FdWriter(nn.Module):
    def __init__(self, fds: list[int], text: str) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.fds = fds
        self.text = text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fd in self.fds:
            torch.save(self.text, "/proc/self/fd/" + str(fd))
        return self.lin(x)


def fd_writer_jit(path: Path, fds: list[int], text: str) -> Path:
    """A Linear(16, 16) whose ``forward`` (float32 [1, 16] -> float32 [1, 16]) first writes
    ``text`` (pickled by ``aten::save``) to each of its own descriptors ``fds`` through
    ``/proc/self/fd``: the sandbox's log and outcome pipes among them."""
    return _save(_FdWriter(fds, text), path)
