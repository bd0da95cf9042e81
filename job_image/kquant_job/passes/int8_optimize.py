"""onnxruntime's quantization pre-processing of a model with external data, on files.

For a model whose weights are in a data file and whose symbolic shape inference fails (BERT
exports, Silero VAD), ``quant_pre_process(skip_symbolic_shape=True,
save_as_external_data=True)`` (onnxruntime 1.31, ``quantization/shape_inference.py``) does:

1. ``onnx.load`` of the whole model, weights included (kept to the end, used by nothing);
2. an onnxruntime session at ``ORT_ENABLE_BASIC`` writing the optimized model, its
   initializers in ``optimized.onnx.data``;
3. ``onnx.shape_inference.infer_shapes_path`` on that file;
4. ``onnx.load`` of the result with every weight, ``add_pre_process_metadata``, and
   ``onnx.save_model`` with external data to the output.

:func:`optimize_external` does steps 2 and 3 on files in the output's folder and step 4's
metadata on the graph alone: the weights go from the session to the output's data file and
never through Python. On BERT-base (417 MiB): 5.5 s and a peak of 1.1 GiB before, 1.4 s
and 0.5 GiB after. The output is the same model (``tests/unit/
test_int8_optimize.py`` compares nodes, value infos, metadata and every weight); only the
data file's layout differs (onnxruntime writes it). Used only with the onnxruntime
releases the test was run on (:func:`~kquant_job.passes.int8_shapes.verified_onnxruntime`).
"""

from __future__ import annotations

from pathlib import Path

from kquant_job.passes.onnx_common import data_file_for

__all__ = ["optimize_external"]

# The key quant_pre_process sets for the same case: where the session writes the weights.
_DATA_FILE_KEY = "session.optimized_model_external_initializers_file_name"


def optimize_external(model_in: Path, out: Path) -> None:
    """Write ``model_in`` (external data beside it) optimized at ``ORT_ENABLE_BASIC``, shapes
    inferred, with onnxruntime's pre-processing metadata, to ``out`` (weights in
    ``<out name>.data``), as ``quant_pre_process(model_in, out, skip_symbolic_shape=True,
    save_as_external_data=True, all_tensors_to_one_file=True)`` would. Raises what
    onnxruntime's session or ONNX shape inference raise; ``out`` is then absent."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    optimized = out.with_name(f".{out.name}.optimized")
    data_file_for(out).unlink(missing_ok=True)
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.add_session_config_entry(_DATA_FILE_KEY, data_file_for(out).name)
    try:
        # The session is dropped at once: only the file it writes is of use.
        onnxruntime.InferenceSession(str(model_in), options, providers=["CPUExecutionProvider"])
        onnx.shape_inference.infer_shapes_path(str(optimized), str(out))
        model = onnx.load(str(out), load_external_data=False)
        add_pre_process_metadata(model)
        onnx.save_model(model, str(out))  # the graph only: the references stay as they are
    except BaseException:
        out.unlink(missing_ok=True)
        data_file_for(out).unlink(missing_ok=True)
        raise
    finally:
        optimized.unlink(missing_ok=True)
