"""The QuantizationJob spec (kquant.io/v1alpha1), typed once for the worker and the operator.

Field names follow Kubernetes (camelCase on the wire, ``spec``/``status``) and onnxruntime's
quantization vocabulary (``quantFormat``, ``weightType``, ``perChannel``...). Every model
rejects unknown fields, so a typo such as ``keepIOTypes`` fails loudly instead of being
ignored. Cross-field rules (int8 knobs only with int8, fp16 (ONNX) knobs only with fp16,
keepFp32 only with fp16/bf16, static-only knobs only with static mode) are checked here and
named in the error message.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from kquant_api.uris import find_overlaps, location, model_folder

API_VERSION = "kquant.io/v1alpha1"
KIND = "QuantizationJob"
URI_SCHEMES = ("s3://", "file://")


class _Model(BaseModel):
    """Base: camelCase aliases, unknown fields rejected, population by either name."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=False,
    )

    def wire(self) -> dict[str, Any]:
        """The object as it appears in YAML/JSON: camelCase keys, unset optionals omitted."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# An output URI ending like a model file: a person meant a file, kquant would make a folder.
MODEL_FILE_PATTERN = "[.](onnx|pt|pth|jit|ckpt|bin|safetensors)$"


def _check_uri(value: str, field: str, *, allow_plain_path: bool = True) -> str:
    if not value:
        raise ValueError(f"{field}: must not be empty")
    if "://" in value:
        if not value.startswith(URI_SCHEMES):
            scheme = value.split("://", 1)[0]
            raise ValueError(
                f"{field}: unsupported scheme {scheme!r} (expected one of {', '.join(URI_SCHEMES)})"
            )
        if value.startswith("s3://"):
            bucket = value[len("s3://") :].split("/", 1)[0]
            if not bucket:
                raise ValueError(f"{field}: {value!r} names no bucket")
    elif not allow_plain_path:
        raise ValueError(f"{field}: {value!r} has no scheme (s3:// or file://)")
    return value


class ModelFormat(str, Enum):
    """Serialized model format. ``auto`` detects it from the file content. ``transformers``:
    a Hugging Face folder (config.json naming a transformers class, safetensors weights),
    exported to ONNX before conversion; ``auto`` picks it for int8 and int4 on such a folder
    (those need the model's code), and keeps the safetensors cast for fp16 and bf16."""

    auto = "auto"
    onnx = "onnx"
    torchscript = "torchscript"
    pytorch = "pytorch"
    safetensors = "safetensors"
    transformers = "transformers"


class Precision(str, Enum):
    """Target numeric precision of the converted weights (and, for int8, activations).
    ``bf16`` (bfloat16: FP32's exponent range, 8-bit mantissa) applies to the PyTorch
    formats only; ONNX models convert to fp16, int8 or int4 (weight-only, MatMul weights)."""

    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"
    int4 = "int4"


class Int4Algorithm(str, Enum):
    """How int4 weights are rounded: ``rtn`` (round to nearest per block) or ``hqq``
    (Half-Quadratic Quantization: each block's scale and zero point optimized)."""

    rtn = "rtn"
    hqq = "hqq"


class FloatPrecision(str, Enum):
    """int4: the precision of everything but the 4-bit weights: fp32 (``q4``) or fp16
    (``q4f16``)."""

    fp32 = "fp32"
    fp16 = "fp16"


class Int8Mode(str, Enum):
    """INT8 quantization mode: ``dynamic`` (activations scaled at run time) or ``static``
    (activation ranges fixed from calibration data)."""

    dynamic = "dynamic"
    static = "static"


class QuantType(str, Enum):
    """onnxruntime's ``QuantType`` for weights and activations."""

    QInt8 = "QInt8"
    QUInt8 = "QUInt8"


class QuantFormat(str, Enum):
    """onnxruntime's ``QuantFormat``: QDQ (QuantizeLinear/DequantizeLinear pairs around
    float ops) or QOperator (integer operators such as QLinearConv)."""

    QDQ = "QDQ"
    QOperator = "QOperator"


class Preprocess(str, Enum):
    """Whether onnxruntime's quantization pre-processing runs before INT8."""

    auto = "auto"
    always = "always"
    never = "never"


class CalibrateMethod(str, Enum):
    """onnxruntime's ``CalibrationMethod`` used to pick activation ranges."""

    MinMax = "MinMax"
    Entropy = "Entropy"
    Percentile = "Percentile"


class Objective(str, Enum):
    """How the best passing variant is chosen: ``smallest`` (fewest bytes), ``fastest``
    (lowest median latency on the execution provider the job validates on) or
    ``mostAccurate`` (highest worst-output cosine similarity, then lowest mean abs error)."""

    smallest = "smallest"
    fastest = "fastest"
    mostAccurate = "mostAccurate"


# A variant's name: a file-name suffix (silero_vad_<name>.onnx), as transformers.js names its
# variants (fp16, q8, int8, q4, q4f16).
NAME_PATTERN = "^[a-z0-9][a-z0-9_]{0,31}$"


class ModelSource(_Model):
    uri: str = Field(
        description="Model location: s3://bucket/key for one object, s3://bucket/prefix/ "
        "(trailing slash) for a model directory, or file:// / a plain path for local runs."
    )
    format: ModelFormat = Field(
        ModelFormat.auto,
        description="Model format; auto detects it from the file content. transformers: a "
        "Hugging Face folder (config.json, safetensors weights) exported to ONNX first.",
    )

    @model_validator(mode="after")
    def _uri(self) -> ModelSource:
        _check_uri(self.uri, "spec.model.uri")
        return self


class OutputTarget(_Model):
    uri: str = Field(
        description="Output prefix (directory): the validated set goes into an immutable set "
        "folder under .kquant/sets/, manifest.json (pointing at it) is written last in one "
        "conditional write, and each file is also copied under its own name. Must not "
        "overlap the model, the validation or calibration data, or the promotion prefix."
    )
    overwrite: bool = Field(
        False,
        description="Replace the set kquant published here before (never objects kquant did "
        "not write). When false, a prefix holding another set or any object kquant did not "
        "write ends the job with reason OutputExists.",
    )
    besideOriginals: bool = Field(
        False,
        description="Write the converted models into the model's own folder, beside the "
        "originals, under new names only: silero_vad.onnx -> silero_vad_fp16.onnx; a folder "
        "holding a model with other files (config, tokenizer) -> <folder>_fp16/ with its "
        "other files copied. Nothing else there is touched; kquant's manifest and set folders "
        "go to .kquant/beside-<precision>/. output.uri must then be the model's folder "
        "(model.uri itself when it ends in '/', else the folder holding the file).",
    )

    @model_validator(mode="after")
    def _uri(self) -> OutputTarget:
        _check_uri(self.uri, "spec.output.uri")
        if re.search(MODEL_FILE_PATTERN, self.uri):
            raise ValueError(
                "spec.output.uri: names a model file, but an output is a prefix (kquant "
                f"would make {self.uri} a folder); end it with '/', or set besideOriginals: true "
                "to write silero_vad_fp16.onnx next to silero_vad.onnx"
            )
        return self


class SecretRef(_Model):
    name: str = Field(
        description="Secret in the job's namespace holding AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN)."
    )


class AddressingStyle(str, Enum):
    """botocore's S3 addressing style."""

    auto = "auto"
    path = "path"
    virtual = "virtual"


class StorageConfig(_Model):
    endpoint: str | None = Field(
        None,
        description="S3-compatible endpoint URL (MinIO, Ceph...); empty for AWS S3.",
    )
    region: str | None = Field(None, description="S3 region, e.g. us-east-1.")
    addressingStyle: AddressingStyle | None = Field(
        None,
        description="Bucket addressing: path (bucket in the path, what most S3-compatible "
        "stores need) or virtual (bucket in the host name). Default: path when an endpoint "
        "is set, else auto.",
    )
    verifyTls: bool = Field(True, description="Verify the endpoint's TLS certificate.")
    secretRef: SecretRef | None = Field(
        None,
        description="Credentials Secret. Without it the standard AWS credential chain is used "
        "(environment, profile, IRSA/workload identity, instance metadata).",
    )


class Calibration(_Model):
    uri: str = Field(
        description="Prefix (or file) of .npz calibration samples: one feed per file, array "
        "names equal to the model's input names."
    )
    calibrateMethod: CalibrateMethod = Field(
        CalibrateMethod.MinMax, description="How activation ranges are chosen."
    )
    samples: int = Field(
        100, ge=1, le=100_000, description="At most this many .npz files are used, in name order."
    )

    @model_validator(mode="after")
    def _uri(self) -> Calibration:
        _check_uri(self.uri, "spec.quantization.calibration.uri")
        return self


_INT8_FIELDS = (
    "mode",
    "extraOptions",
    "preprocess",
    "weightType",
    "activationType",
    "quantFormat",
    "perChannel",
    "reduceRange",
    "opTypesToQuantize",
    "nodesToExclude",
    "calibration",
)
_INT4_FIELDS = ("blockSize", "symmetric", "accuracyLevel", "algorithm", "floatPrecision")
_STATIC_FIELDS = ("activationType", "quantFormat", "calibration")
_FP16_FIELDS = ("keepIoTypes", "opBlockList", "replaceOpBlockList", "nodeBlockList", "repair")
_FLOAT_FIELDS = ("keepFp32",)  # fp16 and bf16
# Normalization statistics: BatchNorm's running variance routinely exceeds FP16's range
# (65504) or loses its small values, and they are a tiny share of a model's bytes.
DEFAULT_KEEP_FP32 = ("*.running_mean", "*.running_var")
# Model-directory files kept as they are unless named: CosyVoice's HiFi-GAN vocoder, which
# its users keep FP32 (its FP16 output degrades audio quality).
DEFAULT_EXCLUDE = ("hift.pt",)


class QuantizationConfig(_Model):
    precision: Precision = Field(
        description="Target precision: fp16, bf16 (PyTorch formats only), int8, or int4 "
        "(ONNX, weight-only: MatMul weights in 4 bits)."
    )
    name: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="The output names' suffix (silero_vad_<name>.onnx) and, in "
        "spec.variants, the variant's name (unique there). Default: the precision (fp16, "
        "bf16, int8); in spec.variants int8 static defaults to int8_static.",
    )
    # fp16 (ONNX)
    keepIoTypes: bool | None = Field(
        None,
        description="fp16: keep model inputs and outputs in FP32 (Cast nodes inserted at the "
        "edges), so callers need no change. Default true.",
    )
    opBlockList: list[str] | None = Field(
        None,
        description="fp16: operator types kept in FP32, added to the default list "
        "(onnxruntime's DEFAULT_OP_BLOCK_LIST plus the ops that must stay FP32), as the "
        "users' scripts append to it. Each must occur in the model.",
    )
    replaceOpBlockList: bool | None = Field(
        None,
        description="fp16: opBlockList replaces the default list instead of extending it "
        "(opBlockList: [] with this: block no op type). Default false.",
    )
    nodeBlockList: list[str] | None = Field(
        None, description="fp16: node names kept in FP32, in addition to opBlockList."
    )
    strict: bool | None = Field(
        None,
        description="Publish the requested configuration or nothing: no INT8 fallback "
        "(per-channel, dense ops only, output layers float) and no FP16 repair. Default "
        "false: a fallback or repair is published and said in the table, log and status.",
    )
    repair: bool | None = Field(
        None,
        description="fp16: when the converted model fails to load or exceeds the validation "
        "tolerance, block the offending op types or nodes and retry. Default true.",
    )
    # int8 (ONNX)
    mode: Int8Mode | None = Field(None, description="int8: dynamic (default) or static.")
    weightType: QuantType | None = Field(
        None, description="int8: weight type. Default QInt8 (QUInt8 is slower on x86)."
    )
    activationType: QuantType | None = Field(
        None, description="int8 static: activation type. Default QInt8."
    )
    quantFormat: QuantFormat | None = Field(
        None, description="int8 static: QDQ (default) or QOperator."
    )
    perChannel: bool | None = Field(
        None, description="int8: per-channel weight scales. Default false."
    )
    reduceRange: bool | None = Field(
        None,
        description="int8: 7-bit weights, for older x86 CPUs without VNNI. Default false.",
    )
    opTypesToQuantize: list[str] | None = Field(
        None, description="int8: only these op types are quantized (empty: all supported)."
    )
    nodesToExclude: list[str] | None = Field(None, description="int8: node names left in float.")
    extraOptions: dict[str, Any] | None = Field(
        None,
        description="int8: onnxruntime's extra_options, passed through (e.g. "
        "{WeightSymmetric: true, ActivationSymmetric: true, CalibMovingAverage: true}); each "
        "key must be one onnxruntime documents for the mode.",
    )
    preprocess: Preprocess | None = Field(
        None,
        description="int8: onnxruntime's quantization pre-processing (shape inference, graph "
        "optimization): auto (default: applied when it succeeds, the report says when it "
        "was skipped; dynamic INT8 of a model of 64 MiB of weights or more skips it where it "
        "cannot change the quantized nodes: no Conv, every weight already an initializer), "
        "always (a failure ends the job) or never.",
    )
    calibration: Calibration | None = Field(
        None, description="int8 static: calibration data (required in static mode)."
    )
    # int4 (ONNX, weight-only)
    blockSize: int | None = Field(
        None,
        ge=16,
        le=256,
        description="int4: weights per block along the reduction axis, a power of two "
        "(16...256). Default 32.",
    )
    symmetric: bool | None = Field(
        None, description="int4: symmetric blocks (no zero point). Default true."
    )
    accuracyLevel: int | None = Field(
        None,
        ge=0,
        le=4,
        description="int4: MatMulNBits' compute type for the activations: 0 unset, 1 fp32, "
        "2 fp16, 3 bf16, 4 int8 (faster on CPUs with integer dot products).",
    )
    algorithm: Int4Algorithm | None = Field(
        None, description="int4: rtn (default) or hqq. Neither needs calibration data."
    )
    floatPrecision: FloatPrecision | None = Field(
        None,
        description="int4: everything but the 4-bit weights in fp32 (default: variant "
        "name q4) or fp16 (q4f16: the fp16 conversion first).",
    )
    requireGain: bool | None = Field(
        None,
        description="Publish only a result that pays off: at most 0.9x the original's "
        "size, and (int8/int4) at most 1.2x its median latency on the execution provider "
        "the job validates on; otherwise the job ends with reason NoGain, saying what was "
        "measured. Default true; false publishes it with a note, and int8 then keeps Conv "
        "layers INT8 even where the conversion measured them slower (true leaves them float).",
    )
    # fp16 / bf16 (PyTorch formats)
    keepFp32: list[str] | None = Field(
        None,
        description="fp16/bf16: glob patterns of parameter/buffer names kept FP32, matched "
        "on the dotted name (e.g. encoder.0.norm.running_var) or any dotted suffix of it. "
        "PyTorch formats (state dicts, TorchScript, safetensors) default to normalization "
        "statistics, *.running_mean and *.running_var; [] casts every floating tensor. In "
        "TorchScript the other tensors of a module holding a kept tensor stay FP32 too, so "
        "its operators see one dtype. ONNX: only when set, initializers whose names match "
        "stay FP32 together with every node reading them (values beyond FP16's range are "
        "kept FP32 whatever this says).",
    )
    # model directories
    include: list[str] | None = Field(
        None,
        description="Glob patterns (relative to a model directory, or a file name) of the "
        "files to convert. Default: every file detected as a model. Other files are copied "
        "unchanged.",
    )
    exclude: list[str] | None = Field(
        None,
        description="Glob patterns of model files to copy unchanged (kept) instead of "
        "converting. Default: hift.pt (CosyVoice's vocoder stays FP32), unless an include "
        "pattern names the file literally (include: [hift.pt]); exclude: [] converts it too.",
    )

    @model_validator(mode="after")
    def _combinations(self) -> QuantizationConfig:
        given = {name for name in self.model_fields_set if getattr(self, name) is not None}
        precision = self.precision.value
        if self.precision is not Precision.int4:
            wrong = [f for f in _INT4_FIELDS if f in given]
            if wrong:
                raise ValueError(
                    f"spec.quantization.{wrong[0]}: int4 setting given with precision {precision}"
                )
        if self.blockSize is not None and self.blockSize & (self.blockSize - 1):
            raise ValueError(f"spec.quantization.blockSize: {self.blockSize} is not a power of two")
        if self.precision is not Precision.int8:
            wrong = [f for f in _INT8_FIELDS if f in given]
            if wrong:
                raise ValueError(
                    f"spec.quantization.{wrong[0]}: int8 setting given with precision "
                    f"{precision} (int8-only fields: {', '.join(wrong)})"
                )
        if self.precision is not Precision.fp16:
            wrong = [f for f in _FP16_FIELDS if f in given]
            if wrong:
                raise ValueError(
                    f"spec.quantization.{wrong[0]}: fp16 setting given with precision {precision}"
                )
        if self.strict and self.repair:
            raise ValueError(
                "spec.quantization.repair: repair true contradicts strict true (strict "
                "publishes the requested configuration only)"
            )
        if self.precision in (Precision.int8, Precision.int4):
            wrong = [f for f in _FLOAT_FIELDS if f in given]
            if wrong:
                raise ValueError(
                    f"spec.quantization.{wrong[0]}: fp16/bf16 setting given with precision "
                    f"{precision}"
                )
        if self.precision is Precision.int8:
            if self.int8_mode is Int8Mode.dynamic:
                wrong = [f for f in _STATIC_FIELDS if f in given]
                if wrong:
                    raise ValueError(
                        f"spec.quantization.{wrong[0]}: static-only setting given with mode "
                        "dynamic (set mode: static, or remove it)"
                    )
            elif self.calibration is None:
                raise ValueError(
                    "spec.quantization.calibration: required with mode static "
                    "(a prefix of .npz samples)"
                )
        return self

    @property
    def label(self) -> str:
        """The output names' suffix: ``name``, else the precision (int4: ``q4``, or
        ``q4f16`` with floatPrecision fp16, as transformers.js names them)."""
        if self.name:
            return self.name
        if self.precision is Precision.int4:
            return "q4f16" if self.floatPrecision is FloatPrecision.fp16 else "q4"
        return self.precision.value

    @property
    def int8_mode(self) -> Int8Mode:
        """The effective int8 mode (dynamic when unset)."""
        return self.mode or Int8Mode.dynamic

    @property
    def keep_fp32(self) -> list[str]:
        """The effective keepFp32 patterns (DEFAULT_KEEP_FP32 when unset)."""
        return list(DEFAULT_KEEP_FP32) if self.keepFp32 is None else list(self.keepFp32)


class DecisionKind(str, Enum):
    """How an output is read: ``threshold`` (value > threshold: speech / non-speech) or
    ``argmax`` (the index of the largest value along ``axis``: top-1 class, CTC token)."""

    threshold = "threshold"
    argmax = "argmax"


class DecisionRule(_Model):
    kind: DecisionKind = Field(DecisionKind.threshold, description="threshold or argmax.")
    threshold: float = Field(0.5, description="threshold: a value above it is positive.")
    axis: int = Field(-1, description="argmax: the axis of the classes.")
    minAgreement: float = Field(
        0.99, ge=0, le=1, description="Smallest share of decisions the models must agree on."
    )
    maxBoundaryShift: int | None = Field(
        None,
        ge=0,
        description="threshold: largest shift of a segment's start or end, in decisions "
        "(frames). The segment counts must match in any case.",
    )


class OutputKind(str, Enum):
    """What an output holds, as far as its default tolerance goes (:func:`output_kind`).
    ``embedding``: vectors compared with each other by cosine (retrieval, clustering, speaker
    verification), named as transformers and sentence-transformers name them."""

    embedding = "embedding"


_EMBEDDING_NAME = re.compile(
    r"(^|[._/])(last_hidden_state|pooler_output|sentence_embedding|token_embeddings"
    r"|text_embeds|image_embeds|embeds|embeddings?|\w+_embeddings?)$"
)


def output_kind(name: str) -> OutputKind | None:
    """The kind of an output from its name (case-insensitive), or None: ``embedding`` for
    ``last_hidden_state``, ``pooler_output``, ``sentence_embedding``, ``token_embeddings``,
    ``text_embeds``, ``image_embeds`` and names ending in ``embedding(s)``."""
    return OutputKind.embedding if _EMBEDDING_NAME.search(name.lower()) else None


class Bounds(_Model):
    """Bounds on the float error of an output (each unset bound is not checked)."""

    maxAbsError: float | None = Field(
        None, ge=0, description="Largest allowed |original - quantized| over every output value."
    )
    maxMeanAbsError: float | None = Field(
        None, ge=0, description="Largest allowed mean |original - quantized| per output."
    )
    minCosineSimilarity: float | None = Field(
        None, ge=-1, le=1, description="Smallest allowed cosine similarity per output."
    )


class KindBounds(_Model):
    """Bounds per output kind (:class:`OutputKind`)."""

    embedding: Bounds | None = Field(
        None,
        description="Outputs named last_hidden_state, pooler_output, sentence_embedding, "
        "token_embeddings, *_embeds, or ending in embedding(s).",
    )


class Tolerance(Bounds):
    outputs: dict[str, Bounds] | None = Field(
        None,
        description="Bounds for single outputs by name, replacing the top-level bounds they "
        "set for that output (e.g. {stateN: {maxMeanAbsError: 0.05}}).",
    )
    outputKinds: KindBounds | None = Field(
        None,
        description="Bounds for outputs of a kind, replacing the top-level bounds they set "
        "(outputs wins over outputKinds).",
    )
    decisions: dict[str, DecisionRule] | None = Field(
        None,
        description="Bounds on what consumers decide from outputs, by output name: e.g. "
        "{output: {threshold: 0.5, minAgreement: 0.99, maxBoundaryShift: 1}} for a VAD's "
        "speech decision and the segments it yields, {logits: {kind: argmax}} for a "
        "classifier's top-1 or a CTC model's token per frame. Used when validating, when "
        "choosing a variant and by the repair and fallback probes.",
    )

    def bounds_for(self, name: str) -> Bounds:
        """The float bounds that apply to output ``name``: the top-level ones, replaced
        field by field by those its kind sets in ``outputKinds``, then by ``outputs[name]``."""
        merged = {k: getattr(self, k) for k in Bounds.model_fields}
        kind = output_kind(name)
        layers = [getattr(self.outputKinds, kind.value) if kind and self.outputKinds else None]
        layers.append((self.outputs or {}).get(name))
        for layer in layers:
            if layer is not None:
                merged.update(layer.model_dump(exclude_none=True))
        return Bounds(**merged)


# Defaults by precision when spec.validation.tolerance is not given: relative and mean bounds,
# since an absolute max error scales with each output's magnitude (measured on Silero VAD FP16
# over a real speech stream: the LSTM state reaches |c| = 38, where one FP16 step is 0.03, so
# its max abs error is 0.17 while cosine stays above 0.99997 and mean abs error ~4e-3).
# INT8 error depends on the activation ranges, hence the looser bounds. BF16 keeps 8 mantissa
# bits to FP16's 11, so its rounding error is 8x FP16's (Silero VAD TorchScript over the speech
# fixture, state threaded: BF16 mean abs error 6.4e-3, cosine 0.99957; FP16 8e-4, 0.999994).
DEFAULT_TOLERANCE: dict[Precision, Tolerance] = {
    Precision.fp16: Tolerance(maxMeanAbsError=1e-2, minCosineSimilarity=0.999),
    Precision.bf16: Tolerance(maxMeanAbsError=3e-2, minCosineSimilarity=0.995),
    # Embeddings are compared with each other by cosine, so a displacement counts twice in
    # every similarity score: for unit vectors |e' - e| = sqrt(2 (1 - cos)), 0.20 at 0.98 and
    # 0.14 at 0.99. A text-embedding model at cosine 0.983 passed the plain INT8 bound; an
    # embedding output needs 0.99 (INT4's bound, and what FP16 clears on every corpus model).
    Precision.int8: Tolerance(
        maxMeanAbsError=5e-2,
        minCosineSimilarity=0.98,
        outputKinds=KindBounds(embedding=Bounds(minCosineSimilarity=0.99)),
    ),
    # 4-bit weights, float activations: measured on the corpus' transformer encoders (RTN,
    # blocks of 32) at cosine 0.994-0.999 and mean abs error 0.03-0.04 on unit-scale outputs.
    Precision.int4: Tolerance(maxMeanAbsError=1e-1, minCosineSimilarity=0.99),
}


def effective_tolerance(precision: Precision, given: Tolerance | None) -> Tolerance:
    """The tolerance a conversion to ``precision`` is held to: the precision's default
    (:data:`DEFAULT_TOLERANCE`) with every bound ``given`` sets replacing the default's,
    field by field. A bound ``given`` leaves unset keeps its default (a spec that only
    loosens ``maxAbsError`` still checks the default cosine and mean error: before, it
    dropped them and a model at cosine 0.08 passed); a bound set to null drops it; a
    top-level bound ``given`` sets also replaces that bound of the default's per-kind
    bounds (a spec's ``minCosineSimilarity`` applies to embedding outputs too, unless its own
    ``outputKinds`` says otherwise). ``outputs`` and ``decisions`` are ``given``'s."""
    default = DEFAULT_TOLERANCE[precision]
    if given is None:
        return default
    bound_names = set(Bounds.model_fields)
    chosen = {k for k in given.model_fields_set if k in bound_names}  # null included
    top = {k: getattr(default, k) for k in bound_names} | {k: getattr(given, k) for k in chosen}
    kinds: dict[str, dict[str, Any]] = {}
    for kind in KindBounds.model_fields:
        base = getattr(default.outputKinds, kind, None) if default.outputKinds else None
        merged = {k: v for k, v in (base.model_dump() if base else {}).items()
                  if v is not None and k not in chosen}  # fmt: skip
        own = getattr(given.outputKinds, kind, None) if given.outputKinds else None
        if own is not None:
            merged |= {k: getattr(own, k) for k in own.model_fields_set}
        if merged:
            kinds[kind] = merged
    return Tolerance(
        **top,
        outputs=given.outputs,
        outputKinds=KindBounds.model_validate(kinds) if kinds else None,
        decisions=given.decisions,
    )


class InputOverride(_Model):
    shape: list[int] | None = Field(
        None, description="Concrete shape for generated values of this input."
    )
    value: float | None = Field(
        None, description="Constant value for this input (e.g. a sample rate of 16000)."
    )
    low: float | None = Field(None, description="Lower bound of generated values.")
    high: float | None = Field(None, description="Upper bound (exclusive) of generated values.")


class ModelValidation(_Model):
    inputs: dict[str, InputOverride] = Field(
        default_factory=dict,
        description="Per-input shape or value overrides for this model (added to, and "
        "winning over, spec.validation.inputs).",
    )
    dimensions: dict[str, int] = Field(
        default_factory=dict,
        description="Symbolic dimensions for this model (added to spec.validation.dimensions).",
    )
    feedback: dict[str, str] | None = Field(
        None,
        description="Output -> input fed back between this model's samples (replaces "
        "spec.validation.feedback for it; {} turns it off).",
    )


class ValidationConfig(_Model):
    enabled: bool = Field(True, description="Compare the converted model with the original.")
    samples: int = Field(
        16, ge=1, le=10_000, description="Number of input samples (files or generated feeds)."
    )
    dataUri: str | None = Field(
        None,
        description="Prefix of .npz files (one feed per file, names = input names), used in "
        "name order; for a model directory, per-model sub-folders (see models). Without it, "
        "kquant finds inputs the original accepts (see the README: zero-config validation).",
    )
    dimensions: dict[str, int] = Field(
        default_factory=dict,
        description="Values for symbolic (dynamic) dimensions by name, e.g. {batch: 1}. "
        "Unlisted dynamic dimensions are found by trying sizes the original accepts.",
    )
    inputs: dict[str, InputOverride] = Field(
        default_factory=dict,
        description="Per-input shape or value overrides (they win over what kquant would choose).",
    )
    feedback: dict[str, str] = Field(
        default_factory=dict,
        description="Streaming models: output name -> input name fed back into the next "
        "sample (e.g. {stateN: state}); samples then run in order as one stream, each "
        "model threading its own state. Unset: found from the names (stateN -> state, "
        "hn -> h, present* -> past*) when kquant finds the inputs.",
    )

    def for_model(self, rel: str) -> ValidationConfig:
        """The validation config of the model file ``rel`` of a directory: the entries of
        :attr:`models` whose key is its path, its file name or a glob matching either,
        merged in key order over this one (inputs and dimensions added, feedback
        replaced)."""
        import fnmatch

        name = rel.rsplit("/", 1)[-1]
        inputs, dimensions, feedback = dict(self.inputs), dict(self.dimensions), self.feedback
        for key, own in self.models.items():
            if any(fnmatch.fnmatchcase(x, key) for x in (rel, name)):
                inputs.update(own.inputs)
                dimensions.update(own.dimensions)
                feedback = own.feedback if own.feedback is not None else feedback
        return self.model_copy(
            update={"inputs": inputs, "dimensions": dimensions, "feedback": feedback}
        )

    def feedback_field(self, rel: str) -> str:
        """The field that gives model file ``rel`` its feedback, for errors:
        ``spec.validation.models.<key>.feedback`` (the last matching entry that sets one, as
        :meth:`for_model` merges), else ``spec.validation.feedback``."""
        import fnmatch

        name = rel.rsplit("/", 1)[-1]
        field = "spec.validation.feedback"
        for key, own in self.models.items():
            if own.feedback is not None and any(fnmatch.fnmatchcase(x, key) for x in (rel, name)):
                field = f"spec.validation.models.{key}.feedback"
        return field

    seed: int = Field(0, description="Seed for generated inputs, so two runs agree.")
    models: dict[str, ModelValidation] = Field(
        default_factory=dict,
        description="A model directory: inputs, dimensions and feedback per model file, keyed "
        "by its path in the directory, its file name or a glob (e.g. {llm.onnx: {inputs: "
        "{input_ids: {shape: [1, 16]}}}}). Validation data per model: .npz files under "
        "<dataUri>/<model path>/; files at the top of dataUri serve every model without its "
        "own folder.",
    )
    tolerance: Tolerance | None = Field(
        None,
        description="Pass/fail bounds. Each bound left unset keeps the precision's default: "
        "fp16 maxMeanAbsError 1e-2 and minCosineSimilarity 0.999; bf16 3e-2 and 0.995; int8 "
        "5e-2 and 0.98 (embedding outputs 0.99); int4 1e-1 and 0.99. To relax a default, set "
        "it (e.g. minCosineSimilarity: -1 checks no cosine).",
    )
    latencyRuns: int = Field(
        20,
        ge=1,
        le=10_000,
        description="Timed runs per model at most (median reported, in ms); fewer when "
        "latencyPrecision or latencyBudgetMs is reached first.",
    )
    warmupRuns: int = Field(3, ge=0, le=1000, description="Untimed runs before timing.")
    latencyBudgetMs: float = Field(
        5000,
        gt=0,
        le=600_000,
        description="Wall time the timed runs of the original and the converted model may "
        "take together, per model file, ms: until latencyRuns runs each or until this is "
        "spent (at least one each); on a GPU the two run in alternation, on the CPU one after "
        "the other with half each; the result says how many it took.",
    )
    latencyPrecision: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Timing of a model stops early, after at least 10 runs, once its median "
        "is known to within this fraction (the half-width of the median's 95 % confidence "
        "interval, from the run times' order statistics); 0 always times latencyRuns runs "
        "(within latencyBudgetMs).",
    )

    @model_validator(mode="after")
    def _uri(self) -> ValidationConfig:
        if self.dataUri is not None:
            _check_uri(self.dataUri, "spec.validation.dataUri")
        return self


class PromotionConfig(_Model):
    uri: str = Field(
        description="Prefix that receives the validated set as a new set (the same layout as "
        "the output), replacing the set kquant promoted there before; untouched unless "
        "validation passed. An older generation of the job never replaces a newer one's."
    )

    @model_validator(mode="after")
    def _uri(self) -> PromotionConfig:
        _check_uri(self.uri, "spec.promotion.uri")
        return self


class Selection(_Model):
    objective: Objective = Field(
        Objective.smallest,
        description="Which passing variant is chosen (and promoted): smallest (default), "
        "fastest or mostAccurate.",
    )


MAX_VARIANTS = 8


class QuantizationJobSpec(_Model):
    model: ModelSource = Field(description="The source model.")
    output: OutputTarget = Field(description="Where the converted set is published.")
    storage: StorageConfig | None = Field(None, description="S3 connection settings.")
    quantization: QuantizationConfig | None = Field(
        None, description="What conversion to run (one; spec.variants for several)."
    )
    variants: list[QuantizationConfig] | None = Field(
        None,
        min_length=1,
        max_length=MAX_VARIANTS,
        description="Several candidate conversions instead of spec.quantization, each with "
        "its own knobs and name (e.g. [{precision: fp16}, {precision: int8}, {precision: "
        "int8, mode: static, calibration: ...}]): all are converted and validated on the "
        "same samples, each passing one is published under its own name "
        "(model_fp16.onnx, model_int8.onnx; a folder under <name>/), and the best by "
        "spec.selection is chosen and promoted.",
    )
    selection: Selection | None = Field(
        None, description="With spec.variants: how the best passing variant is chosen."
    )
    validation: ValidationConfig = Field(
        default_factory=ValidationConfig, description="How the result is checked."
    )
    promotion: PromotionConfig | None = Field(
        None, description="Copy the validated set to this prefix."
    )
    # Job placement: read by the operator, ignored by the worker.
    resources: dict[str, Any] | None = Field(
        None, description="Container resources (Kubernetes ResourceRequirements)."
    )
    queueName: str | None = Field(None, description="Kueue LocalQueue name.")
    image: str | None = Field(
        None,
        description="Worker image; default from the operator. Another image runs only when "
        "it matches the operator's allowed images (chart value worker.allowedImages), else "
        "the job fails as InvalidSpec.",
    )
    serviceAccountName: str | None = Field(
        None,
        description="Service account of the worker pod (IRSA / workload identity); it must "
        "match the operator's allowed service accounts (chart value "
        "worker.allowedServiceAccounts), else the job fails as InvalidSpec.",
    )
    nodeSelector: dict[str, str] | None = Field(None, description="Pod nodeSelector.")
    tolerations: list[dict[str, Any]] | None = Field(None, description="Pod tolerations.")
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity.")
    priorityClassName: str | None = Field(None, description="Pod priorityClassName.")
    activeDeadlineSeconds: int | None = Field(
        None, ge=1, description="Job deadline in seconds (default 7200)."
    )
    backoffLimit: int | None = Field(
        None, ge=0, description="Retries of the worker pod on retriable failures (default 1)."
    )

    @model_validator(mode="after")
    def _conversions(self) -> QuantizationJobSpec:
        if (self.quantization is None) == (self.variants is None):
            raise ValueError(
                "spec.quantization: give spec.quantization (one conversion) or spec.variants "
                "(several), exactly one of them"
            )
        if self.selection is not None and self.variants is None:
            raise ValueError("spec.selection: only with spec.variants")
        objective = self.selection.objective if self.selection else Objective.smallest
        if objective is not Objective.smallest and not self.validation.enabled:
            # it chose the smallest, saying "smallest passing" (variants trial)
            raise ValueError(
                f"spec.selection.objective: {objective.value} is measured by validation "
                "(latency, outputs compared), and spec.validation.enabled is false: choose "
                "smallest, or enable validation"
            )
        if self.variants is None:
            q = self.quantization
            if self.output.besideOriginals and q and q.name and q.name != q.precision.value:
                raise ValueError(
                    "spec.quantization.name: beside the originals the names end in _<precision>"
                    f" (_{q.precision.value}), which kquant recognises as its own outputs"
                )
            return self
        if self.output.besideOriginals:
            raise ValueError(
                "spec.variants: not supported with spec.output.besideOriginals (one "
                "conversion beside the originals per job)"
            )
        for variant in self.variants:
            if variant.name is None:
                static = (
                    variant.precision is Precision.int8 and variant.int8_mode is Int8Mode.static
                )
                variant.name = "int8_static" if static else variant.label
        names = [v.label for v in self.variants]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(
                f"spec.variants: the name {twice[0]!r} is given to more than one variant "
                "(set name: on each, e.g. int8_pc for a per-channel INT8)"
            )
        return self

    @property
    def conversions(self) -> list[QuantizationConfig]:
        """spec.variants, or [spec.quantization]."""
        if self.variants:
            return list(self.variants)
        assert self.quantization is not None
        return [self.quantization]

    @model_validator(mode="after")
    def _paths(self) -> QuantizationJobSpec:
        if self.promotion and not self.validation.enabled:
            raise ValueError(
                "spec.promotion: promotion copies only a validated set; it needs "
                "spec.validation.enabled: true"
            )
        allowed = set()
        if self.output.besideOriginals:
            folder = model_folder(self.model.uri)
            if location(self.output.uri) != location(folder):
                raise ValueError(
                    f"spec.output.uri: with besideOriginals the output is the model's own "
                    f"folder ({folder}), not {self.output.uri}"
                )
            allowed.add(("spec.output.uri", "spec.model.uri"))
        overlaps = find_overlaps(self.write_uris(), self.read_uris(), allowed)
        if overlaps:
            raise ValueError("; ".join(overlaps))
        return self

    def write_uris(self) -> dict[str, str]:
        """The prefixes this job writes under, by field: ``spec.output.uri`` and, when set,
        ``spec.promotion.uri``."""
        writes = {"spec.output.uri": self.output.uri}
        if self.promotion:
            writes["spec.promotion.uri"] = self.promotion.uri
        return writes

    def read_uris(self) -> dict[str, str]:
        """What this job reads, by field: the model and, when set, the validation and
        calibration data."""
        reads = {"spec.model.uri": self.model.uri}
        if self.validation.dataUri:
            reads["spec.validation.dataUri"] = self.validation.dataUri
        if self.quantization and self.quantization.calibration:
            reads["spec.quantization.calibration.uri"] = self.quantization.calibration.uri
        for i, variant in enumerate(self.variants or []):
            if variant.calibration:
                reads[f"spec.variants[{i}].calibration.uri"] = variant.calibration.uri
        return reads

    @property
    def tolerance(self) -> Tolerance:
        """The effective tolerance (:func:`effective_tolerance`): the precision's default,
        each bound the spec sets replacing the default's (the first variant's precision, for
        spec.variants: each variant runs as a job of its own)."""
        return effective_tolerance(self.conversions[0].precision, self.validation.tolerance)


class ObjectMeta(BaseModel):
    """Kubernetes ObjectMeta: the fields kquant reads; the rest are kept as given."""

    model_config = ConfigDict(extra="allow")

    name: str = Field("quantizationjob", description="Object name.")
    namespace: str | None = Field(None, description="Object namespace.")
    generation: int | None = Field(None, description="Spec generation set by the API server.")
    uid: str | None = Field(None, description="Object UID set by the API server.")
    labels: dict[str, str] | None = Field(None, description="Labels.")
    annotations: dict[str, str] | None = Field(None, description="Annotations.")


class QuantizationJob(_Model):
    apiVersion: Literal["kquant.io/v1alpha1"] = Field(description="kquant.io/v1alpha1.")
    kind: Literal["QuantizationJob"] = Field(description="QuantizationJob.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Object metadata.")
    spec: QuantizationJobSpec = Field(description="Desired conversion.")
    status: dict[str, Any] | None = Field(
        None, description="Written by the operator only; ignored on input."
    )


def format_validation_error(exc: ValidationError) -> str:
    """A pydantic error as one line per problem, ``field.path: message``, joined by '; '.

    Shared by the worker (InvalidSpec) and the operator (status reason InvalidSpec), so both
    name a bad field the same way. Our own validators already start with the field path.
    """
    lines = []
    for err in exc.errors():
        # list items as [i], as the messages of our own validators write them
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        path = path.removeprefix(".")
        msg = err["msg"].removeprefix("Value error, ")
        loc = list(err["loc"])
        at = loc.index("variants") + 1 if "variants" in loc else len(loc)
        if at < len(loc):  # a variant's own check names spec.quantization: say which one
            msg = msg.replace("spec.quantization.", f"spec.variants[{loc[at]}].", 1)
        lines.append(msg if msg.startswith("spec.") else f"{path}: {msg}")
    return "; ".join(lines)
