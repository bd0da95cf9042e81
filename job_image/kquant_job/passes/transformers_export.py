"""A Hugging Face folder rebuilt from trusted code and exported to ONNX, so that the ONNX
passes (INT8 dynamic and static, INT4, FP16) can quantize it.

Runs in the sandbox, like every step that reads model files. The class is the one
config.json names, looked up in the ``transformers`` package (never ``trust_remote_code``);
the weights load from safetensors (``use_safetensors=True``), offline. The export is
``torch.onnx.export`` (the TorchScript-based exporter, opset 17) of the model's forward on
its main input (``model.main_input_name``: ``input_values`` for a waveform, ``input_ids``
with ``attention_mask`` for text, ``pixel_values`` for images); every tensor of its output
(``logits``, ``last_hidden_state``, ``pooler_output``...) becomes a graph output.

The export is checked against PyTorch before anything uses it: both run on example inputs of
two lengths (the second checks the dynamic axes), and every output must hold cosine
similarity >= 0.9999 and max |a - b| <= 1e-3 x max(1, max |a|) (float32 reorderings stay near
1e-6; a wrong trace is off by whole values). Anything else ends in ConversionFailed naming
the output and the figures.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from kquant_api import Reason
from kquant_job.errors import PassError
from kquant_job.hf_folder import HfFolder

LOG = logging.getLogger("kquant")
OPSET = 17
MIN_COSINE = 0.9999
MAX_ERROR = 1e-3  # times max(1, max |reference|)
# Example lengths per main input: samples of 16 kHz audio (1 s and 0.75 s), tokens.
LENGTHS = {"input_values": (16000, 12000), "input_ids": (16, 11), "pixel_values": (1, 1)}


def _failed(message: str) -> PassError:
    return PassError(message, reason=Reason.ConversionFailed)


def load_model(folder: Path, hf: HfFolder) -> Any:
    """The model class config.json names, from the ``transformers`` package, with the
    folder's safetensors weights, in FP32 eval mode. Raises PassError(UnsupportedFormat)
    when the name is no transformers model class, PassError(CorruptModel) when the config
    describes far more parameters than the weights hold, PassError(ConversionFailed) when
    loading fails."""
    # The sandbox has no network anyway: fail fast rather than retry; no progress bars.
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ[key] = "1"
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    cls = getattr(transformers, hf.architecture or "", None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise PassError(
            f"config.json names {hf.architecture!r}, which is no model class of transformers "
            f"{transformers.__version__}: kquant rebuilds only transformers' own classes",
            reason=Reason.UnsupportedFormat,
        )
    _check_size(cls, folder, hf)
    try:
        model = cls.from_pretrained(
            str(folder),
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            attn_implementation="eager",
        )
    except Exception as exc:  # transformers raises many kinds; all mean "does not load"
        raise _failed(f"transformers could not load {hf.architecture}: {exc}") from exc
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # past key/values are outputs of another graph
    return model.float().eval()


# A config may describe more parameters than its weights hold (heads initialised fresh,
# buffers); past this many times the weights, and this many more, it describes another model.
PARAMETER_SLACK, PARAMETER_MARGIN = 2, 10_000_000


def _check_size(cls: Any, folder: Path, hf: HfFolder) -> None:
    """Raise PassError(CorruptModel) when config.json describes far more parameters than
    the safetensors files hold (counted on the ``meta`` device, which allocates nothing;
    the weights from their headers). A config's ``vocab_size: 2**33`` beside small weights
    made transformers allocate the whole model first and ended in MemoryLimitExceeded
    (hostile-input trial). A model that cannot be built on ``meta`` is not checked."""
    import torch
    from safetensors import safe_open

    try:
        config = cls.config_class.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            skeleton = cls(config)
        expected = sum(p.numel() for p in skeleton.parameters())
    except Exception:  # transformers' own load says what is wrong
        return
    stored = 0
    for name in hf.weights:
        if name.endswith(".safetensors"):
            with safe_open(str(folder / name), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                    stored += int(np.prod(f.get_slice(key).get_shape(), dtype=np.int64))
    if expected > PARAMETER_SLACK * stored + PARAMETER_MARGIN:
        raise PassError(
            f"config.json describes a {hf.architecture} of {expected} parameters, and its "
            f"safetensors weights hold {stored} values: the config and the weights are not of "
            "one model",
            reason=Reason.CorruptModel,
        )


def example_inputs(model: Any, length: int) -> dict[str, Any]:
    """Example inputs for the model's main input, batch 1: a waveform ``input_values`` (1,
    length) float32 of N(0, 0.1); ``input_ids`` (1, length) int64 below the vocabulary size
    with an all-ones ``attention_mask`` when forward takes one; ``pixel_values`` (1,
    channels, height, width) from ``image_size`` (one int, or [height, width]). Raises
    PassError(ConversionFailed) for another main input."""
    import torch

    name = model.main_input_name
    config = model.config
    gen = torch.Generator().manual_seed(length)
    if name == "input_values":
        return {name: torch.randn(1, length, generator=gen) * 0.1}
    if name == "input_ids":
        vocab = int(getattr(config, "vocab_size", 2) or 2)
        ids = torch.randint(0, vocab, (1, length), generator=gen)
        feeds = {name: ids}
        if "attention_mask" in inspect.signature(model.forward).parameters:
            feeds["attention_mask"] = torch.ones_like(ids)
        return feeds
    if name == "pixel_values":
        size = getattr(config, "image_size", 224)
        try:  # an int, or (height, width) as ViT configs may give it
            height, width = (size, size) if isinstance(size, int) else tuple(size)
            height, width = int(height), int(width)
            channels = int(getattr(config, "num_channels", 3))
        except (TypeError, ValueError, AttributeError):
            raise _failed(
                f"config.json's image_size {size!r} is neither an integer nor [height, width]"
            ) from None
        return {name: torch.randn(1, channels, height, width, generator=gen)}
    raise _failed(
        f"{type(model).__name__}'s main input is {name!r}: kquant makes example inputs for "
        "input_values (audio), input_ids (text) and pixel_values (images) only"
    )


def _run(model: Any, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        out = model(**feeds)
    return {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


def _dynamic_axes(
    feeds: tuple[dict[str, Any], dict[str, Any]],
    outs: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
) -> dict[str, dict[int, str]]:
    """Axis 0 of every tensor is the batch; any other axis whose size differs between the
    two examples is dynamic too."""
    axes: dict[str, dict[int, str]] = {}
    pairs = [(k, tuple(v.shape), tuple(feeds[1][k].shape)) for k, v in feeds[0].items()]
    pairs += [(k, v.shape, outs[1][k].shape) for k, v in outs[0].items()]
    for name, a, b in pairs:
        axes[name] = {0: "batch"}
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if i and x != y:
                axes[name][i] = f"{name}_{i}"
    return axes


class _Forward:
    """The model's forward with positional inputs and a tuple of named outputs, as the
    exporter wants it (built lazily: torch is imported inside the sandbox only)."""

    @staticmethod
    def wrap(model: Any, inputs: list[str], outputs: list[str]) -> Any:
        import torch

        class Forward(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *args: Any) -> tuple[Any, ...]:
                out = self.model(**dict(zip(inputs, args, strict=True)))
                return tuple(out[k] for k in outputs)

        return Forward().eval()


def export_onnx(folder: Path, hf: HfFolder, out: Path) -> dict[str, Any]:
    """Export the folder's model to ``out`` (FP32 ONNX) and check it against PyTorch on
    example inputs of two lengths (:data:`LENGTHS`; see the module docstring). Returns the
    report's ``export`` entry: architecture, inputs, outputs, opset, and per output the worst
    ``maxAbsError`` and lowest ``cosineSimilarity`` over both examples. Raises PassError
    (UnsupportedFormat, ConversionFailed)."""
    import torch

    model = load_model(folder, hf)
    lengths = LENGTHS.get(model.main_input_name, (1, 1))
    feeds = (example_inputs(model, lengths[0]), example_inputs(model, lengths[1]))
    refs = (_run(model, feeds[0]), _run(model, feeds[1]))
    inputs, outputs = list(feeds[0]), list(refs[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation and tracer notes, not our reader's
            torch.onnx.export(
                _Forward.wrap(model, inputs, outputs),
                tuple(feeds[0].values()),
                str(out),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=_dynamic_axes(feeds, refs),
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many kinds; all mean "no ONNX"
        raise _failed(f"torch.onnx.export of {hf.architecture} failed: {exc}") from exc
    fidelity = check_export(out, feeds, refs)
    return {
        "architecture": hf.architecture,
        "modelType": hf.model_type,
        "exporter": f"torch.onnx.export (TorchScript), torch {torch.__version__}",
        "opset": OPSET,
        "inputs": inputs,
        "outputs": outputs,
        "lengths": list(lengths),
        "fidelity": fidelity,
    }


def check_export(
    path: Path,
    feeds: tuple[dict[str, Any], ...],
    refs: tuple[dict[str, np.ndarray], ...],
) -> dict[str, dict[str, float]]:
    """Run the export with onnxruntime (CPU) on each example and compare with PyTorch's
    outputs. Returns per output ``{maxAbsError, cosineSimilarity}`` (worst over examples).
    Raises PassError(ConversionFailed) when an output breaks the bounds of the module
    docstring or the export does not run."""
    import onnxruntime as ort

    from kquant_job.validate.metrics import cosine

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = [
            dict(zip(refs[0], session.run(list(refs[0]), {k: v.numpy() for k, v in f.items()}),
                     strict=True))
            for f in feeds
        ]  # fmt: skip
    except Exception as exc:  # onnxruntime's errors have no common base
        raise _failed(f"the ONNX export does not run in onnxruntime: {exc}") from exc
    report: dict[str, dict[str, float]] = {}
    for name in refs[0]:
        worst_err, worst_cos = 0.0, 1.0
        for ref, out in zip(refs, got, strict=True):
            a, b = ref[name].astype(np.float64), out[name].astype(np.float64)
            if a.shape != b.shape:
                raise _failed(
                    f"the ONNX export's {name!r} has shape {b.shape}, PyTorch's {a.shape}"
                )
            err = float(np.abs(a - b).max()) if a.size else 0.0
            cos = cosine(a, b)
            if err > MAX_ERROR * max(1.0, float(np.abs(a).max())) or cos < MIN_COSINE:
                raise _failed(
                    f"the ONNX export differs from the PyTorch model on {name!r}: max abs "
                    f"error {err:.3g}, cosine {cos:.6f} (bounds: {MAX_ERROR:g} x max(1, "
                    f"max |x|), {MIN_COSINE})"
                )
            worst_err, worst_cos = max(worst_err, err), min(worst_cos, cos)
        report[name] = {"maxAbsError": worst_err, "cosineSimilarity": worst_cos}
    return report
