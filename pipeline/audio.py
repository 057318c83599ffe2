"""Downmixing and streaming resampling.

soxr's streaming resampler keeps filter state between chunks, so 20 ms frames resample without the
clicks a per-chunk resampler makes at every boundary. One ``InputConverter`` per incoming stream.
"""
from __future__ import annotations

import numpy as np
import soxr

from .frames import PIPELINE_RATE, AudioFrame


def to_mono(pcm: np.ndarray, channels: int) -> np.ndarray:
    """Average interleaved channels into one, as float32 in [-1, 1]."""
    if channels == 1:
        return pcm.astype(np.float32) * (1 / 32768.0)
    # Summing the columns directly is ~3x cheaper than mean() on a (n, 2) view: this runs 50 times
    # a second per room.
    frames = pcm.reshape(-1, channels)
    x = frames[:, 0].astype(np.float32)
    for c in range(1, channels):
        x += frames[:, c]
    x *= 1 / (32768.0 * channels)
    return x


def float_to_int16(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


class StreamResampler:
    """Mono float32 resampling for a continuous stream whose input rate may change mid-stream."""

    def __init__(self, out_rate: int, quality: str = "HQ"):
        self.out_rate = out_rate
        self.quality = quality
        self._in_rate: int | None = None
        self._stream: soxr.ResampleStream | None = None

    def process(self, mono: np.ndarray, in_rate: int, last: bool = False) -> np.ndarray:
        if in_rate == self.out_rate:
            return mono.astype(np.float32, copy=False)
        if in_rate != self._in_rate:
            self._in_rate = in_rate
            self._stream = soxr.ResampleStream(in_rate, self.out_rate, 1, dtype="float32", quality=self.quality)
        assert self._stream is not None
        return self._stream.resample_chunk(mono.astype(np.float32, copy=False), last=last)


class LeadingSilenceTrimmer:
    """Drops a sound's leading silence from a stream of int16 chunks, keeping a short lead-in so
    the onset is not clipped. TTS engines start each sentence with silence (espeak-ng ~12 ms, MP3
    streams more); before a reply's first sentence it is only delay before the person hears it."""

    def __init__(self, rate: int, *, threshold_dbfs: float = -50.0, lead_ms: float = 5.0):
        self.threshold = int(32767 * 10 ** (threshold_dbfs / 20))
        self.lead = int(rate * lead_ms / 1000)
        self.done = False
        self.dropped = 0  # samples removed so far
        self._held = np.zeros(0, np.int16)  # the quiet samples that may become the lead-in

    def process(self, pcm: np.ndarray) -> np.ndarray:
        if self.done:
            return pcm
        x = np.concatenate([self._held, pcm]) if len(self._held) else pcm
        loud = np.flatnonzero(np.abs(x.astype(np.int32)) > self.threshold)
        if not len(loud):
            self._held = x[max(0, len(x) - self.lead):]
            self.dropped += len(x) - len(self._held)
            return x[:0]
        start = max(0, int(loud[0]) - self.lead)
        self.dropped += start
        self.done, self._held = True, x[:0]
        return x[start:]

    def flush(self) -> np.ndarray:
        """What is held back when the sound never rose above the threshold."""
        held, self._held = self._held, self._held[:0]
        self.done = True
        return held


class InputConverter:
    """Any transport frame -> 16 kHz mono float32 for VAD and STT."""

    def __init__(self) -> None:
        self._resampler = StreamResampler(PIPELINE_RATE)

    def convert(self, frame: AudioFrame) -> np.ndarray:
        return self._resampler.process(to_mono(frame.pcm, frame.channels), frame.sample_rate)


def resample_once(mono: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """Whole-buffer resampling (files, TTS sentences)."""
    if in_rate == out_rate:
        return mono.astype(np.float32, copy=False)
    return soxr.resample(mono.astype(np.float32, copy=False), in_rate, out_rate, quality="HQ")


def rms_dbfs(x: np.ndarray) -> float:
    if len(x) == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(np.square(x.astype(np.float64)))))
    return 20 * np.log10(max(rms, 1e-6))


def load_audio(path: str, rate: int = PIPELINE_RATE) -> np.ndarray:
    """Decode any audio file (wav, flac, mp3, ...) to mono float32 at ``rate`` with PyAV."""
    import av

    chunks: list[np.ndarray] = []
    with av.open(path) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
