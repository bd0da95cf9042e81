"""What a model file becomes before its pass, inside the sandboxed stage: a Hugging Face
folder's ONNX export (checked against PyTorch), or a copy of a large ONNX file with its
embedded weights moved to a data file, written back as one file after the pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kquant_api import ModelFormat, Precision
from kquant_job import logs
from kquant_job.formats import ModelFile
from kquant_job.passes.onnx_options import check_names


def spills(fmt: ModelFormat, cfg: Any, model: ModelFile, src: Path) -> bool:
    """Whether an FP16 or INT8 conversion first moves the model's embedded weights to a data
    file: an ONNX file past SPILL_BYTES without external data."""
    from kquant_job.passes.onnx_fp16 import SPILL_BYTES

    return (
        fmt is ModelFormat.onnx
        and cfg.precision in (Precision.fp16, Precision.int8)
        and not model.external
        and src.stat().st_size > SPILL_BYTES
    )


def embed_again(out_path: Path) -> None:
    """Put a converted model's weights back into its file when the pass wrote them to a data
    file only because its (spilled) input had one: the user gave one file and gets one
    file, unless it reaches protobuf's 2 GiB limit."""
    from kquant_job.passes.onnx_common import PROTOBUF_LIMIT, data_file_for, load_model, save_model

    data = data_file_for(out_path)
    if not data.exists() or out_path.stat().st_size + data.stat().st_size >= PROTOBUF_LIMIT:
        return
    save_model(load_model(out_path), out_path)  # loads the data, then removes its file
    data.unlink(missing_ok=True)


def spill(src: Path, folder: Path) -> Path:
    """A copy of the ONNX model ``src`` with its weights in a data file beside it, in
    ``folder``. Every later step (the reference session, the activation ranges, the FP16
    pass) then reads the weights from that file, tensor by tensor, instead of each holding
    the embedded copy (bench/bench_job.py; the figures are in the README). The move walks
    the file (:func:`~kquant_job.passes.onnx_spill.spill_weights`): it never holds the
    model nor any of its weights (the kernel copies them). Raises PassError(CorruptModel)
    for a file that is not a model."""
    from kquant_job.passes.onnx_spill import spill_weights

    logs.info(f"moving the embedded weights of {src.name} to a data file", bytes=src.stat().st_size)
    return spill_weights(src, folder / src.name)[0]


def pass_label(fmt: ModelFormat, name: str) -> str:
    """The pass's name, prefixed with the export for a Hugging Face folder."""
    return f"transformers_export+{name}" if fmt is ModelFormat.transformers else name


def export_folder(
    cfg: Any, root: Path, work: Path, timings: dict[str, float]
) -> tuple[Path, dict[str, Any]]:
    """Export the Hugging Face folder ``root`` to ``work/model.onnx`` (checked against
    PyTorch), and check the spec's op and node names against the export. Returns the export
    and its report entry. Raises PassError (UnsupportedFormat, ConversionFailed) and
    InvalidSpec."""
    from kquant_job.hf_folder import read_hf_folder
    from kquant_job.passes.transformers_export import export_onnx

    hf = read_hf_folder(root)
    assert hf is not None  # the plan took the folder as one
    onnx_path = work / "model.onnx"
    with logs.stage("export", timings, architecture=hf.architecture):
        export = export_onnx(root, hf, onnx_path)
    cosines = {k: round(v["cosineSimilarity"], 7) for k, v in export["fidelity"].items()}
    logs.info("the export matches PyTorch (cosine per output)", **cosines)
    check_names(cfg, [onnx_path])
    return onnx_path, export
