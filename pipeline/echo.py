"""Telling the agent's own voice from the person's.

Browsers cancel the agent's voice from the microphone (AEC), but not always completely: the first
second or two while the canceller converges, laptop speakers at full volume, or a transport with no
AEC at all (a SIP bridge, some LiveKit clients). What leaks back is the agent's audio, delayed by
the round trip and filtered by the room. A barge-in decision that sees "speech" must first ask
whether that speech is simply what the agent has just played: its normalised cross-correlation with
the recently played audio, over every delay up to ``max_delay_s``, is close to 1 for an echo and
low for a person (a voice over the echo lowers it too, so talking over the agent still interrupts).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .frames import OUTPUT_RATE, PIPELINE_RATE

_DECIMATE = OUTPUT_RATE // PIPELINE_RATE  # 48 kHz -> 16 kHz by averaging: enough for correlation


@dataclass(frozen=True)
class EchoOptions:
    enabled: bool = True
    # Speech whose correlation with the played audio reaches this is the agent's own voice. Leaked
    # echo measures 0.8-1.0 (tests/test_echo.py); a person speaking, or talking over it, < 0.4.
    threshold: float = 0.6
    # Longest speaker-to-microphone round trip considered: output jitter buffer, the browser's
    # playout, the room, capture and the uplink (WebRTC on a bad network: ~0.5 s).
    max_delay_s: float = 0.6
    # How much of the microphone's latest audio is compared.
    window_s: float = 0.3
    # The first seconds of the agent's voice in a session, while the browser's canceller converges:
    # an interruption must last twice as long to count.
    aec_warmup_s: float = 2.0


class EchoGuard:
    def __init__(self, options: EchoOptions | None = None):
        self.options = options or EchoOptions()
        o = self.options
        self._ring = np.zeros(int((o.max_delay_s + o.window_s) * PIPELINE_RATE), np.float32)
        self._pos = 0  # next write index; the ring holds the latest audio the transport took
        self.played_s = 0.0  # voiced agent audio played so far (for the AEC warm-up)
        self._quiet = True
        self.detections = 0  # checks that found the agent's own voice
        self._since_voiced_s = float("inf")  # since the transport last took audible agent audio

    def played(self, frame: np.ndarray) -> None:
        """Record the 20 ms (48 kHz int16 mono) the transport just took from the player."""
        n = len(frame) // _DECIMATE
        if frame.any():
            x = frame[: n * _DECIMATE].reshape(n, _DECIMATE).mean(axis=1, dtype=np.float32) / 32768.0
            self.played_s += n / PIPELINE_RATE
            self._quiet = False
            self._since_voiced_s = 0.0
        else:
            x = None
            self._since_voiced_s += n / PIPELINE_RATE
        end = self._pos + n
        size = len(self._ring)
        if end <= size:
            self._ring[self._pos : end] = 0.0 if x is None else x
        else:
            k = size - self._pos
            self._ring[self._pos :] = 0.0 if x is None else x[:k]
            self._ring[: n - k] = 0.0 if x is None else x[k:]
        self._pos = end % size

    @property
    def echo_possible(self) -> bool:
        """Whether the agent's voice may still be on its way back: it spoke within the longest
        round trip (the reply may have ended, its echo not yet)."""
        o = self.options
        return o.enabled and self._since_voiced_s <= o.max_delay_s + o.window_s

    @property
    def warming_up(self) -> bool:
        return self.played_s < self.options.aec_warmup_s

    def recent(self) -> np.ndarray:
        return np.concatenate([self._ring[self._pos :], self._ring[: self._pos]])

    def similarity(self, mic: np.ndarray) -> float | None:
        """Peak normalised cross-correlation of the microphone's latest ``window_s`` with the
        played audio, over delays 0..``max_delay_s``; 0 when nothing was played; None when the
        microphone is too quiet, or its audio too short, to tell."""
        o = self.options
        if self._quiet:
            return 0.0
        m = np.asarray(mic[-int(o.window_s * PIPELINE_RATE):], np.float32)
        m = m - m.mean()
        energy = float(np.dot(m, m))
        if len(m) < PIPELINE_RATE // 10 or energy < 1e-6:
            return None
        ref = self.recent()
        nfft = 1 << (len(ref) + len(m) - 1).bit_length()
        corr = np.fft.irfft(np.fft.rfft(ref, nfft) * np.conj(np.fft.rfft(m, nfft)), nfft)[: len(ref) - len(m) + 1]
        # Energy of each reference window the microphone window is compared with.
        c = np.concatenate([[0.0], np.cumsum(ref.astype(np.float64) ** 2)])
        ref_energy = c[len(m):] - c[: len(ref) - len(m) + 1]
        ok = ref_energy > 1e-6
        if not ok.any():
            return 0.0
        return float(np.max(np.abs(corr[ok]) / np.sqrt(ref_energy[ok] * energy)))

    def is_echo(self, mic: np.ndarray, undecided: bool = False) -> bool:
        """Whether ``mic`` is the agent's voice; ``undecided`` when the audio cannot tell (a
        pause between the agent's sentences, while the segment is still open)."""
        if not self.options.enabled:
            return False
        sim = self.similarity(mic)
        echo = undecided if sim is None else sim >= self.options.threshold
        self.detections += echo
        return echo
