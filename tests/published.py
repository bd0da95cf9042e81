"""Reading what kquant published under a prefix, as a reader would, and checking it.

A :class:`Prefix` reads objects of a local directory or an S3 prefix. :func:`read_set`
follows ``manifest.json`` and checks every promise of the layout: each listed object exists
with the listed sha256 and size, and each fixed-name copy equals the set's file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Prefix:
    """A published prefix: a local directory (``root``) or ``bucket``/``key`` on S3."""

    root: Path | None = None
    client: Any = None
    bucket: str = ""
    key: str = ""

    @classmethod
    def of(cls, uri: str, client: Any = None) -> Prefix:
        """From an ``s3://`` URI (with a boto3 client) or a ``file://`` URI / path."""
        if uri.startswith("s3://"):
            bucket, _, key = uri[5:].partition("/")
            return cls(client=client, bucket=bucket, key=key.rstrip("/") + "/" if key else "")
        return cls(root=Path(uri.removeprefix("file://")))

    def get(self, rel: str) -> bytes | None:
        """The object's bytes, or None when absent."""
        if self.root is not None:
            path = self.root / rel
            return path.read_bytes() if path.is_file() else None
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key + rel)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def all_keys(self) -> list[str]:
        """Every object key below the prefix, relative to it, sorted (temporary files too)."""
        if self.root is not None:
            if not self.root.is_dir():
                return []
            files = (p for p in self.root.rglob("*") if p.is_file())
            return sorted(p.relative_to(self.root).as_posix() for p in files)
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.key
        )
        return sorted(o["Key"][len(self.key) :] for p in pages for o in p.get("Contents", []))

    def fixed_names(self) -> list[str]:
        """Keys outside kquant's own ``.kquant/`` folder."""
        return [k for k in self.all_keys() if not k.startswith(".kquant/")]


def read_set(prefix: Prefix, *, mirrors: bool = True, home: str = "") -> dict[str, Any]:
    """Follow the manifest (``manifest.json``, or ``<home>manifest.json`` on a prefix shared
    with the originals) and check the set: every artifact and the report exist at their
    ``path`` with the listed sha256 and size; with ``mirrors``, each fixed ``name`` holds the
    same bytes. Returns the manifest. Raises AssertionError naming what is wrong."""
    raw = prefix.get(f"{home}manifest.json")
    assert raw is not None, f"no {home}manifest.json"
    manifest = json.loads(raw)
    assert manifest["kind"] == "ModelManifest" and manifest["layout"] == 2
    sets = f"{home}sets/" if home else ".kquant/sets/"
    for entry in [*manifest["artifacts"], manifest["report"]]:
        data = prefix.get(entry["path"])
        assert data is not None, f"{entry['path']} listed but absent"
        assert entry["path"].startswith(f"{sets}{manifest['set']}/"), entry
        assert sha256(data) == entry["sha256"], f"{entry['path']}: sha256 differs"
        assert len(data) == entry["bytes"]
        if mirrors:
            assert prefix.get(entry["name"]) == data, f"{entry['name']}: copy differs"
    return manifest


def set_files(manifest: dict[str, Any]) -> list[str]:
    """The fixed names of a manifest's set, sorted (the report included)."""
    return sorted([a["name"] for a in manifest["artifacts"]] + [manifest["report"]["name"]])
