"""The agent's outgoing audio: a queue of sentences played out in 20 ms frames on the transport's clock.

The transport pulls ``read_frame()`` once per 20 ms. Everything about *what was heard* is decided
here, at the moment a frame leaves: which sentence started playing, how far into it the person got
before interrupting, when the reply finished. That keeps the conversation history honest.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .frames import OUTPUT_FRAME_SAMPLES, OUTPUT_RATE
from .tts import Word

SILENCE = np.zeros(OUTPUT_FRAME_SAMPLES, np.int16)


@dataclass(slots=True)
class Segment:
    """One sentence of a reply. TTS appends audio while it plays; ``complete`` once synthesis ended."""

    reply_id: int
    text: str
    pcm: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))  # int16 at OUTPUT_RATE
    words: list[Word] = field(default_factory=list)  # start times from the sentence's first sample
    pos: int = 0
    complete: bool = False
    last: bool = False  # the reply's end marker: when it is reached, the reply was fully played

    def append(self, pcm: np.ndarray, words: list[Word] = ()) -> None:
        self.pcm = np.concatenate([self.pcm, pcm]) if len(self.pcm) else pcm
        self.words.extend(words)


@dataclass(slots=True)
class PlaybackListener:
    on_segment_start: Callable[[Segment], None]
    on_reply_start: Callable[[int], None]
    on_reply_end: Callable[[int], None]


class Player:
    def __init__(self, listener: PlaybackListener):
        self._queue: deque[Segment] = deque()
        self._listener = listener
        self._paused = False
        self._playing_reply: int | None = None
        self._heard: dict[int, list[str]] = {}  # reply id -> words heard so far
        self.frames_out = 0  # the audio clock, in frames
        self.underruns = 0  # frames of silence inside a reply, waiting for TTS
        # Called when audio arrives for an idle player: the transport may send its next frame now
        # instead of at its next 20 ms slot (AgentVoiceTrack.wake).
        self.on_ready: Callable[[], None] | None = None

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def active_reply(self) -> int | None:
        return self._playing_reply

    @property
    def has_audio(self) -> bool:
        return any(len(s.pcm) > s.pos or s.last for s in self._queue)

    def push(self, segment: Segment) -> None:
        idle = not self._paused and self._playing_reply is None and not self.has_audio
        self._queue.append(segment)
        if idle and len(segment.pcm) and self.on_ready is not None:
            self.on_ready()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def read_frame(self) -> np.ndarray:
        """The next 20 ms of int16 mono 48 kHz audio (read-only); silence when idle or paused."""
        self.frames_out += 1
        if self._paused or (not self._queue and self._playing_reply is None):
            return SILENCE  # shared and never written: the idle path allocates nothing
        out = np.zeros(OUTPUT_FRAME_SAMPLES, np.int16)
        filled = 0
        while filled < OUTPUT_FRAME_SAMPLES and self._queue:
            seg = self._queue[0]
            if seg.pos == 0 and len(seg.pcm):
                if self._playing_reply != seg.reply_id:
                    self._playing_reply = seg.reply_id
                    self._listener.on_reply_start(seg.reply_id)
                if seg.text:
                    self._listener.on_segment_start(seg)
            n = min(OUTPUT_FRAME_SAMPLES - filled, len(seg.pcm) - seg.pos)
            out[filled : filled + n] = seg.pcm[seg.pos : seg.pos + n]
            seg.pos += n
            filled += n
            if seg.pos < len(seg.pcm):
                continue
            if not seg.complete:
                break  # the TTS is still producing this sentence
            self._queue.popleft()
            heard = self._heard.setdefault(seg.reply_id, [])
            heard.extend([w.text for w in seg.words] if seg.words else seg.text.split())
            if seg.last:
                self._playing_reply = None
                self._listener.on_reply_end(seg.reply_id)
                if filled:
                    break  # the next reply starts on a fresh frame
        if filled < OUTPUT_FRAME_SAMPLES and self._playing_reply is not None:
            self.underruns += 1
        return out

    def heard_text(self, reply_id: int) -> str:
        """The words of ``reply_id`` that have left the speaker, including the sentence in progress."""
        words = list(self._heard.get(reply_id, []))
        if self._queue and self._queue[0].reply_id == reply_id and self._queue[0].pos > 0:
            # The sentence being played: words whose start has been heard.
            seg = self._queue[0]
            played_s = seg.pos / OUTPUT_RATE
            if seg.words:
                words.extend(w.text for w in seg.words if w.start < played_s)
            else:
                tokens = seg.text.split()
                words.extend(tokens[: int(len(tokens) * seg.pos / max(len(seg.pcm), 1))])
        return " ".join(words)

    def clear(self, reply_id: int | None = None) -> None:
        """Drop everything queued (barge-in): the next frame is silence."""
        self._queue.clear()
        self._paused = False
        if reply_id is not None:
            self._heard.pop(reply_id, None)
        if self._playing_reply is not None and (reply_id is None or reply_id == self._playing_reply):
            self._playing_reply = None

    def forget(self, reply_id: int) -> None:
        self._heard.pop(reply_id, None)

