"""Measure how many segments Silero + the segmenter produce per recording for several endpoint
silences; the numbers justify the defaults in pipeline/vad.py.

    python bench/vad_defaults.py [SPEECH_DIR]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.audio import load_audio  # noqa: E402
from pipeline.vad import SpeechEnd, Segmenter, VADOptions, WINDOW  # noqa: E402

FILES = ["en_jfk.flac", "en_librivox_sense_0870.wav", "en_librivox_sense_0890.wav", "en_picovoice_cv.wav",
         "en_birch_canoe.wav", "de_picovoice_cv.wav", "fr_picovoice_cv.wav", "en_forever.wav"]


def main() -> None:
    speech = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "speech")
    audio = {f: np.concatenate([load_audio(str(speech / f)), np.zeros(16000, np.float32)]) for f in FILES}
    table = {}
    for ms in (100, 300, 500, 700, 1000):
        row = {}
        for f, x in audio.items():
            seg = Segmenter(VADOptions(endpoint_silence_ms=ms))
            ends = [e for i in range(0, len(x), 320) for e in seg.feed(x[i : i + 320]) if isinstance(e, SpeechEnd)]
            row[f] = len(ends)
        table[ms] = row
        print(f"endpoint {ms:>4} ms: " + "  ".join(f"{k.split('.')[0]}={v}" for k, v in row.items()))
    x = audio["en_jfk.flac"]
    seg = Segmenter()
    t = time.process_time()
    for i in range(0, len(x), 320):
        seg.feed(x[i : i + 320])
    cpu = time.process_time() - t
    per_window_us = cpu / (len(x) / WINDOW) * 1e6
    print(f"Silero ONNX + segmenter: {per_window_us:.0f} us per 32 ms window = {100 * cpu / (len(x) / 16000):.2f}% of one core")
    out = Path(__file__).parent / "results" / "vad_defaults.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"segments": table, "us_per_window": per_window_us}, indent=2))


if __name__ == "__main__":
    main()
