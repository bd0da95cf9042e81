"""Audio helpers that turn a WAV file into validation or calibration feeds for streaming
speech models (Silero VAD: 16 kHz, 512-sample windows, inputs ``input``/``state``/``sr``,
outputs ``output``/``stateN``).

Typical use::

    samples, sr = read_wav(Path("speech_16k.wav"))
    feeds = frame_feeds(samples, 512, "input", context=64,
                        extra={"state": np.zeros((2, 1, 128), np.float32),
                               "sr": np.array(sr, np.int64)})
    feeds = thread_state(model, feeds, {"stateN": "state"})   # realistic recurrent state
    write_feeds(feeds, out_dir)                               # sample_00000.npz, ...
"""

from __future__ import annotations

import os
import tempfile
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kquant_job.errors import InvalidSpec

Feed = dict[str, np.ndarray]

_SOX_HINT = "convert it with: sox in.wav -r 16000 -c 1 -b 16 -e signed-integer out.wav"


# Sample rates a WAV may declare: a header's rate of 0 crashed the resampler, and 1 Hz
# resampled a 2 KB file to 16 kHz into 31 250 frames (hostile-input trial).
MIN_RATE, MAX_RATE = 1000, 768_000


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Read a PCM WAV file as mono float32 samples in [-1, 1) and its sample rate in Hz.

    Integer PCM of 8 (unsigned), 16, 24 or 32 bits is scaled by its full-scale value (e.g.
    1/32768 for 16-bit); several channels are averaged to mono. Returns ``(samples of shape
    (n,), rate)``.

    Raises InvalidSpec when the file is missing, not a WAV, not integer PCM (float or
    compressed encodings: the message says how to convert with sox), or declares a sample
    rate outside MIN_RATE..MAX_RATE Hz.
    """
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width = wav.getnchannels(), wav.getsampwidth()
            rate, frames = wav.getframerate(), wav.getnframes()
            raw = wav.readframes(frames)
    except FileNotFoundError:
        raise InvalidSpec(f"{path.name}: no such audio file") from None
    except (wave.Error, EOFError) as exc:
        # The stdlib reads integer PCM only (format tag 1); float WAVs are tag 3.
        raise InvalidSpec(f"{path.name}: not a PCM WAV file ({exc}); {_SOX_HINT}") from exc
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidSpec(
            f"{path.name}: a sample rate of {rate} Hz is not audio kquant reads (expected "
            f"{MIN_RATE}-{MAX_RATE} Hz); {_SOX_HINT}"
        )
    if width == 1:
        ints = np.frombuffer(raw, np.uint8).astype(np.int32) - 128
    elif width == 2:
        ints = np.frombuffer(raw, "<i2").astype(np.int32)
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
    elif width == 4:
        ints = np.frombuffer(raw, "<i4").astype(np.int64)
    else:
        raise InvalidSpec(f"{path.name}: {8 * width}-bit samples are not supported; {_SOX_HINT}")
    full_scale = float(1 << (8 * width - 1))
    data = ints.astype(np.float64).reshape(-1, channels) / full_scale
    return data.mean(axis=1).astype(np.float32), int(rate)


def frame_feeds(
    samples: np.ndarray,
    frame_size: int,
    input_name: str,
    *,
    extra: dict[str, np.ndarray] | None = None,
    context: int = 0,
) -> list[Feed]:
    """Cut ``samples`` (shape (n,)) into consecutive non-overlapping frames, one feed each.

    Each feed maps ``input_name`` to a float32 array of shape ``(1, context + frame_size)``
    and every ``extra`` name to its own copy of the given array (e.g. an initial state and a
    sample rate). The last partial frame is zero-padded. ``context`` > 0 prepends the last
    ``context`` samples before the frame (zeros before the first), as Silero VAD's own
    wrapper does (64 samples at 16 kHz, so the model sees 576). Empty ``samples``: no feeds.

    Raises ValueError for ``frame_size`` < 1 or ``context`` < 0.
    """
    if frame_size < 1 or context < 0:
        raise ValueError(f"frame_size must be >= 1 and context >= 0 ({frame_size}, {context})")
    samples = np.asarray(samples, np.float32).ravel()
    count = -(-samples.size // frame_size)  # ceil
    padded = np.zeros(context + count * frame_size, np.float32)
    padded[context : context + samples.size] = samples
    feeds = []
    for i in range(count):
        start = i * frame_size  # index in padded of this frame's context
        frame = padded[start : start + context + frame_size].reshape(1, -1).copy()
        feed = {input_name: frame}
        feed.update({k: np.array(v, copy=True) for k, v in (extra or {}).items()})
        feeds.append(feed)
    return feeds


def write_feeds(feeds: Sequence[Feed], out_dir: Path, prefix: str = "sample") -> list[Path]:
    """Write each feed to ``out_dir/{prefix}_{i:05d}.npz`` (uncompressed; name order =
    stream order, as ``prepare_feeds`` and calibration read them), numbered after the
    highest such file already there, so earlier samples are never overwritten. Each file
    appears whole: it is written under a temporary name and renamed. Returns the paths in
    order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken = [p.stem[len(prefix) + 1 :] for p in out_dir.glob(f"{prefix}_*.npz")]
    start = max((int(t) + 1 for t in taken if t.isdigit()), default=0)
    paths = []
    for i, feed in enumerate(feeds, start=start):
        path = out_dir / f"{prefix}_{i:05d}.npz"
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **feed)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        paths.append(path)
    return paths


def thread_state(
    model_path: Path,
    feeds: Sequence[Feed],
    feedback: dict[str, str],
    providers: Sequence[str] | None = None,
) -> list[Feed]:
    """Copies of ``feeds`` carrying the state the FP32 model really has at each step.

    Runs ``model_path`` through the feeds as one stream (see
    :func:`kquant_job.validate.compare.run_stream`): feed i+1's ``feedback[X]`` input becomes
    output ``X`` of step i; feed 0 keeps its own value. Calibration files made this way see
    the recurrent state as in production, not a constant initial state.

    Raises PassError(CorruptModel) if the model does not load, InvalidSpec for feedback names
    the model lacks or for model inputs the feeds do not give, RuntimeError("sample i: ...")
    if a step fails.
    """
    from kquant_job.validate.runtime import make_session, run_stream, select_providers

    session = make_session(Path(model_path), providers or select_providers()[0])
    given = set(feeds[0]) if feeds else set()
    missing = [i.name for i in session.get_inputs() if i.name not in given]
    if feeds and missing:
        raise InvalidSpec(
            f"{Path(model_path).name} also needs the inputs {', '.join(missing)}, which the "
            f"frames do not give (they give {', '.join(sorted(given))}): add them "
            "(kquant-job frames: --zeros NAME=D1,D2,... for a state tensor, e.g. "
            "--zeros state=2,1,128; --scalar NAME=VALUE for a number, e.g. --scalar sr=16000)"
        )
    outputs = run_stream(session, feeds, feedback)
    threaded = [dict(feed) for feed in feeds]
    for i in range(1, len(threaded)):
        for out, inp in feedback.items():
            threaded[i][inp] = np.array(outputs[i - 1][out], copy=True)
    return threaded
