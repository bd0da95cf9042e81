"""Audio for feeds: many WAVs at any rate (resampled, mixed down), seeded choices, numbering
that never overwrites, and Kaldi fbank features with SenseVoice's low frame rate."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
from conftest import SPEECH_WAV

from kquant_job import cli
from kquant_job.errors import InvalidSpec
from kquant_job.features import collect_wavs, fbank, lfr, read_audio


def tone(path: Path, rate: int, hz: float, seconds: float = 1.0, channels: int = 1) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    mono = (0.5 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2")
    frames = np.repeat(mono[:, None], channels, axis=1)
    if channels == 2:
        frames[:, 1] = 0  # right channel silent: the mix is half the left
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames.tobytes())
    return path


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum) * rate / len(samples))


def test_any_rate_is_resampled_and_stereo_mixed_down(tmp_path: Path) -> None:
    low = read_audio(tone(tmp_path / "8k.wav", 8000, 440.0), 16000)
    assert len(low) == 16000 and abs(peak_hz(low, 16000) - 440.0) < 2.0
    high = read_audio(tone(tmp_path / "48k.wav", 48000, 1000.0), 16000)
    assert len(high) == 16000 and abs(peak_hz(high, 16000) - 1000.0) < 2.0
    stereo = read_audio(tone(tmp_path / "st.wav", 16000, 440.0, channels=2), 16000)
    assert 0.2 < np.abs(stereo).max() < 0.3  # (0.5 + 0) / 2


def test_files_folders_and_globs(tmp_path: Path) -> None:
    a = tone(tmp_path / "d" / "a.wav", 16000, 300.0)
    b = tone(tmp_path / "d" / "sub" / "b.WAV", 16000, 300.0)
    c = tone(tmp_path / "c.wav", 16000, 300.0)
    assert collect_wavs([str(tmp_path / "d"), str(c), str(tmp_path / "*.wav")]) == [a, b, c]
    with pytest.raises(InvalidSpec, match="no WAV file"):
        collect_wavs([str(tmp_path / "absent/*.wav")])


def test_fbank_is_kaldi_shaped_and_lfr_stacks_like_funasr() -> None:
    rng = np.random.default_rng(0)
    second = rng.standard_normal(16000).astype(np.float32) * 0.1
    feats = fbank(second, 16000, 80)
    assert feats.shape == (98, 80) and feats.dtype == np.float32  # 1 + (16000 - 400) // 160
    normed = fbank(second, 16000, 80, mean_norm=True)
    assert np.allclose(normed.mean(axis=0), 0.0, atol=1e-4)
    assert np.allclose(normed, feats - feats.mean(axis=0), atol=1e-5)
    stacked = lfr(feats, 7, 6)
    assert stacked.shape == (17, 560)  # ceil(98 / 6) rows of 7 x 80
    assert np.array_equal(stacked[0, :80], feats[0])  # the first frame repeated in front
    assert np.array_equal(stacked[1, 3 * 80 : 4 * 80], feats[6])  # row i starts at frame 6i-3
    assert fbank(second[:300], 16000, 80).shape == (0, 80)


def test_frames_command_takes_many_wavs_a_seeded_choice_and_never_overwrites(tmp_path):
    folder = tmp_path / "wavs"
    tone(folder / "one.wav", 8000, 440.0, seconds=1.0)
    tone(folder / "two.wav", 44100, 220.0, seconds=0.5)
    out = tmp_path / "calib"
    args = ["frames", str(folder), str(out), "--frame-size", "512", "--context", "64",
            "--scalar", "sr=16000", "--zeros", "state=2,1,128"]  # fmt: skip
    assert cli.main(args) == 0
    files = sorted(out.glob("*.npz"))
    assert len(files) == 32 + 16  # 1 s and 0.5 s at 16 kHz in 512-sample frames
    feed = np.load(files[0])
    assert feed["input"].shape == (1, 576) and int(feed["sr"]) == 16000
    assert cli.main([*args, "--count", "5", "--seed", "3"]) == 0
    again = sorted(out.glob("*.npz"))
    assert len(again) == 48 + 5 and again[:48] == files  # appended, none overwritten
    assert again[48].name == "sample_00048.npz"
    other = tmp_path / "other"
    assert cli.main(["frames", str(folder), str(other), "--count", "5", "--seed", "3"]) == 0
    chosen = [np.load(p)["input"] for p in sorted(other.glob("*.npz"))]
    same = [np.load(p)["input"][:, 64:] for p in again[48:]]  # the same seed, the same frames
    assert all(np.array_equal(a, b) for a, b in zip(chosen, same, strict=True))


def test_frames_command_writes_fbank_features(tmp_path):
    out = tmp_path / "fb"
    args = ["frames", str(SPEECH_WAV), str(out), "--features", "fbank", "--input", "speech",
            "--int16-scale", "--lfr", "7,6", "--chunk-seconds", "2"]  # fmt: skip
    assert cli.main(args) == 0
    feeds = [np.load(p)["speech"] for p in sorted(out.glob("*.npz"))]
    assert len(feeds) == 3  # 5.7 s in 2 s chunks
    assert feeds[0].shape == (1, 33, 560) and feeds[0].dtype == np.float32  # 198 frames / 6
    plain = tmp_path / "cam"
    assert cli.main(["frames", str(SPEECH_WAV), str(plain), "--features", "fbank"]) == 0
    [cam] = [np.load(p)["input"] for p in plain.glob("*.npz")]
    assert cam.shape[0] == 1 and cam.shape[2] == 80 and cam.shape[1] > 500


def test_frames_asked_for_more_feeds_than_the_input_gives_says_so(tmp_path, capfd):
    """New-user trial: ``--count 3`` of fbank without --chunk-seconds wrote 1 feed, silently."""
    out = tmp_path / "fb"
    args = ["frames", str(SPEECH_WAV), str(out), "--features", "fbank", "--count", "3"]
    assert cli.main(args) == 0
    assert len(list(out.glob("*.npz"))) == 1
    assert "--count 3: the input gives only 1 feed(s)" in capfd.readouterr().err


def test_frames_with_a_model_missing_inputs_says_which_and_how(tmp_path, silero_onnx, capfd):
    """A new user's `frames --model` without --zeros/--scalar ended in a traceback."""
    folder = tmp_path / "wavs"
    tone(folder / "one.wav", 16000, 440.0, seconds=0.2)
    out = tmp_path / "calib"
    args = ["frames", str(folder), str(out), "--frame-size", "512", "--model", str(silero_onnx)]
    assert cli.main(args) == 10  # InvalidSpec, no traceback
    message = capfd.readouterr().err
    assert "also needs the inputs state, sr" in message and "--zeros state=2,1,128" in message
    assert not list(out.glob("*.npz"))


def test_frames_into_a_file_is_refused_before_reading_audio(tmp_path, capfd):
    """An OUT_DIR that is a file ended in a FileExistsError traceback."""
    folder = tmp_path / "wavs"
    tone(folder / "one.wav", 16000, 440.0, seconds=0.2)
    taken = tmp_path / "calib"
    taken.write_text("a user's file")
    assert cli.main(["frames", str(folder), str(taken), "--frame-size", "512"]) == 10
    err = capfd.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err
    assert taken.read_text() == "a user's file"
