"""Publishing under faults, through the real worker process and moto's S3 server: kill -9 at
every stage then a rerun, storage cut mid-upload and mid-promotion (a loopback proxy that
drops connections), a short storage restart, concurrent writers (several trials, reported),
readers polling while sets are replaced, and generations out of order.

After each scenario the prefixes are read as a reader would (:func:`published.read_set`):
every listed object present with its sha256, every fixed name a whole copy, and no set
folder left that the manifest does not retain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import onnx
import psutil
import pytest
import yaml
from conftest import silero_dir
from faults import FaultProxy
from onnx import TensorProto, helper, numpy_helper
from published import Prefix, read_set, sha256
from worker_helpers import WorkerRun, manifest, run_worker

SILERO = "silero_vad_16k_op15.onnx"
GENERATED = {
    "inputs": {
        "input": {"shape": [1, 576]},
        "state": {"shape": [2, 1, 128], "value": 0},
        "sr": {"value": 16000},
    },
    "samples": 2,
}


@pytest.fixture
def client(s3_server):
    return s3_server.client()


@pytest.fixture
def source(client, bucket) -> str:
    client.upload_file(str(silero_dir() / SILERO), bucket, f"m/{SILERO}")
    return f"s3://{bucket}/m/{SILERO}"


def job_for(
    model: str,
    out: str,
    endpoint: str,
    *,
    name: str = "vad",
    promotion=None,
    generation: int | None = None,
    validation=GENERATED,
) -> dict:
    doc = manifest(
        model,
        out,
        {"precision": "fp16"},
        endpoint=endpoint,
        validation=validation,
        promotion=promotion,
        name=name,
    )
    doc["metadata"].update(namespace="speech", uid=f"uid-{name}")
    if generation is not None:
        doc["metadata"]["generation"] = generation
    return doc


def start(job: dict, folder: Path, env: dict[str, str]) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    cmd = [
        sys.executable,
        "-m",
        "kquant_job.cli",
        "run",
        str(folder / "job.yaml"),
        "--result-file",
        str(folder / "result.json"),
        "--work-dir",
        str(folder / "work"),
    ]
    return subprocess.Popen(
        cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )


def finish(proc: subprocess.Popen, folder: Path) -> WorkerRun:
    import json

    log = proc.stderr.read() if proc.stderr else ""
    code = proc.wait(timeout=300)
    result_file = folder / "result.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    return WorkerRun(code, result, log)


def kill_at(job: dict, folder: Path, env: dict[str, str], marker: str, nth: int = 1) -> bool:
    """Run the worker and SIGKILL it the moment its log shows ``marker`` for the ``nth``
    time; True when it did."""
    proc = start(job, folder, env)
    assert proc.stderr is not None
    for line in proc.stderr:
        if marker in line:
            nth -= 1
            if nth == 0:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
    proc.wait()
    return False


def prefix(client, uri: str) -> Prefix:
    return Prefix.of(uri, client)


def assert_clean(client, bucket: str, uri: str) -> dict:
    """The prefix holds one consistent set and nothing but the sets its manifest retains,
    failure reports in set folders of their own, and the killed run's unfinished set (its
    lease is not over: a run of the job may still be alive, so it stays until then; no
    reader sees it), and no unfinished upload."""
    import json

    p = prefix(client, uri)
    manifest_doc = read_set(p)
    retained = {h["set"] for h in manifest_doc["history"]}
    keys = [k.split("/", 3)[2:] for k in p.all_keys() if k.startswith(".kquant/sets/")]
    folders = {folder for folder, _ in keys}
    leased: set[str] = set()
    for folder in folders - retained:
        inside = sorted(rel for f, rel in keys if f == folder)
        marker = json.loads(p.get(f".kquant/sets/{folder}/set.json") or b"{}")
        if not marker and all(rel.endswith(".kquant-part") for rel in inside):
            leased.add(folder)  # killed while writing its marker: left within its lease
            continue
        if marker.get("state") == "writing":  # the killed run's, within its lease
            assert marker["job"]["name"] == manifest_doc["job"]["name"], marker
            leased.add(folder)
            continue
        assert (inside, marker.get("state")) == (["report.json", "set.json"], "failed"), inside
    if p.root is not None:  # local: no temporary file left
        assert not [k for k in p.all_keys() if k.endswith(".kquant-part")]
        return manifest_doc
    uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=p.key).get("Uploads", [])
    leased_keys = tuple(f"{p.key}.kquant/sets/{folder}/" for folder in leased)
    assert [u["Key"] for u in uploads if not u["Key"].startswith(leased_keys)] == []
    return manifest_doc


def no_sandbox_left(folder: Path, wait: float = 5.0) -> bool:
    """No process of ``folder``'s run is left within ``wait`` seconds: the kernel kills the
    sandboxed child when the worker dies (PDEATHSIG), and a process with a large address
    space takes a moment to go on a loaded machine."""
    deadline = time.monotonic() + wait
    while True:
        alive = [
            proc
            for proc in psutil.process_iter(["cmdline", "status"])
            if str(folder) in " ".join(proc.info["cmdline"] or [])
            and proc.info["status"] != psutil.STATUS_ZOMBIE
        ]
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


STAGES = [
    ("fetch: start", 1),
    ("sandbox: confined", 1),
    ("validate: start", 1),
    ("publish: start", 1),
    ("committing set", 1),  # the output's set uploaded, its manifest not yet written
    ("committed set", 1),  # the output's manifest written, fixed names not yet in step
    ("promote: start", 1),
    ("committing set", 2),  # the same two moments of the promotion
    ("committed set", 2),
]


@pytest.mark.parametrize(("marker", "nth"), STAGES)
def test_kill_at_any_stage_then_a_rerun_completes_without_clean_up(
    marker, nth, client, bucket, source, s3_server, worker_env, tmp_path
):
    out, prod = f"s3://{bucket}/out/", f"s3://{bucket}/prod/"
    job = job_for(source, out, s3_server.endpoint, promotion=prod)
    assert kill_at(job, tmp_path / "killed", worker_env, marker, nth), marker
    assert no_sandbox_left(tmp_path / "killed")  # the model stage died with the worker
    rerun = run_worker(job, tmp_path, worker_env)
    assert rerun.code == 0, rerun.log
    output = assert_clean(client, bucket, out)
    promoted = assert_clean(client, bucket, prod)
    assert promoted["artifacts"][0]["sha256"] == output["artifacts"][0]["sha256"]


@pytest.mark.parametrize(("marker", "nth"), [("committing set", 1), ("committed set", 2)])
def test_kill_then_rerun_on_local_storage(marker, nth, client, bucket, worker_env, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / SILERO).write_bytes((silero_dir() / SILERO).read_bytes())
    out, prod = f"file://{tmp_path}/out/", f"file://{tmp_path}/prod/"
    job = job_for(f"file://{tmp_path}/m/{SILERO}", out, "", promotion=prod)
    job["spec"].pop("storage", None)
    assert kill_at(job, tmp_path / "killed", worker_env, marker, nth), marker
    rerun = run_worker(job, tmp_path / "rerun", worker_env)
    assert rerun.code == 0, rerun.log
    assert_clean(client, bucket, out)
    assert_clean(client, bucket, prod)


def big_model(path: Path) -> Path:
    """A 17 MB MatMul chain: its FP16 copy (8.6 MB) goes up in two 5 MiB parts."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(3):
        inits.append(
            numpy_helper.from_array(
                rng.standard_normal((1200, 1200)).astype(np.float32) / 40, f"w{i}"
            )
        )
        out = "y" if i == 2 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"mm{i}"))
        prev = out
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "chain",
        [value("x", TensorProto.FLOAT, [1, 1200])],
        [value("y", TensorProto.FLOAT, [1, 1200])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return path


def test_a_storage_cut_mid_upload_leaves_nothing_a_rerun_does_not_finish(
    client, bucket, s3_server, worker_env, tmp_path
):
    client.upload_file(str(big_model(tmp_path / "chain.onnx")), bucket, "m/chain.onnx")
    up = urlparse(s3_server.endpoint)
    parts = {"KQUANT_S3_MULTIPART_THRESHOLD_MIB": "5", "KQUANT_S3_MULTIPART_CHUNKSIZE_MIB": "5"}
    validation = {"inputs": {"x": {"shape": [1, 1200]}}, "samples": 2}
    with FaultProxy(up.hostname, up.port) as proxy:
        job = job_for(
            f"s3://{bucket}/m/chain.onnx", f"s3://{bucket}/out/", proxy.url, validation=validation
        )
        # the second part of the model's multipart upload into the set folder
        proxy.cut_when(lambda chunk: chunk.startswith(b"PUT /") and b"partNumber=2" in chunk)
        cut = run_worker(job, tmp_path / "cut", {**worker_env, **parts})
        assert proxy.wait_cut(1), cut.log
        assert (cut.code, cut.result["reason"]) == (21, "StorageUnavailable"), cut.log
        assert "manifest.json" not in prefix(client, f"s3://{bucket}/out/").all_keys()
        left = client.list_multipart_uploads(Bucket=bucket, Prefix="out/").get("Uploads", [])
        assert len(left) == 1  # its abort could not get through either
        proxy.restore()
        rerun = run_worker(job, tmp_path / "rerun", {**worker_env, **parts})
        assert rerun.code == 0, rerun.log
        assert_clean(client, bucket, f"s3://{bucket}/out/")
        # The cut run's set and upload stay while its lease runs (that run might still be
        # alive, as far as the rerun can tell); once it is over, the next run removes them.
        p = prefix(client, f"s3://{bucket}/out/")
        kept = {h["set"] for h in read_set(p)["history"]}
        for key in p.all_keys():
            folder = key.split("/")[2] if key.startswith(".kquant/sets/") else None
            if folder and folder not in kept and key.endswith("/set.json"):
                marker = json.loads(p.get(key))
                if marker["state"] == "writing":
                    marker["startedAt"] = "2026-01-01T00:00:00Z"  # the lease long over
                    client.put_object(Bucket=bucket, Key=p.key + key, Body=json.dumps(marker))
        later = run_worker(job, tmp_path / "later", {**worker_env, **parts})
    assert later.code == 0, later.log
    assert "reclaimed" in later.log and "left by an earlier run" in later.log
    assert_clean(client, bucket, f"s3://{bucket}/out/")
    assert not client.list_multipart_uploads(Bucket=bucket, Prefix="out/").get("Uploads")
    sets = {k.split("/")[2] for k in prefix(client, f"s3://{bucket}/out/").all_keys()
            if k.startswith(".kquant/sets/")}  # fmt: skip
    assert sets == {h["set"] for h in read_set(prefix(client, f"s3://{bucket}/out/"))["history"]}


def test_a_kill_mid_multipart_copy_to_a_fixed_name_is_finished_by_the_rerun(
    client, bucket, s3_server, worker_env, tmp_path
):
    """SIGKILL while the committed set's model is copied to its fixed name in parts
    (CreateMultipartUpload done, no part copied): readers follow the manifest to a whole set
    and the fixed name is absent, never partial; the rerun puts it in step. The killed copy's
    upload is invisible at the name; S3 cannot tell kquant whether its writer lives, so a run
    aborts it once it is an hour old (TEMP_GRACE_SECONDS). moto lists every upload as
    initiated on 2010-11-10, so here the rerun already does."""
    client.upload_file(str(big_model(tmp_path / "chain.onnx")), bucket, "m/chain.onnx")
    up = urlparse(s3_server.endpoint)
    parts = {"KQUANT_S3_MULTIPART_THRESHOLD_MIB": "5", "KQUANT_S3_MULTIPART_CHUNKSIZE_MIB": "5"}
    env = {**worker_env, **parts}
    validation = {"inputs": {"x": {"shape": [1, 1200]}}, "samples": 2}
    fixed = f"PUT /{bucket}/out/chain_fp16.onnx?".encode()
    with FaultProxy(up.hostname, up.port) as proxy:
        job = job_for(
            f"s3://{bucket}/m/chain.onnx", f"s3://{bucket}/out/", proxy.url, validation=validation
        )
        proc = start(job, tmp_path / "killed", env)

        def first_part_copy(chunk: bytes) -> bool:
            if chunk.startswith(fixed) and b"x-amz-copy-source" in chunk.lower():
                os.kill(proc.pid, signal.SIGKILL)
                return True
            return False

        proxy.cut_when(first_part_copy)
        log = proc.stderr.read() if proc.stderr else ""
        assert proxy.wait_cut(1) and proc.wait(timeout=300) == -signal.SIGKILL, log
        out = prefix(client, f"s3://{bucket}/out/")
        committed = read_set(out, mirrors=False)  # committed before its copies: whole
        assert "chain_fp16.onnx" not in out.all_keys()  # absent, not partial
        [left] = client.list_multipart_uploads(Bucket=bucket, Prefix="out/")["Uploads"]
        assert left["Key"] == "out/chain_fp16.onnx"
        proxy.restore()
        rerun = run_worker(job, tmp_path / "rerun", env)
    assert rerun.code == 0, rerun.log
    manifest_doc = read_set(out)  # every fixed name a whole copy of the current set's file
    assert committed["set"] in {h["set"] for h in manifest_doc["history"]}
    assert "reclaimed unfinished upload chain_fp16.onnx" in rerun.log
    assert not client.list_multipart_uploads(Bucket=bucket, Prefix="out/").get("Uploads")


def test_a_storage_cut_mid_promotion_is_repromoted_by_the_rerun(
    client, bucket, source, s3_server, worker_env, tmp_path
):
    up = urlparse(s3_server.endpoint)
    out, prod = f"s3://{bucket}/out/", f"s3://{bucket}/prod/"
    with FaultProxy(up.hostname, up.port) as proxy:
        job = job_for(source, out, proxy.url, promotion=prod)
        commit = f"PUT /{bucket}/prod/manifest.json".encode()
        proxy.cut_when(lambda chunk: chunk.startswith(commit))
        cut = run_worker(job, tmp_path / "cut", worker_env)
        assert (cut.code, cut.result["reason"]) == (21, "StorageUnavailable"), cut.log
        assert prefix(client, prod).get("manifest.json") is None
        read_set(prefix(client, out))  # the output was complete before the promotion began
        proxy.restore()
        rerun = run_worker(job, tmp_path / "rerun", worker_env)
    assert rerun.code == 0, rerun.log
    assert_clean(client, bucket, out)
    assert_clean(client, bucket, prod)


def test_a_storage_cut_after_the_promotion_commit_is_a_success_with_a_note(
    client, bucket, source, s3_server, worker_env, tmp_path
):
    """Fault-injection trial: storage lost after the promotion's manifest switch (its fixed-
    name copies failing past the retry window) made the job Failed, not promoted, while the
    promotion's manifest named the new set: GitOps saw a failure for a live model."""
    up = urlparse(s3_server.endpoint)
    out, prod = f"s3://{bucket}/out/", f"s3://{bucket}/prod/"
    commit = f"PUT /{bucket}/prod/manifest.json".encode()
    copies = (f"PUT /{bucket}/prod/".encode(), f"POST /{bucket}/prod/".encode())
    committed = threading.Event()

    def after_the_commit(chunk: bytes) -> bool:
        if chunk.startswith(commit):
            committed.set()
            return False
        return committed.is_set() and chunk.startswith(copies)

    with FaultProxy(up.hostname, up.port) as proxy:
        job = job_for(source, out, proxy.url, promotion=prod)
        proxy.cut_when(after_the_commit)
        cut = run_worker(job, tmp_path / "cut", worker_env)
        assert cut.code == 0, cut.log
        assert (cut.result["phase"], cut.result["promotedUri"]) == ("Succeeded", prod)
        [note] = [n for n in cut.result.get("notes", []) if "not all in step" in n]
        assert note.startswith(prod)
        manifest = json.loads(prefix(client, prod).get("manifest.json"))
        assert manifest["set"]  # the promotion is committed
        proxy.restore()
        rerun = run_worker(job, tmp_path / "rerun", worker_env)
    assert rerun.code == 0, rerun.log
    assert_clean(client, bucket, prod)  # the rerun brought the fixed names in step


def test_a_short_storage_restart_is_ridden_out(
    client, bucket, source, s3_server, worker_env, tmp_path
):
    up = urlparse(s3_server.endpoint)
    with FaultProxy(up.hostname, up.port) as proxy:
        job = job_for(source, f"s3://{bucket}/out/", proxy.url)
        first_put = f"PUT /{bucket}/out/".encode()
        fired = threading.Event()

        def restart(chunk: bytes) -> bool:
            if chunk.startswith(first_put) and not fired.is_set():
                fired.set()
                threading.Timer(3.0, proxy.restore).start()  # down for 3 s, then back
                return True
            return False

        proxy.cut_when(restart)
        run = run_worker(job, tmp_path, {**worker_env, "KQUANT_S3_RETRY_SECONDS": "30"})
    assert fired.is_set()
    assert run.code == 0, run.log
    assert "storage unavailable, retrying" in run.log
    assert_clean(client, bucket, f"s3://{bucket}/out/")


TRIALS = int(os.environ.get("KQUANT_TEST_RACE_TRIALS", "5"))  # more, for a longer look


def race(jobs: list[dict], tmp_path: Path, env: dict[str, str]) -> list[WorkerRun]:
    procs = [(start(j, tmp_path / f"w{i}", env), tmp_path / f"w{i}") for i, j in enumerate(jobs)]
    return [finish(p, f) for p, f in procs]


@pytest.mark.parametrize("kind", ["s3", "file"])
def test_of_concurrent_writers_to_one_output_exactly_one_succeeds(
    kind, client, bucket, source, s3_server, worker_env, tmp_path, capsys
):
    if kind == "file":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / SILERO).write_bytes((silero_dir() / SILERO).read_bytes())
        source = f"file://{tmp_path}/m/{SILERO}"
    outcomes = []
    for trial in range(TRIALS):
        out = f"s3://{bucket}/race-{trial}/" if kind == "s3" else f"file://{tmp_path}/r{trial}/"
        jobs = [job_for(source, out, s3_server.endpoint, name=n) for n in ("a", "b")]
        runs = race(jobs, tmp_path / f"t{trial}", worker_env)
        codes = sorted(r.code for r in runs)
        assert codes == [0, 20], [r.log for r in runs]
        loser = next(r for r in runs if r.code)
        assert loser.result["reason"] in ("ConcurrentWrite", "OutputExists"), loser.result
        winner = next(r for r in runs if not r.code)
        published = assert_clean(client, bucket, out)
        assert published["artifacts"][0]["sha256"] == winner.result["artifacts"][0]["sha256"]
        outcomes.append(loser.result["reason"])
    with capsys.disabled():
        print(f"\n{TRIALS} output races ({kind}): one winner each; losers: {outcomes}")


def test_of_concurrent_promotions_exactly_one_lands(
    client, bucket, source, s3_server, worker_env, tmp_path, capsys
):
    outcomes = []
    for trial in range(TRIALS):
        prod = f"s3://{bucket}/prod-{trial}/"
        jobs = [
            job_for(
                source,
                f"s3://{bucket}/out-{trial}-{n}/",
                s3_server.endpoint,
                name=n,
                promotion=prod,
            )
            for n in ("a", "b")
        ]
        runs = race(jobs, tmp_path / f"t{trial}", worker_env)
        assert sorted(r.code for r in runs) == [0, 20], [r.log for r in runs]
        loser = next(r for r in runs if r.code)
        assert loser.result["reason"] == "ConcurrentWrite", loser.result
        promoted = assert_clean(client, bucket, prod)
        winner = next(j for j, r in zip(jobs, runs, strict=True) if not r.code)
        assert promoted["job"]["name"] == winner["metadata"]["name"]
        # the loser's output was published, and its result says so (it said "nothing")
        lost = next(j for j, r in zip(jobs, runs, strict=True) if r.code)
        out = lost["spec"]["output"]["uri"]
        assert loser.result["message"].startswith(f"the output was published ({out}"), loser.result
        assert loser.result["manifestUri"] == out + "manifest.json"
        mine = assert_clean(client, bucket, out)
        shas = {a["sha256"] for a in loser.result["artifacts"]}
        assert shas and shas <= {a["sha256"] for a in mine["artifacts"]}
        outcomes.append(loser.result["message"][:60])
    with capsys.disabled():
        print(f"\n{TRIALS} promotion races: one promoted set each")


def test_readers_never_see_a_mixed_set_while_sets_are_replaced(
    client, bucket, s3_server, worker_env, tmp_path, capsys
):
    variants = ["silero_vad.onnx", SILERO]  # two models published under one fixed name
    for i, v in enumerate(variants):
        client.upload_file(str(silero_dir() / v), bucket, f"src/{i}/silero_vad.onnx")
    prod = f"s3://{bucket}/prod/"
    reader = prefix(client, prod)
    stop, seen = threading.Event(), {"polls": 0, "mixed": 0, "missing": 0, "hashes": set()}
    started = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            if reader.get("manifest.json") is None:
                if started.is_set():
                    seen["missing"] += 1
                continue
            started.set()
            try:
                read_set(reader, mirrors=False)  # the manifest and what it lists agree
            except AssertionError:
                seen["mixed"] += 1
            data = reader.get("silero_vad_fp16.onnx")
            if data is None:  # absent only before the first set's copy lands
                seen["missing"] += bool(seen["hashes"])
            else:
                seen["hashes"].add(sha256(data))
            seen["polls"] += 1

    thread = threading.Thread(target=poll)
    thread.start()
    published = set()
    try:
        for gen in range(1, 6):
            job = job_for(
                f"s3://{bucket}/src/{gen % 2}/silero_vad.onnx",
                f"s3://{bucket}/out-{gen}/",
                s3_server.endpoint,
                promotion=prod,
                generation=gen,
            )
            run = run_worker(job, tmp_path / f"g{gen}", worker_env)
            assert run.code == 0, run.log
            published.add(run.result["artifacts"][0]["sha256"])
    finally:
        stop.set()
        thread.join()
    assert seen["mixed"] == 0 and seen["missing"] == 0, seen
    assert seen["polls"] > 20
    assert seen["hashes"] <= published  # every fixed-name read was a whole published file
    assert len(published) == 2
    manifest_doc = assert_clean(client, bucket, prod)
    assert len(manifest_doc["history"]) == 3  # the last sets stay for rollback
    with capsys.disabled():
        print(f"\nreader: {seen['polls']} polls during 5 promotions, 0 mixed, 0 missing")


def test_an_older_generation_never_replaces_a_newer_promotion(
    client, bucket, source, s3_server, worker_env, tmp_path
):
    prod = f"s3://{bucket}/prod/"
    new = job_for(source, f"s3://{bucket}/g2/", s3_server.endpoint, promotion=prod, generation=2)
    assert run_worker(new, tmp_path / "new", worker_env).code == 0
    before = prefix(client, prod).get("manifest.json")
    old = job_for(source, f"s3://{bucket}/g1/", s3_server.endpoint, promotion=prod, generation=1)
    run = run_worker(old, tmp_path / "old", worker_env)
    assert (run.code, run.result["reason"]) == (20, "Superseded"), run.log
    assert "generation 2" in run.result["message"]
    assert prefix(client, prod).get("manifest.json") == before
