"""Voice activity detection: Silero (ONNX) and the speech segmenter built on it.

One ONNX session per process is shared by every conversation (``onnxruntime`` sessions are safe to
run concurrently); each conversation keeps only its recurrent state and 64-sample context.

Defaults, measured on ../shared/speech with ``bench/vad_defaults.py``:
- ``threshold=0.5``: Silero's own default; speech frames in the recordings sit at 0.9+, noise at < 0.2.
- ``endpoint_silence_ms=500``: at 100 ms the German and French readings split at their commas; from
  300 ms on every ordinary utterance is one segment. 500 ms leaves room for the pauses people make
  while thinking through an answer; only oratory (JFK's 0.7-1 s pauses) still splits, as it should.
- ``min_speech_ms=100``: shorter bursts (clicks, taps) are never turns.
- ``pre_roll_ms=300``: Silero needs two or three windows to cross the threshold; keeping 300 ms
  before the trigger puts the segment start within one window of the true onset.

Silero's probability lags the sound: it stays over the hysteresis threshold for one to three
windows (30-100 ms) after the last word has physically ended. ``Segmenter.sound_end`` tracks the end
of the sound itself (a window's energy against the utterance's loud part and the noise floor) so
that the caller can transcribe a pause as soon as the sound is over, without waiting out that lag.
"""
from __future__ import annotations

import importlib.util
import math
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .frames import PIPELINE_RATE

WINDOW = 512  # Silero's window at 16 kHz: 32 ms
CONTEXT = 64
WINDOW_S = WINDOW / PIPELINE_RATE
_SR = np.array(PIPELINE_RATE, np.int64)


@lru_cache(maxsize=1)
def _session():
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    # Each conversation calls this 31 times a second with a tiny input: thread pools cost more
    # than they save, and many rooms share the cores anyway.
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    # Located, not imported: importing the silero_vad package imports torch (1.5 s, ~200 MB) for
    # nothing, since this path only needs the ONNX file it ships.
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("silero-vad is not installed")
    path = Path(spec.submodule_search_locations[0]) / "data" / "silero_vad.onnx"
    return onnxruntime.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class SileroVAD:
    """Speech probability per 512-sample window; holds one stream's recurrent state."""

    def __init__(self) -> None:
        self._session = _session()
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), np.float32)
        # The model's input: the previous window's last 64 samples, then the new window. One buffer
        # per stream, rewritten in place: this runs 31 times a second in every room.
        self._x = np.zeros((1, CONTEXT + WINDOW), np.float32)

    def __call__(self, window: np.ndarray) -> float:
        x = self._x
        x[0, :CONTEXT] = x[0, WINDOW:]
        x[0, CONTEXT:] = window
        out, self._state = self._session.run(None, {"input": x, "state": self._state, "sr": _SR})
        return float(out[0][0])


@dataclass(frozen=True)
class VADOptions:
    threshold: float = 0.5
    # Hysteresis: once speaking, stay speaking until the probability falls below this.
    neg_threshold: float | None = None  # default threshold - 0.15
    min_speech_ms: int = 100
    endpoint_silence_ms: int = 500
    pre_roll_ms: int = 300
    max_segment_s: float = 30.0  # Whisper's window; longer speech is cut into turns

    @property
    def off_threshold(self) -> float:
        return self.neg_threshold if self.neg_threshold is not None else max(self.threshold - 0.15, 0.01)


@dataclass(slots=True)
class SpeechStart:
    t: float  # stream time (s) of the segment start, pre-roll included
    onset: float = 0.0  # stream time (s) of the first voiced window (no pre-roll)


@dataclass(slots=True)
class SpeechEnd:
    t: float  # stream time (s) of the last voiced window's end
    audio: np.ndarray  # the whole segment, pre-roll included, 16 kHz float32
    start: float
    onset: float = 0.0  # first voiced window: ``t - onset`` is how long the person spoke
    pauses: list[float] = field(default_factory=list)  # silences inside the utterance, >= MIN_PAUSE_S
    sound_end: float = 0.0  # stream time (s) where the last sound ended (Segmenter.sound_end)

    @property
    def speech_s(self) -> float:
        return max(self.t - self.onset, 0.0)


MIN_PAUSE_S = 0.25  # shorter gaps are just the rhythm of speech

# A window still sounds (a soft final consonant, the end of a vowel) while its energy is within
# SOUND_RANGE_DB of the utterance's loudest voiced window and SOUND_OVER_FLOOR_DB over the noise
# floor; below both it is room noise, whatever Silero's lagging probability says.
SOUND_RANGE_DB = 40.0
SOUND_OVER_FLOOR_DB = 6.0
FLOOR_BELOW_LOUD_DB = 25.0
_FLOOR_MIN_DB = -80.0  # a muted microphone's digital silence must not make every hiss "sound"
# Minimum tracking between utterances: the floor drops to any quieter window at once and rises by
# at most this much per 32 ms window (30 dB a second: a room that got noisier is learnt within a
# second; the ~100 ms of speech before Silero's trigger raise it by 3 dB at most).
_FLOOR_RISE_DB = 2.0
_FLOOR_MIN_WINDOWS = 8  # a floor is trusted once learnt from 256 ms of non-speech


def heard_by(last_voiced: float, sound_end: float, margin_s: float, quiet_s: float) -> float:
    """The stream time by which a transcript has heard every word of the utterance so far: the
    sound has been quiet for ``quiet_s``, or Silero for ``margin_s`` (the noisy room where the
    energy never falls back to the floor), whichever comes first."""
    return min(last_voiced + margin_s, sound_end + quiet_s)


def window_db(window: np.ndarray) -> float:
    return 10.0 * float(np.log10(float(np.dot(window, window)) / len(window) + 1e-10))


class Segmenter:
    """Turns a 16 kHz stream into speech segments.

    ``feed`` returns the events that the new samples completed. ``speaking`` and ``segment_audio``
    let the caller read the growing utterance for interim transcripts.
    """

    def __init__(self, options: VADOptions | None = None, vad: SileroVAD | None = None):
        self.options = options or VADOptions()
        self.vad = vad or SileroVAD()
        self._pending = np.zeros(0, np.float32)
        self._t = 0.0  # stream time at the start of ``_pending``
        roll = int(self.options.pre_roll_ms / 1000 / WINDOW_S) + 1
        self._pre_roll: deque[np.ndarray] = deque(maxlen=roll)
        self._segment: list[np.ndarray] = []
        self._speaking = False
        self._voiced_run = 0  # consecutive voiced windows while not yet speaking
        self._silent_run = 0
        self._start_t = 0.0
        self._onset_t = 0.0
        self._pauses: list[float] = []
        self._last_voiced_end = 0.0
        self._sound_end = 0.0
        self._loud_db = -200.0  # the utterance's loudest voiced window
        self._floor_db = math.inf  # noise floor, learnt between utterances
        self._floor_windows = 0  # how many windows it was learnt from (trusted from _FLOOR_MIN_WINDOWS)
        self.last_probability = 0.0
        # The caller's endpoint for the segment in progress (semantic end of turn decides it from
        # the words; this class never sees them); None: ``options.endpoint_silence_ms``. Cleared
        # when the segment ends.
        self.endpoint_ms: int | None = None

    @property
    def speaking(self) -> bool:
        return self._speaking

    @property
    def now(self) -> float:
        return self._t + len(self._pending) / PIPELINE_RATE

    @property
    def voiced_s(self) -> float:
        """While speaking: seconds from the first voiced window to the end of the last one (pauses
        included, the trailing silence not): how long the person has actually been talking."""
        return self._last_voiced_end - self._onset_t if self._speaking else 0.0

    @property
    def sound_end(self) -> float:
        """While speaking: the end of the last window that still sounded (over the noise floor,
        near the utterance's loudness, and speech to Silero or straight on from the sound before):
        earlier than the last voiced window when only Silero's lag kept it voiced, later on a soft
        final consonant Silero already let go of. Silero's own end until a floor is learnt."""
        return self._sound_end if self._speaking else 0.0

    @property
    def silence_s(self) -> float:
        """While speaking: how long since the last voiced window ended."""
        return self.now - self._last_voiced_end if self._speaking else 0.0

    def segment_audio(self) -> np.ndarray:
        return np.concatenate(self._segment) if self._segment else np.zeros(0, np.float32)

    def reset(self) -> None:
        self.vad.reset()
        self._pre_roll.clear()
        self._segment = []
        self._speaking = False
        self._voiced_run = self._silent_run = 0

    def feed(self, samples: np.ndarray) -> list[SpeechStart | SpeechEnd]:
        events: list[SpeechStart | SpeechEnd] = []
        buf = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        n = len(buf) // WINDOW
        for i in range(n):
            window = buf[i * WINDOW : (i + 1) * WINDOW]
            t0 = self._t + i * WINDOW_S
            ev = self._step(window, t0)
            if ev is not None:
                events.append(ev)
        self._pending = buf[n * WINDOW :].copy()
        self._t += n * WINDOW_S
        return events

    def _step(self, window: np.ndarray, t0: float) -> SpeechStart | SpeechEnd | None:
        o = self.options
        p = self.vad(window)
        self.last_probability = p
        db = window_db(window)
        min_speech = max(1, round(o.min_speech_ms / 1000 / WINDOW_S))
        endpoint_ms = o.endpoint_silence_ms if self.endpoint_ms is None else self.endpoint_ms
        endpoint = max(1, round(endpoint_ms / 1000 / WINDOW_S))
        if not self._speaking:
            if p < o.off_threshold:
                self._floor_db = min(max(db, _FLOOR_MIN_DB), self._floor_db + _FLOOR_RISE_DB)
                self._floor_windows += 1
            self._pre_roll.append(window)
            self._voiced_run = self._voiced_run + 1 if p >= o.threshold else 0
            if self._voiced_run >= min_speech:
                self._speaking = True
                self._silent_run = 0
                self._segment = list(self._pre_roll)
                self._pre_roll.clear()
                self._start_t = t0 + WINDOW_S - len(self._segment) * WINDOW_S
                self._onset_t = t0 + WINDOW_S - self._voiced_run * WINDOW_S
                self._pauses = []
                self._last_voiced_end = self._sound_end = t0 + WINDOW_S
                self._loud_db = max(window_db(w) for w in self._segment[-self._voiced_run:])
                return SpeechStart(self._start_t, self._onset_t)
            return None
        self._segment.append(window)
        if p >= o.threshold:
            self._loud_db = max(self._loud_db, db)
        # No floor learnt yet (the stream started mid-word): no way to tell a soft last consonant
        # from the room, so the sound lasts as long as Silero says. A floor learnt from loud noise
        # must not hide the words themselves: it is held FLOOR_BELOW_LOUD_DB under the voice.
        if self._floor_windows < _FLOOR_MIN_WINDOWS:
            sounding = p >= o.off_threshold
        else:
            floor = min(self._floor_db, self._loud_db - FLOOR_BELOW_LOUD_DB)
            # Loud enough, and speech to Silero or carrying on the sound before (the final
            # consonant Silero already let go of, flickering over noise: a window's gap allowed):
            # a lone click or breath later in a pause adds no words.
            sounding = (db >= max(floor + SOUND_OVER_FLOOR_DB, self._loud_db - SOUND_RANGE_DB)
                        and (p >= o.off_threshold or t0 - self._sound_end <= WINDOW_S + 1e-6))
        if sounding:
            self._sound_end = t0 + WINDOW_S
        if p >= o.off_threshold:
            if self._silent_run * WINDOW_S >= MIN_PAUSE_S:
                self._pauses.append(round(self._silent_run * WINDOW_S, 3))
            self._silent_run = 0
            self._last_voiced_end = t0 + WINDOW_S
        else:
            self._silent_run += 1
        too_long = len(self._segment) * WINDOW_S >= o.max_segment_s
        if self._silent_run >= endpoint or too_long:
            # Keep 300 ms after the last voiced window: Silero's probability drops during soft final
            # fricatives ("meters") that Whisper still needs to hear.
            keep = len(self._segment) - max(self._silent_run - 10, 0)
            audio = np.concatenate(self._segment[:keep])
            self._speaking = False
            self._voiced_run = self._silent_run = 0
            self._segment = []
            self.endpoint_ms = None
            pauses, self._pauses = self._pauses, []
            return SpeechEnd(self._last_voiced_end, audio, self._start_t, self._onset_t, pauses, self._sound_end)
        return None
