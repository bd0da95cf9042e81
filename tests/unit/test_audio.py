"""Audio helpers on the real speech fixture and hand-made WAV files."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import pytest
from conftest import SPEECH_WAV

from kquant_job.audio import frame_feeds, read_wav, thread_state, write_feeds
from kquant_job.errors import InvalidSpec
from kquant_job.validate.runtime import make_session, run_stream

SR = 16000
FEEDBACK = {"stateN": "state"}


def silero_feeds(samples: np.ndarray, context: int = 64) -> list[dict[str, np.ndarray]]:
    """Silero VAD feeds as its own wrapper builds them: 512 new samples + 64 of context."""
    return frame_feeds(
        samples,
        512,
        "input",
        context=context,
        extra={"state": np.zeros((2, 1, 128), np.float32), "sr": np.array(SR, np.int64)},
    )


def write_pcm(path: Path, frames: np.ndarray, width: int, rate: int = SR) -> None:
    """frames: (n, channels) integers stored as little-endian PCM of ``width`` bytes."""
    frames = np.asarray(frames)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames.astype(f"<i{width}").tobytes())


def test_speech_fixture_is_16k_mono_with_silence_around_speech():
    samples, rate = read_wav(SPEECH_WAV)
    assert rate == SR and samples.dtype == np.float32 and samples.ndim == 1
    assert 4.0 < samples.size / SR < 7.0
    assert np.abs(samples).max() <= 1.0
    half_second = SR // 2
    assert np.abs(samples[:half_second]).max() < 1e-3  # leading silence
    assert np.abs(samples[-half_second:]).max() < 1e-3  # trailing silence
    middle = samples[SR : SR + SR // 2]
    assert np.sqrt(np.mean(middle**2)) > 0.02  # speech energy


def test_read_wav_pcm16_scales_by_full_scale(tmp_path):
    path = tmp_path / "a.wav"
    write_pcm(path, np.array([[0], [16384], [-32768], [32767]]), 2, rate=8000)
    samples, rate = read_wav(path)
    assert rate == 8000
    np.testing.assert_array_equal(samples, [0.0, 0.5, -1.0, 32767 / 32768])


def test_read_wav_pcm32_stereo_averages_channels(tmp_path):
    path = tmp_path / "b.wav"
    left = np.array([2**30, -(2**31), 0])
    right = np.array([0, -(2**31), 2**29])
    write_pcm(path, np.stack([left, right], axis=1), 4)
    samples, _ = read_wav(path)
    assert samples.shape == (3,)
    np.testing.assert_allclose(samples, [0.25, -1.0, 0.125])


def test_read_wav_pcm24(tmp_path):
    path = tmp_path / "c.wav"
    values = [1 << 22, -(1 << 23), -1]
    raw = b"".join(struct.pack("<i", v)[:3] for v in values)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(3)
        w.setframerate(SR)
        w.writeframes(raw)
    samples, _ = read_wav(path)
    assert samples.dtype == np.float32
    np.testing.assert_allclose(samples, [0.5, -1.0, -1 / (1 << 23)])


def float_wav(path: Path, values: list[float]) -> None:
    """A IEEE-float WAV (format tag 3), which the stdlib wave module refuses."""
    data = struct.pack(f"<{len(values)}f", *values)
    fmt = struct.pack("<HHIIHH", 3, 1, SR, SR * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_read_wav_rejects_float_and_non_wav_with_sox_hint(tmp_path):
    float_wav(tmp_path / "f.wav", [0.1, 0.2])
    (tmp_path / "n.wav").write_bytes(b"not a wav at all")
    for name in ("f.wav", "n.wav"):
        with pytest.raises(InvalidSpec, match="sox") as info:
            read_wav(tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(InvalidSpec, match="no such audio file"):
        read_wav(tmp_path / "missing.wav")


def test_frame_feeds_pads_last_frame_and_copies_extras():
    samples = np.arange(1, 11, dtype=np.float32)
    state = np.zeros(3, np.float32)
    feeds = frame_feeds(samples, 4, "x", extra={"s": state})
    assert [f["x"].tolist() for f in feeds] == [
        [[1, 2, 3, 4]],
        [[5, 6, 7, 8]],
        [[9, 10, 0, 0]],
    ]
    assert all(f["x"].dtype == np.float32 for f in feeds)
    feeds[0]["s"][0] = 7.0  # each feed owns its copy
    assert state[0] == 0.0 and feeds[1]["s"][0] == 0.0
    assert frame_feeds(np.zeros(0), 4, "x") == []
    with pytest.raises(ValueError):
        frame_feeds(samples, 0, "x")


def test_frame_feeds_context_prepends_previous_samples():
    feeds = frame_feeds(np.arange(1, 7, dtype=np.float32), 3, "x", context=2)
    assert [f["x"].tolist() for f in feeds] == [[[0, 0, 1, 2, 3]], [[2, 3, 4, 5, 6]]]


def test_write_feeds_round_trips_in_name_order(tmp_path):
    feeds = [{"x": np.full((1, 2), i, np.float32), "sr": np.array(SR, np.int64)} for i in range(3)]
    paths = write_feeds(feeds, tmp_path / "out")
    assert [p.name for p in paths] == ["sample_00000.npz", "sample_00001.npz", "sample_00002.npz"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in paths]
    for feed, path in zip(feeds, paths, strict=True):
        with np.load(path) as npz:
            assert npz["x"].tolist() == feed["x"].tolist() and npz["sr"].shape == ()


def test_thread_state_carries_the_models_own_state(silero_onnx):
    samples, _ = read_wav(SPEECH_WAV)
    feeds = silero_feeds(samples)[:40]
    threaded = thread_state(silero_onnx, feeds, FEEDBACK)
    np.testing.assert_array_equal(threaded[0]["state"], feeds[0]["state"])
    session = make_session(silero_onnx, ["CPUExecutionProvider"])
    # Running each threaded feed on its own reproduces the next feed's state.
    for i in (0, 10, 38):
        out = run_stream(session, [threaded[i]], {})[0]
        np.testing.assert_allclose(threaded[i + 1]["state"], out["stateN"], rtol=0, atol=1e-6)
    assert np.abs(threaded[30]["state"]).max() > 0.1  # not the zero initial state any more
    assert np.abs(feeds[30]["state"]).max() == 0.0  # inputs untouched


def speech_probabilities(model: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = make_session(model, ["CPUExecutionProvider"])
    return np.array([o["output"].item() for o in run_stream(session, feeds, FEEDBACK)])


def test_threaded_silero_finds_the_speech_in_the_fixture(silero_onnx):
    samples, _ = read_wav(SPEECH_WAV)
    probs = speech_probabilities(silero_onnx, silero_feeds(samples))
    frames_per_s = SR / 512
    lead = probs[: int(0.5 * frames_per_s)]  # leading silence
    tail = probs[-int(0.5 * frames_per_s) :]  # trailing silence
    speech = probs[int(1.0 * frames_per_s) : int(2.5 * frames_per_s)]  # inside sentence one
    assert lead.max() < 0.1 and tail.max() < 0.1
    assert np.median(speech) > 0.9
    assert (probs > 0.5).mean() > 0.3


def test_threading_matches_silero_vad_own_wrapper(silero_onnx):
    """The silero-vad package's OnnxWrapper (context + state kept across calls) is the
    reference for how the model is streamed."""
    torch = pytest.importorskip("torch")
    from silero_vad.utils_vad import OnnxWrapper

    samples, _ = read_wav(SPEECH_WAV)
    samples = samples[: 60 * 512]
    wrapper = OnnxWrapper(str(silero_onnx))
    expected = [
        wrapper(torch.from_numpy(f["x"]), SR).item() for f in frame_feeds(samples, 512, "x")
    ]
    np.testing.assert_allclose(
        speech_probabilities(silero_onnx, silero_feeds(samples)), expected, atol=1e-6
    )


@pytest.mark.parametrize("rate", [0, 1, 999, 10_000_000])
def test_read_wav_refuses_a_rate_no_audio_has(tmp_path, rate):
    """Trial: 0 Hz crashed the resampler; 1 Hz made 31 250 frames of a 2 KB file."""
    path = tmp_path / "a.wav"
    write_pcm(path, np.zeros((1000, 1)), 2)
    data = bytearray(path.read_bytes())
    data[24:28] = struct.pack("<I", rate)  # the fmt chunk's sample rate
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidSpec, match=f"a sample rate of {rate} Hz"):
        read_wav(path)
