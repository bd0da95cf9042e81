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
