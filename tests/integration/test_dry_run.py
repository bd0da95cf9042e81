"""``kquant-job run --dry-run``: the plan, the same checks as a run, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from conftest import silero_dir
from torch_models import hostile_checkpoint, save_state_dict
from worker_helpers import manifest, run_worker


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def models_dir(tmp_path: Path) -> Path:
    """A CosyVoice-like folder: a TorchScript model, a state dict, the vocoder kept FP32 by
    default (hift.pt) and a config file."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(silero_dir() / "silero_vad.jit", folder / "vad.jit")
    save_state_dict(torch.nn.Linear(8, 8), folder / "llm.pt")
    save_state_dict(torch.nn.Linear(4, 4), folder / "hift.pt")
    (folder / "cosyvoice.yaml").write_text("sample_rate: 22050\n")
    return folder


def job(model: str, out: Path, **spec: object) -> dict:
    doc = manifest(model, f"file://{out}/", {"precision": "fp16"}, endpoint=None)
    doc["spec"].pop("validation")
    doc["spec"].update(spec)
    return doc


def test_a_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    folder = models_dir(tmp_path)
    before = tree(folder)
    out = tmp_path / "out"
    run = run_worker(job(f"file://{folder}/", out), tmp_path, extra_args=("--dry-run",))
    assert run.code == 0, run.log
    text = run.log
    assert "convert llm.pt (pytorch" in text and "-> llm.pt with" in text
    assert "convert vad.jit (torchscript" in text
    assert "keep hift.pt as it is" in text and "copy cosyvoice.yaml" in text
    # validation inputs chosen for the TorchScript model by running it, as a run would
    vad = text.split("convert vad.jit", 1)[1].split("\n  convert", 1)[0]
    assert "validation inputs (found by kquant): x [1, " in vad and "sr " in vad
    assert "validation inputs: none: weights are compared tensor by tensor" in text
    assert not out.exists() and tree(folder) == before
    assert not (tmp_path / "result.json").exists()  # a dry run has no result
    assert not list((tmp_path / "work").iterdir())  # its work directory is removed


def test_a_dry_run_of_an_invalid_spec_says_why_and_writes_no_result(tmp_path, silero_onnx):
    """New-user trial: a spec with an unknown field, run with --dry-run, wrote the result
    file a dry run never writes."""
    doc = job(f"file://{silero_onnx}", tmp_path / "out")
    doc["spec"]["quantization"]["keepIOType"] = True  # a typo of keepIOTypes
    run = run_worker(doc, tmp_path, extra_args=("--dry-run",))
    assert run.code == 10 and "InvalidSpec" in run.log and "keepIOType" in run.log, run.log
    assert not (tmp_path / "result.json").exists()


def test_a_single_file_plan_names_its_output(tmp_path, silero_onnx):
    out = tmp_path / "out"
    run = run_worker(job(f"file://{silero_onnx}", out), tmp_path, extra_args=("--dry-run",))
    assert run.code == 0, run.log
    assert "convert silero_vad.onnx (onnx" in run.log
    assert "-> silero_vad_fp16.onnx with onnx-fp16" in run.log
    assert "input [1, 576] speech (16 kHz clip)" in run.log
    assert not out.exists()


def test_a_dry_run_of_variants_plans_each(tmp_path, silero_onnx):
    out = tmp_path / "out"
    doc = job(f"file://{silero_onnx}", out)
    del doc["spec"]["quantization"]
    doc["spec"]["variants"] = [{"precision": "fp16"}, {"precision": "int8", "name": "q8"}]
    run = run_worker(doc, tmp_path, extra_args=("--dry-run",))
    assert run.code == 0, run.log
    fp16, q8 = run.log.split("  variant fp16:", 1)[1].split("  variant q8:", 1)
    assert "-> silero_vad_fp16.onnx with onnx-fp16" in fp16
    assert "-> silero_vad_q8.onnx with onnx-int8-dynamic" in q8
    assert "input [1, 576] speech (16 kHz clip)" in q8
    assert not out.exists()


def test_a_dry_run_fails_as_the_run_on_what_the_pass_refuses_and_lists_a_variants(
    tmp_path, silero_onnx
):
    """int4 of Silero VAD (Conv and LSTM weights, no MatMul on a constant weight): the dry
    run passed and the run failed (ConversionFailed). A variant's refusal is listed: the
    run goes on with the other variants."""
    out = tmp_path / "out"
    doc = job(f"file://{silero_onnx}", out)
    doc["spec"]["quantization"] = {"precision": "int4"}
    run = run_worker(doc, tmp_path, extra_args=("--dry-run",))
    assert run.code == 30 and "ConversionFailed" in run.log, run.log
    # Silero keeps its weights in Constant nodes: named, not "feed no weights" (trial)
    said = run.log.split("silero_vad.onnx has none (its weights feed ", 1)[1].split(")")[0]
    assert "Conv" in said and "LSTM" in said, run.log
    del doc["spec"]["quantization"]
    doc["spec"]["variants"] = [{"precision": "fp16"}, {"precision": "int4"}]
    run = run_worker(doc, tmp_path, extra_args=("--dry-run",))
    assert run.code == 0, run.log
    fp16, q4 = run.log.split("  variant fp16:", 1)[1].split("  variant q4:", 1)
    assert "REFUSED" not in fp16 and "validation inputs (found by kquant)" in fp16
    assert "REFUSED (ConversionFailed): int4 weight-only quantization replaces" in q4
    assert not out.exists()


def test_a_dry_run_refuses_what_the_run_would_refuse(tmp_path, silero_onnx):
    out = tmp_path / "out"
    out.mkdir()
    (out / "theirs.bin").write_bytes(b"someone else's")
    run = run_worker(job(f"file://{silero_onnx}", out), tmp_path, extra_args=("--dry-run",))
    assert run.code == 20 and "OutputExists" in run.log
    assert tree(out) == {"theirs.bin": b"someone else's"}

    spec = {"quantization": {"precision": "fp16", "opBlockList": ["NoSuchOp"]}}
    run = run_worker(job(f"file://{silero_onnx}", tmp_path / "o2", **spec), tmp_path,
                     extra_args=("--dry-run",))  # fmt: skip
    assert run.code == 10 and "NoSuchOp" in run.log and not (tmp_path / "o2").exists()

    run = run_worker(job(f"file://{tmp_path}/missing.onnx", tmp_path / "o3"), tmp_path,
                     extra_args=("--dry-run",))  # fmt: skip
    assert run.code == 20 and "SourceNotFound" in run.log


def test_a_variants_missing_calibration_fails_the_dry_run_and_the_run_before_converting(
    tmp_path, silero_onnx
):
    """Trial: the dry run exited 0, and the run converted and validated fp16 before failing
    on the static variant's calibration (SourceNotFound)."""
    out = tmp_path / "out"
    doc = job(f"file://{silero_onnx}", out)
    del doc["spec"]["quantization"]
    static = {"precision": "int8", "mode": "static", "name": "int8_static",
              "calibration": {"uri": f"file://{tmp_path}/no-such-calib/"}}  # fmt: skip
    doc["spec"]["variants"] = [{"precision": "fp16"}, static]
    for args in (("--dry-run",), ()):
        run = run_worker(doc, tmp_path, extra_args=args)
        assert run.code == 20 and "SourceNotFound" in run.log, run.log
        assert "spec.variants[1].calibration.uri: nothing at" in run.log
        assert "onnx-fp16" not in run.log  # nothing converted first
        # the dry run writes nothing; the run its failure report, in its own folder
        assert all(k.startswith(".kquant/") for k in tree(out)) if args == () else not out.exists()


def test_a_dry_run_refuses_a_pickle_the_run_refuses(tmp_path):
    """Hostile-input trial: a CosyVoice folder whose flow.pt runs code when unpickled passed
    the dry run (exit 0, "convert flow.pt"); the run refused it as UnsafeModel (exit 30)."""
    folder = models_dir(tmp_path)
    marker = tmp_path / "code-ran"
    hostile_checkpoint(folder / "flow.pt", marker)
    out = tmp_path / "out"
    run = run_worker(job(f"file://{folder}/", out), tmp_path, extra_args=("--dry-run",))
    assert run.code == 30 and "UnsafeModel: flow.pt: refused" in run.log, run.log
    assert not marker.exists() and not out.exists()


def test_a_dry_run_of_a_model_that_does_not_run_says_why(tmp_path, silero_onnx):
    spec = {"validation": {"inputs": {"input": {"shape": [1, 1]}}}}
    run = run_worker(job(f"file://{silero_onnx}", tmp_path / "out", **spec), tmp_path,
                     extra_args=("--dry-run",))  # fmt: skip
    assert run.code == 10 and "InvalidSpec" in run.log
    assert not (tmp_path / "out").exists()


def test_a_folder_with_its_own_manifest_is_refused_before_converting(tmp_path):
    """A model folder holding a manifest.json (or an earlier kquant output's .kquant/): the
    dry run planned to copy it and the run converted, then failed to publish. Both now refuse
    it while planning, naming the file."""
    folder = models_dir(tmp_path)
    (folder / "manifest.json").write_text('{"theirs": true}')
    before = tree(folder)
    for extra in (("--dry-run",), ()):
        out = tmp_path / f"out{len(extra)}"
        run = run_worker(job(f"file://{folder}/", out), tmp_path / f"w{len(extra)}",
                         extra_args=extra)  # fmt: skip
        assert run.code == 20 and "UnsafePath" in run.log, run.log
        assert "holds manifest.json" in run.log and "Move or rename" in run.log
        assert "convert: start" not in run.log  # refused while planning
        assert not list(out.rglob("*.onnx")) and not list(out.rglob("*.jit"))
    assert tree(folder) == before


def test_an_output_under_a_file_is_refused_before_converting(tmp_path, silero_onnx):
    """An output folder under a file passed the dry run (exit 0) and the run's preflight;
    the run converted and validated, then failed to publish as SourceNotFound, naming
    spec.model.uri. Both now refuse it first, naming spec.output.uri."""
    notes = tmp_path / "notes.txt"
    notes.write_text("a user's file")
    out = notes / "out"
    dry = run_worker(job(f"file://{silero_onnx}", out), tmp_path / "d", extra_args=("--dry-run",))
    assert dry.code == 10 and "spec.output.uri" in dry.log and "not a folder" in dry.log
    run = run_worker(job(f"file://{silero_onnx}", out), tmp_path / "r")
    assert run.code == 10 and run.result["reason"] == "InvalidSpec", run.log
    assert "spec.output.uri" in run.result["message"] and "convert " not in run.log
    assert notes.read_text() == "a user's file"


def test_a_foreign_file_at_a_promotion_name_is_refused_before_converting(tmp_path, silero_onnx):
    """A foreign file at a fixed name of the promotion prefix was found at the promote step:
    the job converted, validated and published the output, then ended in ForeignObject."""
    prod = tmp_path / "prod"
    prod.mkdir()
    (prod / "silero_vad_fp16.onnx").write_text("theirs")
    spec = job(f"file://{silero_onnx}", tmp_path / "out", promotion={"uri": f"file://{prod}/"})
    dry = run_worker(spec, tmp_path / "d", extra_args=("--dry-run",))
    assert dry.code == 20 and "ForeignObject" in dry.log and "spec.promotion.uri" in dry.log
    run = run_worker(spec, tmp_path / "r")
    assert run.result["reason"] == "ForeignObject" and "spec.promotion.uri" in run.result["message"]
    assert "convert " not in run.log and not (tmp_path / "out" / "manifest.json").exists()
    assert (prod / "silero_vad_fp16.onnx").read_text() == "theirs"


def test_an_excluded_file_beside_the_originals_is_listed_once_as_left_alone(tmp_path):
    """New-user trial: beside the originals, the excluded hift.pt was listed both as "keep
    hift.pt as it is (not published)" and under "leave alone". A file is in one category:
    left alone, with the pattern that kept it."""
    folder = models_dir(tmp_path)
    before = tree(folder)
    doc = job(f"file://{folder}/", folder)
    doc["spec"]["output"]["besideOriginals"] = True
    run = run_worker(doc, tmp_path, extra_args=("--dry-run",))
    assert run.code == 0, run.log
    plan = run.log.split("(dry run: nothing converted, nothing written)", 1)[1]
    lines = [line.strip() for line in plan.splitlines() if line.startswith("  ")]
    assert not [line for line in lines if line.startswith("keep ")], plan
    assert [line for line in lines if "hift.pt" in line] == [
        "leave alone hift.pt: excluded by default (CosyVoice's HiFi-GAN vocoder stays FP32, "
        "as its users keep it; exclude: [] converts it too)"
    ], plan
    assert "leave alone: cosyvoice.yaml" in lines, plan
    assert "-> llm_fp16.pt with" in plan and "-> vad_fp16.jit with" in plan
    assert tree(folder) == before
