"""The FP32 reference pass, shared by the variants of one job.

Each variant runs in a sandboxed stage of its own; the first to validate a model writes what
its reference pass found (the validation feeds, the feedback and the inputs chosen, the
original's outputs on every feed, the activation ranges when it measured them, the device)
into a folder of its sandbox; the next variants read it from there (the work directory is
readable to every stage) instead of running discovery and the FP32 pass again.

Files: ``<key>.npz`` (arrays only, read with ``allow_pickle=False``) then ``<key>.json`` (the
rest, and the commit mark: written last, under a temporary name and renamed). ``key`` names
the model file, its size, the validation settings, the data files and the execution
providers, so a cache is never used for other inputs. A cache that does not load is ignored
(the pass runs again); so is a folder this stage may not write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kquant_api import ValidationConfig

LOG = logging.getLogger("kquant")

Arrays = list[dict[str, np.ndarray]]


@dataclass
class CachedReference:
    """What one reference pass found: ``feeds`` and ``outputs`` (one dict of arrays per
    sample), the validation config used (its ``feedback`` filled in), the inputs chosen
    (None with data files), ``ranges`` ({value: max |x|} or None), ``device``, and
    ``latency``: the original's latency block (median ms, runs) when the pass timed it."""

    feeds: Arrays
    outputs: Arrays
    cfg: ValidationConfig
    chosen: dict[str, Any] | None
    ranges: dict[str, float] | None
    device: str
    latency: tuple[float, int] | None = None


def cache_key(
    model: Path, cfg: ValidationConfig, data_files: list[Path], providers: list[str]
) -> str:
    """A name for the reference of ``model`` (its file name and size) on these validation
    settings, data files (names and sizes) and execution providers: 32 hex digits."""
    what = {
        "model": [model.name, model.stat().st_size],
        "validation": cfg.model_dump(mode="json"),
        "data": sorted([p.name, p.stat().st_size] for p in data_files),
        "providers": providers,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def save(folder: Path, key: str, ref: CachedReference) -> bool:
    """Write ``ref`` under ``folder/<key>``; False (logged) when the folder is not writable
    by this stage or the disk refuses."""
    arrays = {
        f"f{i}_{j}": a for i, feed in enumerate(ref.feeds) for j, a in enumerate(feed.values())
    }
    arrays |= {
        f"o{i}_{j}": a for i, out in enumerate(ref.outputs) for j, a in enumerate(out.values())
    }
    meta = {
        "feeds": [list(f) for f in ref.feeds],
        "outputs": [list(o) for o in ref.outputs],
        "cfg": ref.cfg.model_dump(mode="json"),
        "chosen": ref.chosen,
        "ranges": ref.ranges,
        "device": ref.device,
        "latency": list(ref.latency) if ref.latency is not None else None,
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.npz.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, folder / f"{key}.npz")
        tmp = folder / f".{key}.json.tmp"
        tmp.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp, folder / f"{key}.json")
    except OSError as exc:
        LOG.info("reference pass not shared", extra={"fields": {"error": str(exc)}})
        return False
    return True


def save_latency(folder: Path, key: str, latency: tuple[float, int]) -> None:
    """Add the original's latency block (median ms, runs), timed after the pass (by the
    first variant's validation when its pass was a range recorder), to the reference saved
    under ``folder/<key>``: the next variants then time only their own model (before, each
    timed the original again: 0.65 s of BERT-base's INT8 variant). Logged, not raised,
    when the reference is gone or the folder not writable."""
    path = folder / f"{key}.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        meta["latency"] = list(latency)
        tmp = folder / f".{key}.json.tmp"
        tmp.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp, path)
    except (OSError, ValueError) as exc:
        LOG.info("original's latency not shared", extra={"fields": {"error": str(exc)}})


def load(folder: Path, key: str) -> CachedReference | None:
    """The reference saved under ``folder/<key>``, or None when there is none or it does
    not load whole (then the pass runs again)."""
    meta_path, npz_path = folder / f"{key}.json", folder / f"{key}.npz"
    if not meta_path.is_file() or not npz_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        with np.load(npz_path, allow_pickle=False) as npz:
            feeds = [{n: npz[f"f{i}_{j}"] for j, n in enumerate(names)}
                     for i, names in enumerate(meta["feeds"])]  # fmt: skip
            outputs = [{n: npz[f"o{i}_{j}"] for j, n in enumerate(names)}
                       for i, names in enumerate(meta["outputs"])]  # fmt: skip
        ranges, latency = meta["ranges"], meta.get("latency")
        return CachedReference(
            feeds=feeds,
            outputs=outputs,
            cfg=ValidationConfig.model_validate(meta["cfg"]),
            chosen=meta["chosen"],
            ranges={str(k): float(v) for k, v in ranges.items()} if ranges is not None else None,
            device=str(meta["device"]),
            latency=(float(latency[0]), int(latency[1])) if latency is not None else None,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        LOG.warning("shared reference pass unreadable: running it again",
                    extra={"fields": {"error": str(exc)}})  # fmt: skip
        return None
