"""Arguments a TorchScript module's ``forward`` accepts, found without help.

A TorchScript file records argument names and types, not shapes or dtypes. Each tensor
argument is tried with shapes by its name (speech-like names: ``x``, ``input``, ``audio``,
``wav``... get 16 kHz speech frames of 16000, 8000, 576, 512... samples; names ending in ids,
tokens, mask... get int64 token ids in [0, 8), masks ones, of 16, 8, 4... tokens; others FP32
normal values in a few common shapes),
each number argument with a value by its name (``sr``: 16000 then 8000; other ints 1; floats
1.0), in order of preference, varying one choice at a time first, on the original module, up
to :data:`~kquant_job.validate.discover.MAX_TRIES` calls. The first call that returns fixes
them. ``spec.validation.inputs`` always wins; arguments with a default are left to it.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from kquant_api import ValidationConfig
from kquant_api.spec import InputOverride
from kquant_job.errors import InvalidSpec
from kquant_job.validate.discover import MAX_TRIES, SAMPLE_RATES, speech_clip

SPEECH_NAMES = {"x", "input", "inputs", "audio", "wav", "waveform", "speech", "samples", "signal"}
ID_NAMES = ("ids", "tokens", "token", "mask", "labels", "index", "indices")
SPEECH_SHAPES = ((1, 16000), (1, 8000), (1, 576), (1, 512), (1, 1024), (16000,), (1, 256))
OTHER_SHAPES = ((1, 16000), (1, 512), (1, 80, 100), (1, 3, 224, 224), (1, 16), (1, 128), (16,))
_SR_NAMES = {"sr", "sample_rate", "sampling_rate", "samplerate"}
TENSOR_TYPES = ("Tensor", "Optional[Tensor]")


def shape_hints(module: Any) -> tuple[tuple[int, ...], ...]:
    """Input shapes the module's weights suggest, from the first weight of each rank: a
    Linear, recurrent or embedding weight [out, in] -> (1, in), (1, 10, in), (2, in); a
    norm's [n] -> (1, n), (1, 10, n), (1, n, 100); a Conv1d weight [out, in, k] ->
    (1, in, 100), (1, in, 20), (1, in, 16000); a Conv2d weight [out, in, kh, kw] ->
    (1, in, 224, 224), (1, in, 32, 32), (1, in, 16, 16)."""
    hints: dict[int, tuple[tuple[int, ...], ...]] = {}
    for _, weight in module.named_parameters():
        dims = tuple(weight.shape)
        if len(dims) in hints or not 1 <= len(dims) <= 4:
            continue
        n = dims[0] if len(dims) == 1 else dims[1]
        hints[len(dims)] = {
            1: ((1, n), (1, 10, n), (1, n, 100)),
            2: ((1, n), (1, 10, n), (2, n)),
            3: ((1, n, 100), (1, n, 20), (1, n, 16000)),
            4: ((1, n, 224, 224), (1, n, 32, 32), (1, n, 16, 16)),
        }[len(dims)]
    return tuple(shape for group in hints.values() for shape in group)


def _options(
    name: str, type_: str, override: InputOverride | None, hints: tuple = ()
) -> tuple[Any, ...]:
    """What to try for one argument: shapes for a tensor (by its name, then the ``hints``
    of the module's first weight), values for a number."""
    if override is not None and type_ in TENSOR_TYPES and override.shape is not None:
        return (tuple(override.shape),)
    if override is not None and override.value is not None and type_ not in TENSOR_TYPES:
        cast = {"int": int, "bool": bool}.get(type_, float)
        return (cast(override.value),)
    if type_ in TENSOR_TYPES:
        if _ids(name):
            return ((1, 16), (1, 8), (1, 4), (1, 32), (16,))
        first = SPEECH_SHAPES if name.lower() in SPEECH_NAMES else ()
        return tuple(dict.fromkeys((*first, *hints, *OTHER_SHAPES)))
    if type_ == "int":
        return SAMPLE_RATES if name.lower() in _SR_NAMES else (1,)
    if type_ == "float":
        return (float(SAMPLE_RATES[0]),) if name.lower() in _SR_NAMES else (1.0,)
    if type_ == "bool":
        return (False, True)
    raise InvalidSpec(f"TorchScript input {name!r} of type {type_}: give dataUri")


def _ids(name: str) -> bool:
    """Token ids, masks and indices: integer tensors (TorchScript does not record dtypes)."""
    return name.lower().endswith(ID_NAMES)


def _tensor(
    name: str, shape: tuple[int, ...], override: InputOverride | None, rng: np.random.Generator,
    offset: int,
) -> np.ndarray:  # fmt: skip
    ov = override or InputOverride()
    if _ids(name):
        if ov.value is not None:
            return np.full(shape, int(ov.value), np.int64)
        if "mask" in name.lower() and ov.low is None and ov.high is None:
            return np.ones(shape, np.int64)
        low, high = int(ov.low or 0), int(8 if ov.high is None else ov.high)
        return rng.integers(low, high, size=shape).astype(np.int64)
    if ov.value is not None:
        return np.full(shape, ov.value, np.float32)
    if ov.low is not None or ov.high is not None:
        low, high = (-1.0 if ov.low is None else ov.low), (1.0 if ov.high is None else ov.high)
        return rng.uniform(low, high, size=shape).astype(np.float32)
    if name.lower() in SPEECH_NAMES:
        clip = speech_clip()
        idx = (offset + np.arange(int(np.prod(shape)))) % len(clip)
        return clip[idx].reshape(shape).astype(np.float32)
    return (rng.standard_normal(size=shape) * 0.5).astype(np.float32)


def _samples(
    arguments: list[tuple[str, str, bool]], choice: dict[str, Any], cfg: ValidationConfig,
    count: int,
) -> list[dict[str, Any]]:  # fmt: skip
    import torch

    rng = np.random.default_rng(cfg.seed)
    out, offset = [], 0
    for _ in range(count):
        sample: dict[str, Any] = {}
        for name, type_, _ in arguments:
            if name not in choice:
                continue
            if type_ in TENSOR_TYPES:
                array = _tensor(name, choice[name], cfg.inputs.get(name), rng, offset)
                sample[name] = torch.from_numpy(np.ascontiguousarray(array))
            else:
                sample[name] = choice[name]
        offset += max(
            (int(np.prod(v)) for k, v in choice.items() if isinstance(v, tuple)), default=0
        )
        out.append(sample)
    return out


def _describe(name: str, choice: Any) -> str:
    if not isinstance(choice, tuple):
        return f"value {choice}"
    if _ids(name):
        what = "ones (mask)" if "mask" in name.lower() else "ints [0, 8)"
    else:
        what = "speech (16 kHz clip)" if name.lower() in SPEECH_NAMES else "normal(0, 0.5)"
    return f"{list(choice)} {what}"


def discover_args(
    module: Any, arguments: list[tuple[str, str, bool]], cfg: ValidationConfig
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``cfg.samples`` keyword-argument dicts ``module.forward`` runs on, and what was chosen
    (``{"inputs": {arg: "shape or value"}, "tries": n}``).

    Raises InvalidSpec naming every argument, what was tried and the YAML to add when the
    module runs on none of them, or when an override names no argument."""
    import torch

    names = [n for n, _, _ in arguments]
    unknown = sorted(set(cfg.inputs) - set(names))
    if unknown:
        raise InvalidSpec(
            f"spec.validation.inputs.{unknown[0]}: forward has no such argument "
            f"(arguments: {', '.join(names)})"
        )
    wanted = [(n, t) for n, t, default in arguments if not default or n in cfg.inputs]
    hints = shape_hints(module)
    options = [_options(n, t, cfg.inputs.get(n), hints) for n, t in wanted]
    combos = sorted(
        itertools.product(*(range(len(o)) for o in options)),
        key=lambda idx: (sum(1 for i in idx if i), sum(idx)),
    )[:MAX_TRIES]
    tried = []
    for n, idx in enumerate(combos, start=1):
        choice = {
            name: options[j][i] for j, ((name, _), i) in enumerate(zip(wanted, idx, strict=True))
        }
        sample = _samples(arguments, choice, cfg, 1)[0]
        if module._c._has_method("reset_states"):
            module.reset_states()
        try:
            with torch.inference_mode():
                module(**sample)
        except Exception as exc:
            tried.append((choice, " ".join(str(exc).split())[-160:]))
            continue
        described = {k: _describe(k, v) for k, v in choice.items()}
        return _samples(arguments, choice, cfg, cfg.samples), {"inputs": described, "tries": n}
    shown = "\n".join(f"  - {c}: {e}" for c, e in tried[:6])
    hint = ["validation:", "  inputs:"]
    for name, type_ in wanted:
        first = _options(name, type_, cfg.inputs.get(name))[0]
        key = "shape" if type_ in TENSOR_TYPES else "value"
        hint.append(f"    {name}: {{{key}: {list(first) if key == 'shape' else first}}}")
    raise InvalidSpec(
        f"the original module runs on none of the {len(tried)} argument sets kquant tried:\n"
        f"{shown}\ngive the arguments it takes in the spec, e.g.\n" + "\n".join(hint)
    )
