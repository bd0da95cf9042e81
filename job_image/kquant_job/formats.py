"""Model format detection from content, and the plan for a model directory.

Detection reads a few bytes (and, for ONNX, walks the top-level protobuf fields with seeks),
so it costs the same for a 1 MB and a 5 GB file. The file extension is only a hint: a
``.onnx`` file whose bytes are not ONNX is reported as corrupt, not as another format.
"""

from __future__ import annotations

import fnmatch
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from kquant_api import ModelFormat, Reason
from kquant_api.spec import DEFAULT_EXCLUDE
from kquant_job.errors import PassError

# ModelProto top-level fields (onnx/onnx.proto3): number -> protobuf wire type.
_ONNX_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2}
_ONNX_IR_VERSION, _ONNX_GRAPH = 1, 7
_EXTENSIONS = {
    ".onnx": ModelFormat.onnx,
    ".pt": ModelFormat.pytorch,
    ".pth": ModelFormat.pytorch,
    ".bin": ModelFormat.pytorch,
    ".ckpt": ModelFormat.pytorch,
    ".jit": ModelFormat.torchscript,
    ".safetensors": ModelFormat.safetensors,
}


def _read_varint(fh: object, limit: int = 10) -> int | None:
    value = shift = 0
    for _ in range(limit):
        byte = fh.read(1)  # type: ignore[attr-defined]
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
    return None


def _looks_like_onnx(path: Path) -> bool:
    """True when the file's top-level protobuf fields are those of an ONNX ModelProto and
    include both ir_version and graph."""
    size = path.stat().st_size
    seen: set[int] = set()
    with path.open("rb") as fh:
        while fh.tell() < size:
            tag = _read_varint(fh)
            if tag is None:
                return False
            number, wire = tag >> 3, tag & 7
            if _ONNX_FIELDS.get(number) != wire:
                return False
            if wire == 0:
                if _read_varint(fh) is None:
                    return False
            else:
                length = _read_varint(fh)
                if length is None or fh.tell() + length > size:
                    return False
                fh.seek(length, 1)
            seen.add(number)
    return {_ONNX_IR_VERSION, _ONNX_GRAPH} <= seen


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 10:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= path.stat().st_size - 8 and head[8:9] == b"{"


def _zip_format(path: Path) -> ModelFormat | None:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return ModelFormat.torchscript
    if any(n.endswith("/data.pkl") for n in names):
        return ModelFormat.pytorch
    return None


def detect_format(path: Path) -> ModelFormat | None:
    """The format of one file from its content, or None when it is no model we know.

    ONNX: protobuf ModelProto with ir_version and graph; TorchScript: zip archive with
    ``constants.pkl`` or ``code/``; PyTorch: zip with ``data.pkl`` or a legacy pickle
    (protocol 2-5 header); safetensors: little-endian u64 header length then a JSON object.
    """
    with path.open("rb") as fh:
        head = fh.read(16)
    if head.startswith(b"PK\x03\x04"):
        return _zip_format(path)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return ModelFormat.pytorch
    if _looks_like_safetensors(path, head):
        return ModelFormat.safetensors
    if _looks_like_onnx(path):
        return ModelFormat.onnx
    return None


def check_model_file(path: Path, declared: ModelFormat, display: str) -> ModelFormat:
    """The format of a file given as a model, checked against the declared format.

    Raises PassError(CorruptModel) when the bytes do not match the declared format or the
    extension's format, PassError(UnsupportedFormat) when the file is no model at all.
    """
    found = detect_format(path)
    hinted = _EXTENSIONS.get(path.suffix.lower())
    expected = declared if declared is not ModelFormat.auto else hinted
    if found is None:
        if expected is not None:
            size = path.stat().st_size
            why = "an empty file" if size == 0 else f"{size} bytes whose content does not parse"
            raise PassError(
                f"{display}: not a valid {expected.value} model ({why})",
                reason=Reason.CorruptModel,
            )
        raise PassError(
            f"{display}: not a model file (no ONNX, TorchScript, PyTorch or safetensors "
            "content found)",
            reason=Reason.UnsupportedFormat,
        )
    if declared is not ModelFormat.auto and found is not declared:
        raise PassError(
            f"{display}: declared format {declared.value} but the content is {found.value}",
            reason=Reason.CorruptModel,
        )
    return found


@dataclass
class ModelFile:
    """A file of the source to convert: path relative to the source root, its format, and
    the external data files it references (relative to the source root)."""

    rel: str
    format: ModelFormat
    external: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """What to do with each source file: convert (``models``), copy unchanged (``copies``),
    or leave out because a converted model rewrites it (``external_data``). ``kept`` names
    the copies that are model files left unconverted by ``exclude``/``include``, with the
    reason (reported as kept, e.g. CosyVoice's ``hift.pt`` in FP32); ``warnings`` says when
    ``include`` leaves files unconverted that the defaults would convert."""

    root: Path
    models: list[ModelFile] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)
    external_data: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # model file -> why it stays as it is
    warnings: list[str] = field(default_factory=list)


def _matches(rel: str, patterns: list[str]) -> bool:
    name = PurePosixPath(rel).name
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _named(rel: str, patterns: list[str]) -> bool:
    """True when a pattern without glob characters names ``rel`` (its path or file name)."""
    literal = [p for p in patterns if not any(c in p for c in "*?[")]
    return _matches(rel, literal)


def _excluded(rel: str, include: list[str] | None, exclude: list[str] | None) -> str | None:
    """Why ``rel`` is excluded, or None. ``exclude`` given: its patterns decide. Unset:
    DEFAULT_EXCLUDE, except for a file an include pattern names literally."""
    if exclude is not None:
        hit = next((p for p in exclude if _matches(rel, [p])), None)
        return f"matches exclude pattern {hit!r}" if hit else None
    if _matches(rel, list(DEFAULT_EXCLUDE)) and not _named(rel, include or []):
        return (
            "excluded by default (CosyVoice's HiFi-GAN vocoder stays FP32, as its users keep "
            "it; exclude: [] converts it too)"
        )
    return None


def graph_tensors(graph: object) -> list[object]:
    """Initializers and attribute tensors of a graph and all its subgraphs."""
    tensors = list(graph.initializer)  # type: ignore[attr-defined]
    for node in graph.node:  # type: ignore[attr-defined]
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
            tensors.extend(attr.tensors)
            for sub in [attr.g] if attr.HasField("g") else []:
                tensors.extend(graph_tensors(sub))
            for sub in attr.graphs:
                tensors.extend(graph_tensors(sub))
    return tensors


def _onnx_external_files(model: Path, known: tuple[str, ...] | None = None) -> set[Path]:
    """The files ``model``'s tensors keep their data in (resolved, existing or not), from
    its ``known`` locations or, when None, from the model (not parsed when its bytes hold no
    reference). Raises PassError(CorruptModel) for a location holding a NUL byte."""
    if known is None:
        known = tuple(external_locations(model)) if may_hold_external_data(model) else ()
    for location in known:
        if "\x00" in location:  # no file has such a name; resolve() would raise ValueError
            raise PassError(
                f"{model.name}: external data location {location!r} holds a NUL byte",
                reason=Reason.CorruptModel,
            )
    return {(model.parent / location).resolve() for location in known}


def external_locations(model: Path) -> list[str]:
    """The ``location`` of every external-data reference of the ONNX file at ``model``, as
    written (unchecked: may be absolute or hold ``..``), sorted, each once. Raises
    PassError(CorruptModel) when the file does not parse. Runs in the sandbox: it parses
    (callers skip it when :func:`may_hold_external_data` says there is nothing to find)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:
        raise PassError(f"{model.name}: not a readable ONNX model: {exc}",
                        reason=Reason.CorruptModel) from None  # fmt: skip
    found = set()
    for tensor in graph_tensors(proto.graph):
        if uses_external_data(tensor):
            found.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(found)


def may_hold_external_data(model: Path) -> bool:
    """False only when no tensor of the ONNX file at ``model`` can reference external data:
    every reference is a ``StringStringEntryProto`` whose key, the UTF-8 string "location",
    lies in the file as is, so a file without those bytes has none. A byte search of a
    400 MB model takes 0.1 s where a parse takes 1.9 s; a match (possibly inside weights)
    just means a parse."""
    key = b"location"
    buf = bytearray(8 * 1024 * 1024)  # read in blocks: a mapping would count in peak RSS
    view = memoryview(buf)
    tail = b""  # the previous block's last bytes: the key may straddle two blocks
    with model.open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            edge = tail + bytes(view[: len(key) - 1])
            if key in edge or buf.find(key, 0, n) >= 0:
                return True
            tail = bytes(view[max(0, n - len(key) + 1) : n])
    return False


def kquant_outputs(rels: list[str]) -> list[str]:
    """The folders ('/'-terminated) below the top of a listing that are kquant output
    prefixes: each holds a ``.kquant/`` folder (its sets; ``manifest.json`` and the
    fixed-name copies beside it). A model folder that holds an earlier job's output (say
    ``models/out/`` of a job on ``models/silero.onnx``) would otherwise have that output's
    converted copies planned as originals. The top itself is not one here: a source that is
    an output prefix is refused when planning names (stage._refuse_reserved)."""
    found = set()
    for rel in rels:
        parts = rel.split("/")
        if ".kquant" in parts[1:-1]:
            found.add("/".join(parts[: parts.index(".kquant", 1)]) + "/")
    # an output nested in another is inside it already
    return sorted(f for f in found if not any(f != o and f.startswith(o) for o in found))


def _relative(root: Path, files: set[Path]) -> list[str]:
    base = root.resolve()
    return sorted(f.relative_to(base).as_posix() for f in files if base in f.parents)


def plan_hf_folder(local: Path, declared: ModelFormat, needs_code: bool) -> Plan | None:
    """The plan of a Hugging Face folder (:mod:`kquant_job.hf_folder`) exported to ONNX: one
    model (its first weight file, format ``transformers``), its other weight files rewritten
    by the export, every other file (config.json, tokenizer, preprocessor) copied. None when
    the folder is not taken as one: ``declared`` is neither ``transformers`` nor ``auto``,
    or ``auto`` and the conversion does not need the model's code (``needs_code``: int8,
    int4). Raises PassError(UnsupportedFormat) with the folder's refusal, or when
    ``transformers`` is declared for something else."""
    from kquant_job.hf_folder import read_hf_folder

    wanted = declared is ModelFormat.transformers or (
        declared is ModelFormat.auto and needs_code and local.is_dir()
    )
    if not wanted:
        return None
    hf = read_hf_folder(local) if local.is_dir() else None
    if hf is None:
        if declared is ModelFormat.transformers:
            raise PassError(
                "spec.model.format transformers: the source is no Hugging Face folder (a "
                "prefix holding config.json that names architectures, and its weights)",
                reason=Reason.UnsupportedFormat,
            )
        return None
    if hf.refusal:
        raise PassError(hf.refusal, reason=Reason.UnsupportedFormat)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    weights = hf.weight_files
    main = next(w for w in hf.weights if w.endswith(".safetensors"))
    return Plan(
        root=local,
        models=[ModelFile(main, ModelFormat.transformers, [w for w in weights if w != main])],
        copies=[f for f in files if f not in weights],
        external_data=[w for w in weights if w != main],
    )


def plan_model(
    local: Path,
    declared: ModelFormat = ModelFormat.auto,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    needs_code: bool = False,
    external: tuple[str, ...] | None = None,
) -> Plan:
    """Plan the conversion of a fetched model: one file, or a directory walked recursively.

    In a directory, files matching ``include`` (default: every file detected as a model) and
    not ``exclude`` (default: :data:`~kquant_api.spec.DEFAULT_EXCLUDE`, see
    :func:`_excluded`) are converted; external data files of ONNX models are rewritten by
    the conversion; everything else is copied unchanged, model files among them listed in
    ``kept``. A single file is converted whatever the patterns say. Raises
    PassError(UnsupportedFormat) when nothing to convert is found, PassError(CorruptModel)
    for an unreadable model.

    ``external``: a single ONNX file's external-data locations when already known (the
    worker read them to fetch the files: :mod:`kquant_job.companions`), else None.

    A Hugging Face folder is one model when ``transformers`` is declared, or ``auto`` with a
    conversion that ``needs_code`` (:func:`plan_hf_folder`).
    """
    hf_plan = plan_hf_folder(local, declared, needs_code)
    if hf_plan is not None:
        return hf_plan
    if local.is_file():
        fmt = check_model_file(local, declared, local.name)
        model = ModelFile(local.name, fmt)
        if fmt is ModelFormat.onnx:
            model.external = _relative(local.parent, _onnx_external_files(local, external))
        return Plan(root=local.parent, models=[model])
    plan = Plan(root=local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    outputs = kquant_outputs([p.relative_to(local).as_posix() for p in files])
    narrowed = []  # model files the defaults would convert and include leaves out
    skipped: dict[str, int] = {}
    for path in files:
        rel = path.relative_to(local).as_posix()
        inside = next((o for o in outputs if rel.startswith(o)), None)
        if inside is not None:  # neither an original nor the user's file to copy
            skipped[inside] = skipped.get(inside, 0) + 1
            continue
        why = _excluded(rel, include, exclude)
        if why:
            plan.copies.append(rel)
            if detect_format(path) is not None:
                plan.kept[rel] = why
            continue
        if include is not None:
            if not _matches(rel, include):
                plan.copies.append(rel)
                if detect_format(path) is not None:
                    plan.kept[rel] = f"matches no include pattern ({', '.join(include)})"
                    if not _excluded(rel, None, exclude):
                        narrowed.append(rel)
                continue
            fmt = check_model_file(path, declared, rel)
        else:
            fmt = detect_format(path)
            if fmt is None or (declared is not ModelFormat.auto and fmt is not declared):
                plan.copies.append(rel)
                continue
        plan.models.append(ModelFile(rel, fmt))
    for m in plan.models:
        if m.format is ModelFormat.onnx:
            m.external = _relative(local, _onnx_external_files(local / m.rel))
    referenced = {e for m in plan.models for e in m.external}
    plan.external_data = sorted(c for c in plan.copies if c in referenced)
    plan.copies = [c for c in plan.copies if c not in referenced]
    for folder, count in skipped.items():
        plan.warnings.append(
            f"{folder} holds an earlier kquant output (a .kquant/ folder): its {count} files "
            "are neither converted nor copied (to convert a model it published, name that "
            "file as spec.model.uri: its prefix holds kquant's own names; or move the output "
            "out of the model folder)"
        )
    if narrowed:
        plan.warnings.append(
            f"include {include} converts only the files it matches: {', '.join(narrowed)} "
            "stay as they are, though kquant converts them by default (to convert a "
            "default-excluded file as well as the others, set exclude: [] instead)"
        )
    if not plan.models:
        mentions = f"; {', '.join(skipped)} skipped: earlier kquant output" if skipped else ""
        raise PassError(
            f"no model file found in the source directory ({len(files)} files; "
            f"include/exclude patterns may leave nothing to convert{mentions})",
            reason=Reason.UnsupportedFormat,
        )
    return plan
