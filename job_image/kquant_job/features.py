"""Audio for calibration and validation feeds: many WAV files at any rate, and the features
speech models take instead of waveforms.

- :func:`collect_wavs` expands files, folders and globs; :func:`read_audio` reads one file
  as mono float32 at the wanted rate (resampled with ``soxr``, libsoxr's "high quality"
  setting; several channels averaged).
- :func:`fbank` is the Kaldi-compatible log-mel filter bank of ``kaldi-native-fbank`` (the
  front end of k2/sherpa and FunASR's ONNX runtime): 25 ms windows every 10 ms, Povey
  window, dither 0, ``num_mel_bins`` (80: what the users' CAM++ and SenseVoice calibration
  code computes with ``torchaudio.compliance.kaldi.fbank``); optional per-utterance mean
  normalization (3D-Speaker's ``FBank(mean_nor=True)``).
- :func:`lfr` stacks frames as FunASR's ``WavFrontend`` does for SenseVoice (low frame rate:
  7 frames every 6, 80 x 7 = 560 features).
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np

from kquant_job.errors import InvalidSpec


def collect_wavs(inputs: list[str]) -> list[Path]:
    """The WAV files named by ``inputs`` (files, folders searched recursively for ``*.wav``,
    or glob patterns), sorted within each input, each once. Raises InvalidSpec when an
    input names nothing."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() == ".wav")
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
        if not matches:
            raise InvalidSpec(f"{item}: no WAV file there")
        found += [m for m in matches if m not in found]
    return found


def read_audio(path: Path, rate: int) -> np.ndarray:
    """Mono float32 samples of the WAV file ``path`` in [-1, 1), at ``rate`` Hz: resampled
    with soxr when the file has another rate. Raises InvalidSpec for an unreadable file
    (see :func:`kquant_job.audio.read_wav`)."""
    from kquant_job.audio import read_wav

    samples, file_rate = read_wav(path)
    if file_rate == rate:
        return samples
    import soxr

    return np.asarray(soxr.resample(samples, file_rate, rate, quality="HQ"), np.float32)


def fbank(
    samples: np.ndarray, rate: int, num_mel_bins: int = 80, *, mean_norm: bool = False
) -> np.ndarray:
    """Kaldi log-mel filter bank features of mono ``samples`` (float32, the scale they come
    in: [-1, 1) as torchaudio loads them, or x32768 as FunASR feeds Kaldi), shape
    ``(frames, num_mel_bins)``, float32; ``mean_norm`` subtracts each bin's mean over the
    utterance. Fewer than 400 samples (one 25 ms window at 16 kHz) give no frame."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = float(rate)
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = num_mel_bins
    computer = knf.OnlineFbank(opts)
    computer.accept_waveform(float(rate), np.asarray(samples, np.float32).tolist())
    computer.input_finished()
    frames = [computer.get_frame(i) for i in range(computer.num_frames_ready)]
    feats = np.array(frames, np.float32).reshape(-1, num_mel_bins)
    if mean_norm and len(feats):
        feats = feats - feats.mean(axis=0, keepdims=True)
    return feats


def lfr(feats: np.ndarray, m: int, n: int) -> np.ndarray:
    """Low frame rate stacking: every ``n``-th frame with the ``m`` frames from it
    concatenated, shape ``(ceil(frames / n), m * bins)``; the first frame is repeated
    ``(m - 1) // 2`` times in front and the last one at the end, as FunASR's ``WavFrontend``
    does (SenseVoice: m=7, n=6). Raises ValueError for m or n < 1."""
    if m < 1 or n < 1:
        raise ValueError(f"lfr needs m, n >= 1 (got {m}, {n})")
    if not len(feats):
        return feats.reshape(0, feats.shape[1] * m if feats.ndim == 2 else 0)
    left = (m - 1) // 2
    padded = np.concatenate([np.repeat(feats[:1], left, axis=0), feats])
    out_len = -(-len(feats) // n)
    need = (out_len - 1) * n + m
    if len(padded) < need:
        padded = np.concatenate([padded, np.repeat(padded[-1:], need - len(padded), axis=0)])
    return np.stack([padded[i * n : i * n + m].reshape(-1) for i in range(out_len)])
