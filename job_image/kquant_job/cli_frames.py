"""``kquant-job frames``: WAV files to ``.npz`` feeds for validation and calibration.

Waveform frames (Silero VAD: 512 samples with 64 of context) or Kaldi fbank features
(CAM++: [1, frames, 80]; SenseVoice: x32768, LFR 7/6 -> 560), from files, folders or globs,
resampled to one rate, stereo mixed down; optionally a seeded random choice of them, and the
recurrent state threaded through an FP32 model (:mod:`kquant_job.features`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from kquant_api import Reason
from kquant_job.errors import KquantError

LOG = logging.getLogger("kquant")


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _audio_feeds(args: argparse.Namespace, wavs: list[Path]) -> list[dict[str, Any]]:
    """Feeds from every WAV: waveform frames, or fbank features (see ``frames --help``)."""
    import numpy as np

    from kquant_job.audio import frame_feeds
    from kquant_job.features import fbank, lfr, read_audio

    extra: dict[str, Any] = {name: np.array(int(v), dtype=np.int64) for name, v in args.scalar}
    for name, shape in args.zeros:
        extra[name] = np.zeros([int(d) for d in shape.split(",")], dtype=np.float32)
    feeds: list[dict[str, Any]] = []
    for wav in wavs:
        samples = read_audio(wav, args.sample_rate)
        if args.features != "fbank":
            feeds += frame_feeds(samples, args.frame_size, args.input, extra=extra,
                                 context=args.context)  # fmt: skip
            continue
        step = int(args.chunk_seconds * args.sample_rate) if args.chunk_seconds else len(samples)
        for start in range(0, max(len(samples), 1), max(step, 1)):
            chunk = samples[start : start + step] * (32768.0 if args.int16_scale else 1.0)
            feats = fbank(chunk, args.sample_rate, args.mel_bins, mean_norm=args.mean_norm)
            if args.lfr:
                m, n = (int(x) for x in args.lfr.split(","))
                feats = lfr(feats, m, n)
            if len(feats):
                feeds.append({args.input: feats[None].astype(np.float32), **extra})
    return feeds


def cmd_frames(args: argparse.Namespace) -> int:
    """Turn WAV files into model feeds (.npz), for validation or calibration data."""
    import numpy as np

    from kquant_job.audio import thread_state, write_feeds
    from kquant_job.features import collect_wavs

    *inputs, out_dir = args.paths
    try:
        if not inputs:
            raise KquantError("give one or more WAV files, folders or globs, then the output "
                              "folder", reason=Reason.InvalidSpec)  # fmt: skip
        target = Path(out_dir)
        if target.exists() and not target.is_dir():
            raise KquantError(f"OUT_DIR {out_dir} is a file, not a folder: name a folder for "
                              "the .npz feeds", reason=Reason.InvalidSpec)  # fmt: skip
        wavs = collect_wavs(inputs)
        feeds = _audio_feeds(args, wavs)
        if args.count and args.count < len(feeds):
            rng = np.random.default_rng(args.seed)
            keep = sorted(rng.choice(len(feeds), size=args.count, replace=False))
            feeds = [feeds[i] for i in keep]
        elif args.count and args.count > len(feeds):  # said, not passed over (new-user trial)
            LOG.warning(
                "--count %d: the input gives only %d feed(s) (fbank without --chunk-seconds "
                "makes one per WAV); all written", args.count, len(feeds),
            )  # fmt: skip
        feeds = feeds[: args.max_frames] if args.max_frames else feeds
        if args.model:
            feeds = thread_state(Path(args.model), feeds, dict(args.feedback))
        files = write_feeds(feeds, target)
    except KquantError as exc:
        LOG.error("%s: %s", exc.reason.value, exc)
        return exc.exit_code
    LOG.info("wrote %d feeds", len(files), extra={"fields": {"dir": out_dir, "wavs": len(wavs)}})
    return 0


def add_frames_parser(sub: Any) -> None:
    """Add the ``frames`` sub-command to ``kquant-job``'s sub-parsers."""
    frames = sub.add_parser(
        "frames",
        help="turn WAV files into .npz feeds for a speech model (waveform frames or fbank)",
        description="Cut WAV files (any rate: resampled; stereo: mixed down) into .npz feeds, "
        "one per file sample_NNNNN.npz, numbered after those already in OUT_DIR.",
        epilog="examples:\n"
        "  kquant-job frames speech/ calib/ --frame-size 512 --context 64 --scalar sr=16000 "
        "--zeros state=2,1,128 --count 100 --seed 1       # Silero VAD\n"
        "  kquant-job frames 'data/**/*.wav' calib/ --features fbank --input speech "
        "--int16-scale --lfr 7,6 --chunk-seconds 5        # SenseVoice\n"
        "  kquant-job frames enroll/ calib/ --features fbank --input x           # CAM++",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    frames.add_argument(
        "paths", nargs="+", metavar="INPUT... OUT_DIR",
        help="WAV files, folders (searched for *.wav) or globs, then the output folder",
    )  # fmt: skip
    frames.add_argument("--sample-rate", type=int, default=16000, help="rate to resample to, Hz")
    frames.add_argument("--input", default="input", help="model input receiving the frame")
    frames.add_argument("--frame-size", type=int, default=512, help="samples per frame")
    frames.add_argument(
        "--context",
        type=int,
        default=0,
        help="previous samples prepended to each frame (Silero VAD: 64)",
    )
    frames.add_argument(
        "--features",
        choices=["waveform", "fbank"],
        default="waveform",
        help="waveform frames (default) or Kaldi fbank features [1, frames, bins]",
    )
    frames.add_argument("--mel-bins", type=int, default=80, help="fbank: mel bins")
    frames.add_argument("--mean-norm", action="store_true", help="fbank: subtract the mean")
    frames.add_argument(
        "--int16-scale", action="store_true", help="fbank: samples x32768, as FunASR feeds Kaldi"
    )
    frames.add_argument("--lfr", metavar="M,N", help="fbank: stack M frames every N (7,6)")
    frames.add_argument(
        "--chunk-seconds", type=float, default=0.0, help="fbank: one feed per chunk, seconds"
    )
    frames.add_argument("--count", type=int, default=0, help="keep N feeds chosen at random")
    frames.add_argument("--seed", type=int, default=0, help="seed of --count's choice")
    frames.add_argument(
        "--scalar",
        type=_name_value,
        action="append",
        default=[],
        metavar="NAME=INT",
        help="int64 scalar input, e.g. sr=16000",
    )
    frames.add_argument(
        "--zeros",
        type=_name_value,
        action="append",
        default=[],
        metavar="NAME=D1,D2,..",
        help="float32 zeros input, e.g. state=2,1,128",
    )
    frames.add_argument("--max-frames", type=int, default=0, help="keep the first N frames")
    frames.add_argument(
        "--model",
        help="thread the state through this FP32 ONNX model, so "
        "each feed carries the state it sees in use",
    )
    frames.add_argument(
        "--feedback",
        type=_name_value,
        action="append",
        default=[],
        metavar="OUTPUT=INPUT",
        help="with --model: e.g. stateN=state",
    )
    frames.set_defaults(func=cmd_frames)
