"""``kquant-job inspect`` and the printing of ``kquant-job run --dry-run``'s plan.

Both print for people by default; ``inspect --json`` prints the whole report as JSON (the
shape :func:`kquant_job.inspect_model.inspect_path` documents).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from kquant_api import REASON_EXIT_CODE
from kquant_api.spec import StorageConfig
from kquant_job.errors import KquantError
from kquant_job.logs import printable

LOG = logging.getLogger("kquant")
LARGEST = 10  # initializers / tensors listed by the human report

INSPECT_EXAMPLES = """examples:
  kquant-job inspect models/silero_vad.onnx                 signature, ops, weights, FP16 notes
  kquant-job inspect models/silero_vad.onnx --op-type Pad   the Pad nodes (index, name, inputs)
  kquant-job inspect models/silero_vad.onnx --name stft --json
  kquant-job inspect s3://models/SenseVoiceSmall/ --endpoint-url http://minio:9000
  kquant-job inspect models/silero_vad.jit                  forward's arguments, tensors
"""


def add_endpoint_argument(cmd: argparse.ArgumentParser) -> None:
    """``--endpoint-url``, the S3 endpoint of a command that reads or writes s3:// URIs."""
    cmd.add_argument(
        "--endpoint-url",
        default=os.environ.get("AWS_ENDPOINT_URL"),
        help="S3-compatible endpoint (default $AWS_ENDPOINT_URL); credentials come from the "
        "standard AWS chain",
    )


def add_inspect_parser(sub: Any) -> None:
    """Register the ``inspect`` sub-command."""
    cmd = sub.add_parser(
        "inspect",
        help="show what a model file or folder holds",
        description="Report on a model file or every model file of a folder (ONNX, "
        "TorchScript, PyTorch state dicts, safetensors), local or on S3: the I/O signature, "
        "op types, nodes, initializers, subgraphs, what an FP16 conversion keeps FP32 and "
        "why, whether it is already quantized; tensors and forward's signature for PyTorch "
        "files. The model is parsed in the sandbox, as a job would.",
        epilog=INSPECT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("uri", help="model file or folder: a path, file:// or s3:// URI")
    cmd.add_argument("--json", action="store_true", help="print the whole report as JSON")
    cmd.add_argument("--op-type", metavar="OP", help="list the nodes of this op type (exact)")
    cmd.add_argument("--name", metavar="TEXT", help="list the nodes whose name contains TEXT")
    cmd.add_argument("--nodes", action="store_true", help="list every node (up to 20000)")
    add_endpoint_argument(cmd)
    cmd.add_argument(
        "--work-dir",
        metavar="DIR",
        default=os.environ.get("KQUANT_WORK_DIR"),
        help="parent of the temporary folder the model is fetched into",
    )
    cmd.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Fetch, inspect and print; returns the exit code of the error class (0 on success)."""
    from kquant_job.cli import make_work_dir
    from kquant_job.preview import inspect_uri

    storage = StorageConfig(endpoint=args.endpoint_url) if args.endpoint_url else None
    uri = args.uri
    local = uri.removeprefix("file://") if not uri.startswith("s3://") else None
    if local and not uri.endswith("/") and Path(local).is_dir():
        uri += "/"  # a local folder, named as a person would (a job's spec must say '/')
    work = None
    try:
        work = make_work_dir(Path(args.work_dir) if args.work_dir else None)
        report = inspect_uri(uri, work, storage, args.op_type, args.name)
    except KquantError as exc:
        LOG.error("%s: %s", exc.reason.value, exc, extra={"fields": {"reason": exc.reason.value}})
        return int(REASON_EXIT_CODE[exc.reason])
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        show = bool(args.nodes or args.op_type or args.name)
        print("\n\n".join(format_model(m, show) for m in report["models"]))
        if report["otherFiles"]:
            print(f"\nother files (copied by a job): {', '.join(report['otherFiles'])}")
        if report.get("kquantFiles"):
            print(f"\nnot listed: {report['kquantFiles']} files under .kquant/, kquant's own set "
                  "folders (the names above hold copies of the current set's files)")  # fmt: skip
    return 0


def _shape(shape: list[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n:,} bytes"


def format_model(m: dict[str, Any], show_nodes: bool) -> str:
    """The human report of one model (one entry of ``inspect_path``'s ``models``)."""
    if m["format"] != "onnx":
        return _format_torch(m)
    opsets = ", ".join(f"{k} {v}" for k, v in m["opsets"].items())
    lines = [f"{m['file']}: ONNX (IR {m['irVersion']}, opsets {opsets}, {m['producer'] or '?'}), "
             f"{_mb(m['bytes'])}"]  # fmt: skip
    for kind in ("inputs", "outputs"):
        items = "; ".join(f"{i['name']} {i['type']} {_shape(i['shape'])}" for i in m[kind])
        lines.append(f"  {kind + ':':<10} {items}")
    ops = ", ".join(f"{k} {v}" for k, v in sorted(m["opTypes"].items(), key=lambda kv: -kv[1]))
    total = sum(m["opTypes"].values())
    lines.append(f"  {'ops:':<10} {total} nodes, {m['subgraphs']} subgraphs: {ops}")
    p = m["precision"]
    by = ", ".join(f"{k} {_mb(v)}" for k, v in p["bytesByDtype"].items())
    lines.append(f"  {'weights:':<10} {len(m['initializers'])} tensors ({by})")
    for t in sorted(m["initializers"], key=lambda t: -t["bytes"])[:LARGEST]:
        span = f" range [{t['min']:.4g}, {t['max']:.4g}]" if "min" in t else ""
        lines.append(f"    {t['name']} {t['dtype']} {_shape(t['shape'])} {_mb(t['bytes'])}{span}")
    lines.append(f"  {'precision:':<10} {_precision_line(p)}")
    lines.append(f"  {'FP16:':<10} {_fp16_line(m['fp16KeepsFp32'])}")
    if show_nodes:
        lines.append(f"  nodes ({m['nodesListed']} listed):")
        if not m["nodesListed"]:  # a misspelt op type, or a name that is not there
            lines.append(f"    no node matches; op types here: {', '.join(sorted(m['opTypes']))}")
        for n in m["nodes"]:
            where = "  (in a subgraph)" if n["inSubgraph"] else ""
            lines.append(f"    #{n['index']} {n['name'] or '(unnamed)'} {n['opType']} "
                         f"inputs: {', '.join(n['inputs'])}{where}")  # fmt: skip
    else:
        lines.append("  (list nodes with --op-type OP, --name TEXT or --nodes)")
    return "\n".join(map(printable, lines))  # names in a model are its author's text


def _precision_line(p: dict[str, Any]) -> str:
    if p["alreadyQuantized"]:
        ops = f" (ops: {', '.join(p['quantizedOps'])})" if p["quantizedOps"] else ""
        return f"already quantized{ops}: converting it again is not useful"
    if p["alreadyReduced"]:
        return (
            f"weights already {p['weights']}: FP16 gains nothing, and INT8 needs the FP32 "
            "original (onnxruntime's quantizers; a job ends in AlreadyQuantized)"
        )
    return f"weights {p['weights'] or 'none'}: not quantized"


def _fp16_line(keeps: dict[str, Any]) -> str:
    parts = [f"op types {', '.join(keeps['opTypes'])} stay FP32 (default opBlockList)"]
    if keeps["initializers"]:
        names = ", ".join(f"{k} ({v})" for k, v in list(keeps["initializers"].items())[:5])
        parts.append(f"initializers beyond FP16's range stay FP32: {names}")
    if not keeps["opTypes"]:
        parts = parts[1:]
    if not parts:
        return "everything converts (from the file alone; a run also measures activations)"
    return "; ".join(parts)


def _format_torch(m: dict[str, Any]) -> str:
    kind = {"torchscript": "TorchScript", "safetensors": "safetensors", "pytorch": "PyTorch"}
    lines = [f"{m['file']}: {kind.get(m['format'], m['format'])}, {_mb(m['bytes'])}"]
    if "forward" in m:
        args = ", ".join(f"{a['name']}: {a['type']}" + (" = default" if a["default"] else "")
                         for a in m["forward"])  # fmt: skip
        extra = " (has reset_states())" if m.get("resetStates") else ""
        lines.append(f"  {'forward:':<10} ({args}){extra}")
    by = ", ".join(f"{k} {v}" for k, v in m["tensorsByDtype"].items())
    size = sum(t["bytes"] for t in m["tensors"])
    lines.append(f"  {'tensors:':<10} {len(m['tensors'])} ({by}), {_mb(size)}")
    for t in sorted(m["tensors"], key=lambda t: -t["bytes"])[:LARGEST]:
        span = f" range [{t['min']:.4g}, {t['max']:.4g}]" if "min" in t else ""
        lines.append(f"    {t['name']} {t['dtype']} {_shape(t['shape'])} {_mb(t['bytes'])}{span}")
    lines.append(f"  {'precision:':<10} {_precision_line(m['precision'])}")
    return "\n".join(map(printable, lines))  # names in a model are its author's text


def format_plan(name: str, dry: dict[str, Any]) -> str:
    """The human form of a dry run (:func:`kquant_job.preview.dry_run`'s result)."""
    lines = [f"  job: {name} (dry run: nothing converted, nothing written)",
             f"  output: {dry['output']}"]  # fmt: skip
    if dry.get("promotion"):
        lines.append(f"  promotion: {dry['promotion']}")
    if dry.get("variants"):
        for label, plan in dry["variants"].items():
            lines.append(f"  variant {label}:")
            lines += _plan_lines(plan, "    ")
    else:
        lines += _plan_lines(dry["plan"], "  ")
    return "\n".join(map(printable, lines))  # names in a model are its author's text


def _plan_lines(plan: dict[str, Any], at: str) -> list[str]:
    lines = []
    for m in plan["models"]:
        lines.append(f"{at}convert {m['source']} ({m['format']}, {_mb(m['bytes'])}) -> "
                     f"{m['output']} with {m['pass']}")  # fmt: skip
        v = m["validation"]
        if m.get("refused"):
            lines.append(f"{at}  REFUSED ({m['refused']['reason']}): {m['refused']['message']}")
        elif v is None:
            lines.append(f"{at}  validation: off")
        elif isinstance(v["inputs"], dict):
            found = "; ".join(f"{k} {x}" for k, x in v["inputs"].items())
            lines.append(f"{at}  validation inputs (found by kquant): {found}")
        else:
            lines.append(f"{at}  validation inputs: {v['inputs']}")
    for rel, out in plan["copies"].items():
        lines.append(f"{at}copy {rel}" + (f" -> {out}" if out != rel else ""))
    for rel, kept in plan["kept"].items():
        where = f" (copied to {kept['output']})" if kept["output"] != rel else ""
        lines.append(f"{at}keep {rel} as it is{where}: {kept['why']}")
    why = plan.get("leftWhy") or {}  # model files kept by a pattern: each with its reason
    plain = [rel for rel in plan["left"] if rel not in why]
    if plain:
        lines.append(f"{at}leave alone: {', '.join(plain)}")
    lines += [f"{at}leave alone {rel}: {why[rel]}" for rel in plan["left"] if rel in why]
    for warning in plan["warnings"]:
        lines.append(f"{at}WARNING {warning}")
    return lines
