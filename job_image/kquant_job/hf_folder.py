"""Hugging Face model folders: recognised from their files alone, without importing anything.

A folder written by ``transformers``' ``save_pretrained`` holds ``config.json`` (whose
``architectures`` names the model class, e.g. ``Wav2Vec2ForCTC``) and its weights, in
safetensors (``model.safetensors``, or shards listed by ``model.safetensors.index.json``) or
pickled (``pytorch_model.bin``). Such a folder can be rebuilt from trusted code: the class
from the ``transformers`` package, the weights as plain tensors. INT8 and INT4 need the code
that runs the weights, so for them kquant exports the folder to ONNX
(:mod:`kquant_job.passes.transformers_export`) and quantizes the export.

Refused, with the reason (:class:`HfFolder.refusal`): a config naming code shipped with the
model (``auto_map``: ``trust_remote_code``), no architecture or several, encoder-decoder
models (their export is one graph per part), and weights that are only pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
MAX_CONFIG_BYTES = 4 << 20  # a config.json is a few KiB; more is no config


@dataclass
class HfFolder:
    """What a Hugging Face folder's files say: the ``architecture`` named by config.json,
    ``model_type``, the safetensors weight files (relative, '/'-separated; the index file
    first when sharded), the pickled weight files, and why kquant will not rebuild it
    (``refusal``, None when it can)."""

    architecture: str | None
    model_type: str | None
    weights: list[str] = field(default_factory=list)
    pickled: list[str] = field(default_factory=list)
    refusal: str | None = None

    @property
    def weight_files(self) -> list[str]:
        """Every file holding (or indexing) the weights, safetensors and pickled: the
        converted model replaces them all."""
        return self.weights + self.pickled


def _shards(root: Path) -> list[str]:
    """The shards ``model.safetensors.index.json`` lists, index first. Raises ValueError for
    an index past MAX_CONFIG_BYTES, a malformed one, or a shard name that leaves the folder
    or is missing; RecursionError for nesting past the recursion limit."""
    path = root / SAFETENSORS_INDEX
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
    index = json.loads(path.read_text())
    names = sorted(set(index["weight_map"].values()))
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) != 1 or name in (".", "..") or not (root / name).is_file():
            raise ValueError(f"shard {name!r} is not a file of the folder")
    return [SAFETENSORS_INDEX, *names]


def read_hf_folder(root: Path) -> HfFolder | None:
    """The Hugging Face folder at ``root``, or None when ``root`` has no ``config.json`` that
    names ``architectures`` (a SenseVoice folder's config.yaml, a plain folder of models).
    Reads config.json as JSON only (at most 4 MiB); nothing is imported or executed."""
    config = root / CONFIG
    if not config.is_file() or config.stat().st_size > MAX_CONFIG_BYTES:
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError, RecursionError):
        # unreadable, not JSON, an integer past Python's 4300 digits, nesting past the
        # recursion limit: not a folder transformers could rebuild (trial: InternalError)
        return None
    if not isinstance(data, dict) or "architectures" not in data:
        return None
    archs = data.get("architectures")
    model_type = data.get("model_type") if isinstance(data.get("model_type"), str) else None
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 else None
    folder = HfFolder(arch if isinstance(arch, str) else None, model_type)
    folder.pickled = [p for p in PICKLED if (root / p).is_file()]
    try:
        if (root / SAFETENSORS_INDEX).is_file():
            folder.weights = _shards(root)
        elif (root / SAFETENSORS).is_file():
            folder.weights = [SAFETENSORS]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OSError) as exc:
        folder.refusal = f"{SAFETENSORS_INDEX} is unusable: {exc}"
        return folder
    folder.refusal = _refusal(data, folder)
    return folder


def _refusal(data: dict[str, object], folder: HfFolder) -> str | None:
    if "auto_map" in data:
        return (
            "config.json's auto_map names model code shipped with the folder "
            "(trust_remote_code): kquant runs only code from the transformers package"
        )
    if folder.architecture is None:
        return (
            f"config.json's architectures is {data.get('architectures')!r}: kquant needs "
            "exactly one transformers class name (e.g. ['Wav2Vec2ForCTC'])"
        )
    if data.get("is_encoder_decoder"):
        return (
            f"{folder.architecture} is an encoder-decoder model: its ONNX export is one graph "
            "per part (encoder, decoder with and without past), which kquant does not build; "
            "export the parts with Optimum and quantize the .onnx files"
        )
    if not folder.weights:
        if folder.pickled:
            return (
                f"the weights are pickled ({', '.join(folder.pickled)}) and kquant loads a "
                "transformers folder's weights from safetensors only; save them with "
                "save_pretrained(..., safe_serialization=True)"
            )
        return f"no weights: neither {SAFETENSORS} nor {SAFETENSORS_INDEX} is in the folder"
    return None
