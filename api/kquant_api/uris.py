"""Where the URIs of a spec point, and which of them overlap.

A QuantizationJob reads ``model.uri``, ``validation.dataUri`` and
``quantization.calibration.uri`` and writes under ``output.uri`` and ``promotion.uri``. A write
prefix that contains, or lies inside, anything the job reads or another of its write
prefixes would let kquant's writes reach objects it must not touch (a promotion at a bucket
root next to the source model, an output one level above the model). Such specs are refused
before any work, by the worker and the operator alike.

The comparison is lexical: S3 keys are literal, so ``s3://b/m`` and ``s3://b/m/`` name one
prefix and ``s3://b/m2/`` is another; local paths are normalized (``.``/``..`` segments and
repeated slashes), and relative paths are compared only with relative ones (the worker, which
knows its directory, compares the resolved paths again).
"""

from __future__ import annotations

import posixpath
from typing import NamedTuple

READ_FIELDS = ("spec.model.uri", "spec.validation.dataUri", "spec.quantization.calibration.uri")
WRITE_FIELDS = ("spec.output.uri", "spec.promotion.uri")


class Location(NamedTuple):
    """A URI as (scheme, bucket or '' for local paths, path without trailing '/')."""

    scheme: str
    root: str
    path: str


def location(uri: str) -> Location:
    """The :class:`Location` of an ``s3://`` or ``file://`` URI or a plain path.

    S3 keys are kept as written (minus trailing slashes); local paths are normalized with
    :func:`posixpath.normpath` (``file://rel`` and ``rel`` stay relative, ``'.'`` for the
    current directory)."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        return Location("s3", bucket, key.rstrip("/"))
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return Location("file", "", posixpath.normpath(path or "."))


def _inside(inner: str, outer: str) -> bool:
    if outer in ("", "."):
        return True  # a bucket root, or the current directory against a relative path
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def overlaps(a: str, b: str) -> bool:
    """True when one of the URIs ``a`` and ``b`` equals, contains or lies inside the other
    (as prefixes: ``s3://b/m/`` contains ``s3://b/m/x.onnx``; ``s3://b/m2`` is apart from
    ``s3://b/m``). Different schemes or buckets never overlap; a relative local path is not
    compared with an absolute one."""
    la, lb = location(a), location(b)
    if (la.scheme, la.root) != (lb.scheme, lb.root):
        return False
    if la.scheme == "file" and la.path.startswith("/") != lb.path.startswith("/"):
        return False
    return _inside(la.path, lb.path) or _inside(lb.path, la.path)


def overlap_message(write_field: str, write_uri: str, other_field: str, other_uri: str) -> str:
    """The InvalidSpec message for an overlap (the CRD's CEL rule says its first part)."""
    what = "write" if other_field in WRITE_FIELDS else "read"
    hint = ""
    if write_field == "spec.output.uri" and other_field == "spec.model.uri":
        # the users' own recipe: outputs named _fp16 beside the originals
        hint = ", or set spec.output.besideOriginals: true to write beside the originals"
    return (
        f"{write_field}: overlaps {other_field} ({write_uri} and {other_uri}): kquant would "
        f"write where this job also {what}s; use prefixes that do not contain each other{hint}"
    )


def model_folder(uri: str) -> str:
    """The folder a model URI lies in, '/'-terminated: the URI itself when it names a prefix
    (ends in '/'), else its parent (``s3://b/m/vad.onnx`` -> ``s3://b/m/``)."""
    if uri.endswith("/"):
        return uri
    head, sep, _ = uri.rpartition("/")
    return head + "/" if sep else "./"


def find_overlaps(
    writes: dict[str, str],
    reads: dict[str, str],
    allowed: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset(),
) -> list[str]:
    """Messages for every overlap between a write URI and a read URI, and between two
    write URIs (named by the later one: promotion against output); fields map to URIs
    (absent fields left out); ``allowed`` pairs (write field, other field) are not checked
    (an output beside the originals shares the model's folder by design). Empty when none
    overlap."""
    found = []
    names = list(writes)
    for i, wf in enumerate(names):
        others = {**{n: writes[n] for n in names[:i]}, **reads}
        for of, ouri in others.items():
            if (wf, of) not in allowed and overlaps(writes[wf], ouri):
                found.append(overlap_message(wf, writes[wf], of, ouri))
    return found
