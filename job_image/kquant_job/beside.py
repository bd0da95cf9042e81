"""Output names: the usual layout, and converted models written beside their originals.

Usual layout: a single model file ``silero_vad.onnx`` becomes ``silero_vad_fp16.onnx``; a
model directory keeps its paths (its output prefix says what it holds).

Beside the originals (``spec.output.besideOriginals``; the users' ``quantize_fp16_models.py
--models-dir models``): the output is the models folder itself, and only new names appear
in it, so a service that prefers the ``_fp16`` file picks it up:

- a folder that holds a model file together with anything else (configs, tokenizers,
  sub-folders: SenseVoice's ``model.pt`` with ``config.yaml`` and ``tokens.json``) is one
  model, loaded by its folder: it becomes ``<folder>_fp16/``, its models converted and its
  other files copied (a folder none of whose models is converted, all excluded or kept, is
  left alone: its ``_fp16`` name would promise a conversion it does not hold);
- any other model file (at the top, or in a folder holding only model files) gets a sibling
  ``<stem>_fp16<suffix>``: ``silero_vad.onnx`` -> ``silero_vad_fp16.onnx``;
- every other file is left alone: not copied, not touched.

Objects already named like a conversion (a path segment whose stem ends in ``_fp16``,
``_bf16`` or ``_int8``: earlier outputs, kquant's or hand-made) and kquant's ``.kquant/``
folder are not read as originals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from kquant_api import ModelFormat
from kquant_job.formats import Plan

PRECISION_SUFFIX = {"fp16": "_fp16", "bf16": "_bf16", "int8": "_int8"}


def suffix_for(label: str) -> str:
    """The output name suffix for a precision or a conversion's name: ``_<label>``."""
    return PRECISION_SUFFIX.get(label, f"_{label}")


_CONVERTED = re.compile(r"_(fp16|bf16|int8|q4|q4f16)$")
KQUANT_DIR = ".kquant/"


@dataclass
class OutputNames:
    """Where each source file goes, by its path relative to the source root: ``models``
    (converted; the output path of the model file), ``copies`` (copied unchanged, kept model
    files included), ``left`` (not published: loose files beside the originals), and
    ``folders``: the output folders that belong to the set whole ('/'-terminated)."""

    models: dict[str, str] = field(default_factory=dict)
    copies: dict[str, str] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)


def home_for(precision: str) -> str:
    """kquant's bookkeeping folder on a models folder it writes beside the originals, one
    per precision: ``.kquant/beside-fp16/``."""
    return f"{KQUANT_DIR}beside-{precision}/"


def looks_converted(key: str) -> bool:
    """Whether a key is kquant's bookkeeping or an earlier conversion's output: it lies in
    ``.kquant/``, or a segment's stem (before its first '.') ends in ``_fp16``, ``_bf16`` or
    ``_int8``."""
    if key.startswith(KQUANT_DIR):
        return True
    return any(_CONVERTED.search(part.split(".", 1)[0]) for part in key.split("/"))


def output_name(rel: str, precision: str, single_file: bool) -> str:
    """Output path of a converted model in the usual layout: ``silero_vad.onnx`` ->
    ``silero_vad_fp16.onnx`` for a single-file model; unchanged inside a model directory,
    whose output prefix already says what it holds."""
    if not single_file:
        return rel
    return sibling_name(rel, precision)


def sibling_name(rel: str, precision: str) -> str:
    """``dir/silero_vad.onnx`` -> ``dir/silero_vad_fp16.onnx``; a folder ``dir/SenseVoice``
    -> ``dir/SenseVoice_fp16``."""
    path = PurePosixPath(rel)
    return str(path.with_name(f"{path.stem}{suffix_for(precision)}{path.suffix}"))


def plan_names(plan: Plan, precision: str, single_file: bool, beside: bool) -> OutputNames:
    """The output names of a plan (see the module docstring). A Hugging Face folder's
    weights become ONNX (:mod:`kquant_job.passes.transformers_export`): their output name
    ends in ``.onnx`` (``model.safetensors`` -> ``model.onnx``)."""
    names = _plan_names(plan, precision, single_file, beside)
    exported = {m.rel for m in plan.models if m.format is ModelFormat.transformers}
    for rel in exported & set(names.models):
        names.models[rel] = str(PurePosixPath(names.models[rel]).with_suffix(".onnx"))
    return names


def _plan_names(plan: Plan, precision: str, single_file: bool, beside: bool) -> OutputNames:
    names = OutputNames()
    if not beside:
        names.models = {m.rel: output_name(m.rel, precision, single_file) for m in plan.models}
        names.copies = {c: c for c in plan.copies}
        return names
    # a model's external data files belong to it: they make no folder a model folder
    model_files = {m.rel for m in plan.models} | set(plan.kept) | set(plan.external_data)
    every = sorted(model_files | set(plan.copies))
    converted_models = {m.rel for m in plan.models}
    # a folder none of whose models is converted (all excluded or kept) is no output: a
    # SenseVoiceSmall_int8/ holding the FP32 model.pt would be loaded for INT8 (trial)
    units = [
        u for u in _model_folders(every, model_files)
        if any(rel.startswith(u + "/") for rel in converted_models)
    ]  # fmt: skip
    suffix = suffix_for(precision)
    names.folders = sorted(f"{u}{suffix}/" for u in units)
    for rel in sorted({m.rel for m in plan.models} | set(plan.copies)):
        unit = next((u for u in units if rel.startswith(u + "/")), None)
        converted = rel in {m.rel for m in plan.models}
        if unit is not None:
            target = f"{unit}{suffix}/{rel[len(unit) + 1 :]}"
            (names.models if converted else names.copies)[rel] = target
        elif converted:
            names.models[rel] = sibling_name(rel, precision)
        else:
            names.left.append(rel)
    return names


def _model_folders(files: list[str], model_files: set[str]) -> list[str]:
    """The outermost folders (below the root) that hold a model file directly together with
    anything else: another file that is no model, or a sub-folder."""
    direct: dict[str, list[str]] = {}
    subfolders: dict[str, set[str]] = {}
    for rel in files:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[: i - 1])
            subfolders.setdefault(parent, set()).add("/".join(parts[:i]))
        direct.setdefault("/".join(parts[:-1]), []).append(rel)
    units = []
    for folder in sorted(direct):
        if not folder or any(folder.startswith(u + "/") for u in units):
            continue
        here = direct[folder]
        if any(f in model_files for f in here) and (
            any(f not in model_files for f in here) or subfolders.get(folder)
        ):
            units.append(folder)
    return units
