#!/usr/bin/env bash
# README command 1: convert the real Silero VAD model to FP16 with the minimal spec (model,
# output, precision): kquant finds the inputs it takes (frames of real speech, the LSTM state
# threaded, sr 16000), validates the conversion on them and publishes the set with a report
# and a manifest, then promotes it; all on local storage under .kquant-demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh job,operator,test
demo=.kquant-demo
model_src=$(.venv/bin/python -c "import silero_vad, pathlib; print(pathlib.Path(silero_vad.__file__).parent / 'data' / 'silero_vad.onnx')")
mkdir -p "$demo/models/silero-vad"
cp "$model_src" "$demo/models/silero-vad/silero_vad.onnx"
.venv/bin/kquant-job run examples/local/silero-vad-fp16.yaml --work-dir "$demo/work"
# speech frames for examples/local/silero-vad-fp16-frames.yaml (the clip kquant ships), the
# clip once: `frames` numbers on after files already there, and a second demo run doubled it
rm -rf "$demo/data/speech-frames"
.venv/bin/kquant-job frames job_image/kquant_job/data/speech_16k.wav "$demo/data/speech-frames" \
  --frame-size 512 --context 64 --scalar sr=16000 --zeros state=2,1,128 >/dev/null 2>&1
echo
echo "published:"
ls -l "$demo/out/silero-vad-fp16/"
