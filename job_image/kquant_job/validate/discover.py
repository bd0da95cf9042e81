"""Validation inputs a model accepts, found without help: zero-config validation.

Each input gets a *role* from its name, type and rank, and the role says what to feed and
which sizes to try for its dynamic dimensions:

============  ===============================================  =============================
role          recognised by                                    fed
============  ===============================================  =============================
sample rate   integer scalar named sr, sample_rate, ...        16000, then 8000
mask          integer or bool, name holds ``mask``             ones
token types   integer, name holds ``type`` or ``segment``      zeros
token ids     other integer tensors                            ints in [0, rows of the
                                                               embedding table they index),
                                                               else [0, 8)
state         float, named state, h, c, hidden, cache, past*   zeros (batch dims 1)
speech        float, rank 1 or 2, last dim dynamic or >= 256   real speech (the clip shipped
                                                               with kquant, 16 kHz), frames
                                                               of 16000, 8000, 576, 512...
features      float, rank 3                                    normal(0, 0.5); 100, 50, 16
                                                               frames
image         float, rank 4                                    normal(0, 0.5); 224, 64, 32
other         anything else                                    normal(0, 0.5) / ints [0, 8)
============  ===============================================  =============================

A batch axis (axis 0 of a tensor of rank >= 2, or a dimension named batch) is 1. Dimensions
sharing a symbolic name take one value. The candidates are tried in order of preference,
varying one choice at a time first, on the FP32 original (CPU provider), up to MAX_TRIES
runs; the first feed it runs on fixes the shapes. ``spec.validation.inputs`` (shape, value,
low/high) and ``dimensions`` always win over what is discovered. Outputs that carry a
recurrent state back (``stateN`` for ``state``, ``hn`` for ``h``, ``present*`` for
``past*``) are fed back between samples when the spec sets no ``feedback``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from kquant_api import ValidationConfig
from kquant_api.spec import InputOverride
from kquant_job.errors import ALLOCATION_FAILURE, InvalidSpec

Feed = dict[str, np.ndarray]
MAX_TRIES = 48
SPEECH_LENGTHS = (16000, 8000, 576, 512, 1024, 256)  # samples at 16 kHz
SEQUENCE_LENGTHS = (16, 8, 32, 128, 4, 1)
FRAME_COUNTS = (100, 50, 16, 200, 1)
IMAGE_SIZES = (224, 64, 32, 16)
OTHER_SIZES = (1, 16, 8, 32, 64, 128)
SAMPLE_RATES = (16000, 8000)
_SR_NAMES = {"sr", "sample_rate", "sampling_rate", "samplerate", "sample_rate_hz"}
_STATE = re.compile(r"^(state|states|h|c|h0|c0|hx|cx|hidden.*|cache.*|past.*|.*_state|mem.*)$")
_BATCH = re.compile(r"^(batch.*|n|bs|b|batch_size)$", re.IGNORECASE)


@dataclass(frozen=True)
class Slot:
    """One model input: name, dims as the runtime gives them (int, symbol or None), numpy
    dtype, its role, and the spec's override for it (if any)."""

    name: str
    dims: tuple[Any, ...]
    dtype: np.dtype
    role: str
    override: InputOverride | None = None


def role_of(name: str, dims: tuple[Any, ...], dtype: np.dtype) -> str:
    """The role of an input (see the module table)."""
    low = name.lower()
    if dtype.kind in "iu" and not dims and low in _SR_NAMES:
        return "sample rate"
    if dtype.kind in "iub" and "mask" in low:
        return "mask"
    if dtype.kind in "iu" and ("type" in low or "segment" in low):
        return "token types"
    if dtype.kind in "iu" and dims:
        return "token ids"
    if dtype.kind == "f" and _STATE.match(low):
        return "state"
    if dtype.kind == "f" and len(dims) in (1, 2):
        last = dims[-1]
        if not (isinstance(last, int) and 0 < last < 256):
            return "speech"
    if dtype.kind == "f" and len(dims) == 3:
        return "features"
    if dtype.kind == "f" and len(dims) == 4:
        return "image"
    return "other"


def _dynamic(d: Any) -> bool:
    return not (isinstance(d, int) and d > 0)


def _candidates(slot: Slot, axis: int) -> tuple[int, ...]:
    """Sizes to try for a dynamic dimension of ``slot``."""
    rank, dim = len(slot.dims), slot.dims[axis]
    if slot.role == "speech" and axis == rank - 1:
        return SPEECH_LENGTHS
    if slot.role in ("mask", "token types", "token ids") and axis == rank - 1:
        return SEQUENCE_LENGTHS
    if (axis == 0 and rank >= 2 and slot.role != "state") or (
        isinstance(dim, str) and _BATCH.match(dim)
    ):
        return (1,)
    if slot.role == "state":
        return (1,)
    if slot.role == "features":
        return FRAME_COUNTS if axis == rank - 1 else (80, 16, 128, 40, 1)
    if slot.role == "image":
        return (3, 1) if axis == 1 else IMAGE_SIZES
    return OTHER_SIZES


def embedding_rows(model: Any) -> dict[str, int]:
    """For integer graph inputs that index an embedding table (a Gather on an initializer),
    the table's row count: valid ids are [0, rows)."""
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    rows: dict[str, int] = {}
    inputs = {i.name for i in model.graph.input}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2:
            table, ids = node.input
            if ids in inputs and table in inits and inits[table]:
                rows[ids] = min(rows.get(ids, inits[table][0]), inits[table][0])
    return rows


@cache
def speech_clip() -> np.ndarray:
    """The speech clip shipped with kquant (espeak-ng, 16 kHz mono, 5.7 s), float32 in
    [-1, 1), from its first sound on (the leading silence cut)."""
    from kquant_job.audio import read_wav

    with resources.as_file(resources.files("kquant_job") / "data" / "speech_16k.wav") as path:
        samples, _ = read_wav(Path(path))
    voiced = np.flatnonzero(np.abs(samples) > 0.02)
    return samples[voiced[0] :] if len(voiced) else samples


class Plan:
    """A choice of sizes (one per symbol or unnamed dynamic dimension) and sample rate,
    turned into feeds."""

    def __init__(self, slots: list[Slot], sizes: dict[Any, int], rate: int, rows: dict) -> None:
        self.slots, self.sizes, self.rate, self.rows = slots, sizes, rate, rows

    def shape(self, slot: Slot) -> tuple[int, ...]:
        if slot.override is not None and slot.override.shape is not None:
            return tuple(slot.override.shape)
        return tuple(
            self.sizes[_key(slot, axis, d)] if _dynamic(d) else int(d)
            for axis, d in enumerate(slot.dims)
        )

    def feeds(self, count: int, seed: int) -> list[Feed]:
        """``count`` feeds; speech inputs get successive frames of the clip."""
        rng = np.random.default_rng(seed)
        speech = speech_clip() if any(s.role == "speech" for s in self.slots) else None
        out = []
        offset = 0  # seed 0 starts at the first sound; other seeds at another sound
        if speech is not None and seed:
            voiced = np.flatnonzero(np.abs(speech) > 0.02)
            offset = int(voiced[rng.integers(0, len(voiced))])
        for _ in range(count):
            feed = {}
            for slot in self.slots:
                shape = self.shape(slot)
                values = self._values(slot, shape, rng, speech, offset)
                feed[slot.name] = np.asarray(values, dtype=slot.dtype).reshape(shape)
            offset += max((self.shape(s)[-1] for s in self.slots if s.role == "speech"), default=0)
            out.append(feed)
        return out

    def _values(
        self, slot: Slot, shape: tuple[int, ...], rng: np.random.Generator,
        speech: np.ndarray | None, offset: int,
    ) -> np.ndarray:  # fmt: skip
        ov, dtype = slot.override or InputOverride(), slot.dtype
        if ov.value is not None:
            return np.full(shape, ov.value, dtype=dtype)
        if ov.low is None and ov.high is None:
            if slot.role == "sample rate":
                return np.full(shape, self.rate, dtype=dtype)
            if slot.role == "mask":
                return np.ones(shape, dtype=dtype)
            if slot.role in ("token types", "state"):
                return np.zeros(shape, dtype=dtype)
            if slot.role == "speech" and speech is not None:
                n = int(np.prod(shape))
                idx = (offset + np.arange(n)) % len(speech)
                return speech[idx].reshape(shape).astype(dtype)
        if dtype.kind == "b":
            return rng.random(size=shape) < 0.5
        if dtype.kind in "iu":
            high = self.rows.get(slot.name, 8) if ov.high is None else int(ov.high)
            return rng.integers(0 if ov.low is None else int(ov.low), high, size=shape).astype(
                dtype
            )
        if ov.low is not None or ov.high is not None:
            low = -1.0 if ov.low is None else ov.low
            high = 1.0 if ov.high is None else ov.high
            return rng.uniform(low, high, size=shape).astype(dtype)
        return (rng.standard_normal(size=shape) * 0.5).astype(dtype)

    def describe(self) -> dict[str, str]:
        """``{input: "shape, what"}`` for the report and the log."""
        out = {}
        for slot in self.slots:
            shape = list(self.shape(slot))
            ov = slot.override or InputOverride()
            if ov.value is not None:
                what = f"value {ov.value:g}"
            elif slot.role == "sample rate":
                what = f"sample rate {self.rate}"
            elif slot.role == "speech":
                what = "speech (16 kHz clip)"
            elif slot.role == "mask":
                what = "ones (mask)"
            elif slot.role in ("state", "token types"):
                what = f"zeros ({slot.role})"
            elif slot.dtype.kind == "b":
                what = "coin flips"
            elif slot.dtype.kind in "iu":
                what = f"ints [0, {self.rows.get(slot.name, 8)})"
            else:
                what = "normal(0, 0.5)"
            out[slot.name] = f"{shape} {what}" if shape else what
        return out


def _key(slot: Slot, axis: int, dim: Any) -> Any:
    return dim if isinstance(dim, str) and dim else (slot.name, axis)


def plans(slots: list[Slot], dimensions: dict[str, int], rows: dict) -> list[Plan]:
    """Every plan worth trying, best first: each variable (a symbol or an unnamed dynamic
    dimension, and the sample rate) takes its candidates in order, combinations with the
    fewest departures from the first choice first; at most MAX_TRIES."""
    variables: dict[Any, tuple[int, ...]] = {}
    for slot in slots:
        if slot.override is not None and slot.override.shape is not None:
            continue
        for axis, d in enumerate(slot.dims):
            if not _dynamic(d):
                continue
            key = _key(slot, axis, d)
            if isinstance(d, str) and d in dimensions:
                variables[key] = (int(dimensions[d]),)
            elif key not in variables:
                variables[key] = _candidates(slot, axis)
    rates = SAMPLE_RATES if any(s.role == "sample rate" for s in slots) else (16000,)
    keys = list(variables)
    choices = [variables[k] for k in keys] + [rates]
    combos = sorted(
        itertools.product(*(range(len(c)) for c in choices)),
        key=lambda idx: (sum(1 for i in idx if i), sum(idx)),
    )[:MAX_TRIES]
    return [
        Plan(slots, {k: choices[j][idx[j]] for j, k in enumerate(keys)}, rates[idx[-1]], rows)
        for idx in combos
    ]


def feedback_pairs(inputs: dict[str, tuple], outputs: dict[str, tuple]) -> dict[str, str]:
    """Outputs that carry a state back into an input of the same shape: ``stateN`` ->
    ``state``, ``hn``/``h_out`` -> ``h``, ``present.x`` -> ``past.x``. Shapes are the
    concrete ones of one run."""
    pairs = {}
    for name, shape in inputs.items():
        low = name.lower()
        if not _STATE.match(low):
            continue
        wanted = [f"{name}N", f"{name}n", f"{name}_out", f"{name}_next", f"{name}out"]
        if low.startswith("past"):
            wanted.append("present" + name[4:])
        for out in wanted:
            if out in outputs and outputs[out] == shape:
                pairs[out] = name
                break
    return pairs


def yaml_hint(slots: list[Slot], plan: Plan) -> str:
    """The ``validation:`` YAML a user can add, filled with the last shapes tried."""
    lines = ["validation:", "  inputs:"]
    for slot in slots:
        if slot.role == "sample rate":
            lines.append(f"    {slot.name}: {{value: {plan.rate}}}")
        else:
            lines.append(f"    {slot.name}: {{shape: {list(plan.shape(slot))}}}")
    return "\n".join(lines)


def check_overrides(slots: list[Slot]) -> None:
    """Refuse overrides that cannot fit: a shape of another rank or against a fixed
    dimension, a negative dimension, ``high`` not above ``low``. Raises InvalidSpec naming
    ``spec.validation.inputs.<name>``."""
    for slot in slots:
        ov = slot.override
        if ov is None:
            continue
        at = f"spec.validation.inputs.{slot.name}"
        if ov.shape is not None:
            fits = len(ov.shape) == len(slot.dims) and all(
                _dynamic(d) or d == s for d, s in zip(slot.dims, ov.shape, strict=True)
            )
            if not fits or any(s < 0 for s in ov.shape):
                dims = ["?" if _dynamic(d) else d for d in slot.dims]
                raise InvalidSpec(f"{at}.shape: {ov.shape} does not fit the model's input {dims}")
        if ov.low is not None and ov.high is not None and ov.high <= ov.low:
            raise InvalidSpec(f"{at}: high {ov.high} must exceed low {ov.low}")


def discover(
    session: Any, model: Any, cfg: ValidationConfig
) -> tuple[list[Feed], dict[str, str], dict[str, Any]]:
    """Feeds the FP32 ``session`` runs on (``cfg.samples`` of them), the feedback to use and
    what was chosen (``{"inputs": {...}, "tries": n, "feedback": {...}}``).

    ``model``: the ModelProto (its embedding tables bound token ids; None to skip). Raises
    InvalidSpec naming each input, the shapes and values tried and the YAML to add when
    the original runs on none of them, or when an override names no input."""
    from kquant_job.validate.inputs import numpy_dtype

    names = [i.name for i in session.get_inputs()]
    unknown = sorted(set(cfg.inputs) - set(names))
    if unknown:
        raise InvalidSpec(
            f"spec.validation.inputs.{unknown[0]}: the model has no such input "
            f"(inputs: {', '.join(names)})"
        )
    slots = []
    for i in session.get_inputs():
        dtype = numpy_dtype(i.type)
        dims = tuple(i.shape)
        role = role_of(i.name, dims, dtype)
        slots.append(Slot(i.name, dims, dtype, role, cfg.inputs.get(i.name)))
    check_overrides(slots)
    rows = embedding_rows(model) if model is not None else {}
    tried: list[str] = []
    errors: list[str] = []
    candidates = plans(slots, cfg.dimensions, rows)
    quiet = _quiet_run_options()
    for n, plan in enumerate(candidates, start=1):
        feed = plan.feeds(1, cfg.seed)[0]
        try:
            outputs = session.run(None, feed, quiet)
        except Exception as exc:
            if ALLOCATION_FAILURE.search(str(exc)):
                raise  # the sandbox's memory limit, not these inputs (MemoryLimitExceeded)
            tried.append("; ".join(f"{k} {v}" for k, v in plan.describe().items()))
            errors.append(" ".join(str(exc).split())[:200])
            continue
        out_shapes = {
            o.name: tuple(np.shape(a)) for o, a in zip(session.get_outputs(), outputs, strict=True)
        }
        feedback = dict(cfg.feedback) or feedback_pairs(
            {k: tuple(v.shape) for k, v in feed.items()}, out_shapes
        )
        chosen = {"inputs": plan.describe(), "tries": n, "feedback": feedback}
        return plan.feeds(cfg.samples, cfg.seed), feedback, chosen
    shown = "\n".join(f"  - {t}: {e}" for t, e in list(zip(tried, errors, strict=True))[:6])
    raise InvalidSpec(
        f"the original model runs on none of the {len(tried)} inputs kquant tried:\n{shown}\n"
        "give the inputs it takes in the spec, e.g.\n" + yaml_hint(slots, candidates[0])
    )


def _quiet_run_options() -> Any:
    """Run options that keep onnxruntime from logging a failed trial's kernel errors: a
    refused trial is expected, and its error is kept in the InvalidSpec if all fail."""
    import onnxruntime as ort

    opts = ort.RunOptions()
    opts.log_severity_level = 4  # fatal only
    return opts
