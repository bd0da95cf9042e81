"""The INT8 attempt loop keeps one candidate on disk at a time: the ladder's steps and node
recovery's candidates (one per ranked group, then the bisection's) leave the work directory
once probed. Before, a 100 MiB model that needed recovery kept them all: 36x its size on
disk against the budget's 5x (bench/bench_workdir.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from corpus import build_corpus

from kquant_api import QuantizationConfig
from kquant_job.passes import PassContext
from kquant_job.passes.base import ProbeResult
from kquant_job.passes.onnx_int8_dynamic import OnnxInt8DynamicPass


def test_recovery_keeps_one_candidate_on_disk_at_a_time(tmp_path: Path) -> None:
    model = tmp_path / "bert_tiny.onnx"
    shutil.copyfile(build_corpus()["bert_tiny"].path, model)
    work = tmp_path / "work"
    on_disk: list[list[str]] = []

    def probe(candidate: Path, **_: object) -> ProbeResult:
        found = sorted(str(p.relative_to(work)) for p in work.rglob("*.onnx"))
        on_disk.append([f for f in found if f != "preprocessed.onnx"])  # the FP32 copy
        graph = onnx.load(str(candidate), load_external_data=False).graph
        integer = sum(n.op_type in ("MatMulInteger", "ConvInteger") for n in graph.node)
        # every quantized node adds error; at most 3 of them pass: recovery must run
        error = 0.01 * integer
        ok = integer <= 3
        metrics = {"out": {"meanAbsError": error, "cosineSimilarity": 1.0 - error}}
        return ProbeResult(ok=ok, violations=[] if ok else ["too many"], metrics=metrics)

    ctx = PassContext(work_dir=work, probe=probe)
    work.mkdir()
    config = QuantizationConfig(precision="int8")
    result = OnnxInt8DynamicPass().run(model, config, tmp_path / "out" / "m.onnx", ctx)
    assert result.details["attempts"][-1]["attempt"] == "nodeRecovery"
    assert result.details["recovery"]["probes"] > 5  # ranking and bisection ran
    # the candidate probed, the best passing one so far, the ladder's last (the fallback)
    assert max(len(c) for c in on_disk) <= 3, max(on_disk, key=len)
    left = [p.name for p in work.rglob("*.onnx") if p.name != "preprocessed.onnx"]
    assert left == []  # the chosen one was moved to the output, the rest removed
    assert (tmp_path / "out" / "m.onnx").is_file()
