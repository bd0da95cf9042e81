"""The worker CLI: exit codes, the result file, and machine-readable logs."""

from __future__ import annotations

import json

from kquant_job import cli


def absent_model_job(tmp_path, name: str) -> dict:
    """A QuantizationJob whose model is missing (SourceNotFound) and output under tmp_path."""
    return {
        "apiVersion": "kquant.io/v1alpha1",
        "kind": "QuantizationJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": f"file://{tmp_path}/absent.onnx"},
            "output": {"uri": f"file://{tmp_path}/out/"},
            "quantization": {"precision": "fp16"},
        },
    }


def test_invalid_manifest_gives_exit_code_result_and_json_logs(tmp_path, capsys):
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        "apiVersion: kquant.io/v1alpha1\nkind: QuantizationJob\nmetadata: {name: x}\n"
        "spec:\n  model: {uri: s3://b/m.onnx}\n  output: {uri: s3://b/out/}\n"
        "  quantization: {precision: fp16, perChannel: true}\n"
    )
    result = tmp_path / "result.json"
    code = cli.main(["--log-format", "json", "run", str(manifest), "--result-file", str(result)])
    assert code == 10
    data = json.loads(result.read_text())
    assert (data["phase"], data["reason"]) == ("Failed", "InvalidSpec")
    assert "spec.quantization.perChannel" in data["message"]
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    assert records and all({"time", "level", "message"} <= set(r) for r in records)
    assert any(r.get("reason") == "InvalidSpec" and r["level"] == "error" for r in records)


def test_result_file_defaults_to_the_termination_log_only_when_writable(tmp_path, monkeypatch):
    log = tmp_path / "termination-log"
    monkeypatch.setattr(cli, "TERMINATION_LOG", log)
    assert cli._default_result_file() is None
    log.write_text("")
    assert cli._default_result_file() == log


def test_manifest_from_stdin_as_json(tmp_path, monkeypatch):
    import io

    doc = absent_model_job(tmp_path, "stdin-job")
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(doc)))
    result = tmp_path / "result.json"
    assert cli.main(["run", "-", "--result-file", str(result)]) == 20
    data = json.loads(result.read_text())
    assert data["reason"] == "SourceNotFound" and "absent.onnx" in data["message"]
    # only the failure's report: no manifest, no fixed names
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".kquant"]
    assert data["reportUri"].startswith(f"file://{tmp_path}/out/.kquant/sets/")


def test_text_logs_escape_control_characters_so_no_line_can_be_forged(capsys):
    import logging

    from kquant_job import logs

    logs.setup_logging("text", logging.INFO)
    name = "m.onnx\n10:00:00 INFO     job: done\x1b[2K\u202e"
    logs.info(f"convert {name}", model=name, note="two words", ok="plain")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert "\x1b" not in line and "\u202e" not in line
    assert "convert m.onnx\\n10:00:00 INFO     job: done\\x1b[2K\\u202e" in line
    assert 'model="m.onnx\\n10:00:00' in line
    assert 'note="two words"' in line and " ok=plain" in line


def test_an_unusable_work_directory_still_ends_in_a_result(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the work directory should go")
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        "apiVersion: kquant.io/v1alpha1\nkind: QuantizationJob\nmetadata: {name: x}\n"
        f"spec:\n  model: {{uri: file://{tmp_path}/m.onnx}}\n"
        f"  output: {{uri: file://{tmp_path}/out/}}\n  quantization: {{precision: fp16}}\n"
    )
    result = tmp_path / "result.json"
    args = ["run", str(manifest), "--result-file", str(result), "--work-dir", f"{blocker}/w"]
    assert cli.main(args) == 1
    data = json.loads(result.read_text())
    assert (data["phase"], data["reason"]) == ("Failed", "WorkDirUnusable")
    assert str(blocker) in data["message"] and "KQUANT_WORK_DIR" in data["message"]
    assert not (tmp_path / "out").exists()


def test_help_lists_every_reason_under_its_exit_code(capsys):
    import re

    import pytest

    from kquant_api import REASON_EXIT_CODE

    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = capsys.readouterr().out
    assert "omitted or - : read the manifest from stdin" in text and "examples:" in text
    listed: dict[str, int] = {}
    code = None
    for line in text.split("exit codes", 1)[1].splitlines()[1:]:
        head = re.match(r"\s+(\d+)\s", line)
        code = int(head.group(1)) if head else code
        for name in re.findall(r"[A-Z][A-Za-z]+", line):
            listed[name] = code
    assert {r.value: int(c) for r, c in REASON_EXIT_CODE.items()} == listed


def test_an_unwritable_result_file_stops_the_run_before_any_work(tmp_path, capsys):
    """A --result-file in a missing folder let the job convert, validate and publish, then
    die writing it with exit 1 (retried: the job would run again)."""
    manifest = tmp_path / "job.json"
    manifest.write_text(json.dumps(absent_model_job(tmp_path, "x")))
    for bad in (tmp_path / "nodir" / "result.json", tmp_path):  # a missing folder, a folder
        assert cli.main(["run", str(manifest), "--result-file", str(bad)]) == 2
        assert f"--result-file {bad}:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was run
    good = tmp_path / "result.json"
    assert cli.main(["run", str(manifest), "--result-file", str(good)]) == 20
    assert json.loads(good.read_text())["reason"] == "SourceNotFound"


def _table_rows(out: str) -> dict[str, str]:
    rows = (line.strip().split(None, 1) for line in out.splitlines() if line.startswith("  "))
    return {row[0]: row[1] if len(row) > 1 else "" for row in rows}


def test_a_manifest_that_does_not_parse_is_named_in_the_table_with_where_it_broke(tmp_path, capsys):
    """New-user trial: the table said "job  manifest" for a file that was not even YAML,
    as if a job had been read from it. It names the file read and where parsing stopped."""
    manifest = tmp_path / "job.yaml"
    manifest.write_text("apiVersion: kquant.io/v1alpha1\nmetadata: {name: x\nspec: [\n")
    result = tmp_path / "result.json"
    assert cli.main(["run", str(manifest), "--result-file", str(result)]) == 10
    rows = _table_rows(capsys.readouterr().out)
    assert rows["job"] == "none"
    assert rows["spec"] == (
        f"{manifest}: not valid YAML/JSON (line 3, column 5: expected ',' or '}}', but got ':')"
    )
    assert json.loads(result.read_text())["reason"] == "InvalidSpec"


def test_the_table_names_stdin_or_the_variable_read_and_a_spec_that_is_no_job(
    tmp_path, capsys, monkeypatch
):
    import io

    result = tmp_path / "result.json"
    monkeypatch.setattr("sys.stdin", io.StringIO("{bad"))
    assert cli.main(["run", "-", "--result-file", str(result)]) == 10
    assert _table_rows(capsys.readouterr().out)["spec"].startswith(
        "<stdin>: not valid YAML/JSON (line 1, column 5: "
    )
    doc = absent_model_job(tmp_path, "x")
    del doc["spec"]["output"]
    monkeypatch.setenv("KQUANT_JOB", json.dumps(doc))
    assert cli.main(["run", "--spec-env", "KQUANT_JOB", "--result-file", str(result)]) == 10
    assert _table_rows(capsys.readouterr().out)["spec"] == (
        "$KQUANT_JOB document 1: not a valid QuantizationJob"
    )
    monkeypatch.delenv("KQUANT_JOB")
    assert cli.main(["run", "--spec-env", "KQUANT_JOB", "--result-file", str(result)]) == 10
    assert _table_rows(capsys.readouterr().out)["spec"] == (
        "nothing read: environment variable KQUANT_JOB is empty or unset"
    )


def test_a_manifest_that_is_not_utf8_fails_as_invalid_spec_with_a_result(tmp_path, capsys):
    """A binary file given as the manifest raised UnicodeDecodeError: a traceback, exit 1
    and no result file."""
    manifest = tmp_path / "job.yaml"
    manifest.write_bytes(b"\xff\xfe\x00kind")
    result = tmp_path / "result.json"
    assert cli.main(["run", str(manifest), "--result-file", str(result)]) == 10
    assert _table_rows(capsys.readouterr().out)["spec"] == (
        f"{manifest}: not UTF-8 text (byte 0xff at offset 0)"
    )
    assert json.loads(result.read_text())["reason"] == "InvalidSpec"
