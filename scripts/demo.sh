#!/usr/bin/env bash
# README command 1: convert the real Silero VAD model to FP16, validate it on real speech
# (16 kHz, 512-sample windows plus 64 samples of context, as Silero's own wrapper feeds it;
# LSTM state threaded through the stream) and publish it with a
# report and a manifest, all on local storage under .kquant-demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh job,operator,test
demo=.kquant-demo
model_src=$(.venv/bin/python -c "import silero_vad, pathlib; print(pathlib.Path(silero_vad.__file__).parent / 'data' / 'silero_vad.onnx')")
rm -rf "$demo/data"
mkdir -p "$demo/models/silero-vad"
cp "$model_src" "$demo/models/silero-vad/silero_vad.onnx"
.venv/bin/kquant-job frames tests/fixtures/speech_16k.wav "$demo/data/speech-frames" \
  --frame-size 512 --context 64 --input input --scalar sr=16000 --zeros state=2,1,128
.venv/bin/kquant-job run examples/local/silero-vad-fp16.yaml --work-dir "$demo/work"
echo
echo "published:"
ls -l "$demo/out/silero-vad-fp16/"
