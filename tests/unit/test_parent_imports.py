"""The worker's parent process (fetch, sandbox launch, judging, publishing) never loads the
model stack: model libraries run only in the sandboxed child, and the parent starts fast
(importing onnx alone cost 0.9 s of a BERT-base job)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("onnx", "onnxruntime", "torch", "numpy", "transformers", "safetensors")
PARENT = (
    "kquant_job.cli",
    "kquant_job.pipeline",
    "kquant_job.pipeline_variants",
    "kquant_job.preview",
    "kquant_job.judge",
    "kquant_job.stage",
    "kquant_job.sets.publish",
)


def test_the_parent_modules_import_no_model_library():
    code = (
        "import importlib, json, sys\n"
        f"for name in {PARENT!r}: importlib.import_module(name)\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_the_check_sees_a_model_library_when_one_is_imported():
    code = "import sys, kquant_job.passes.onnx_common; print('onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_int8_pre_processing_runs_without_loading_torch(tmp_path):
    # onnxruntime.tools imports torch whenever it is installed; the INT8 pass keeps it out
    # (1.6 s and its memory per job) and leaves `import torch` working afterwards.
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import numpy as np, onnx\n"
        "from onnx import TensorProto, helper, numpy_helper\n"
        "from kquant_job.passes.int8_prepare import preprocess\n"
        "w = numpy_helper.from_array(np.ones((8, 8), np.float32), 'w')\n"
        "g = helper.make_graph([helper.make_node('MatMul', ['x', 'w'], ['y'])], 'g',\n"
        "    [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 8])],\n"
        "    [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 8])], [w])\n"
        f"src = Path({str(tmp_path)!r}) / 'm.onnx'\n"
        "ops = [helper.make_opsetid('', 17)]\n"
        "onnx.save(helper.make_model(g, ir_version=10, opset_imports=ops), str(src))\n"
        "out, details = preprocess(src, src.parent, external=False)\n"
        "loaded = 'torch' in sys.modules\n"
        "import torch\n"
        "print(details, out.exists(), loaded, torch.ones(1).item())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    details, exists, loaded, one = out.stdout.rsplit(" ", 3)
    assert details == "{'preprocess': 'applied'}"  # every step, symbolic shapes included
    assert (exists, loaded, one.strip()) == ("True", "False", "1.0")
