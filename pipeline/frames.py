"""The data that flows through the pipeline: audio frames in, events out.

Events are plain dataclasses. Each declares whether a barge-in discards it (``interruptible``):
anything describing the reply being spoken is dropped when the person talks over the agent,
while transcripts, state changes, metrics and errors always reach the client.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

import numpy as np

PIPELINE_RATE = 16_000  # what VAD and STT consume
OUTPUT_RATE = 48_000  # what transports play (WebRTC's native Opus rate)
FRAME_MS = 20
OUTPUT_FRAME_SAMPLES = OUTPUT_RATE * FRAME_MS // 1000  # 960


@dataclass(slots=True)
class AudioFrame:
    """Interleaved signed 16-bit PCM, as transports deliver it."""

    pcm: np.ndarray  # int16, shape (samples * channels,)
    sample_rate: int
    channels: int = 1

    @property
    def samples(self) -> int:
        return len(self.pcm) // self.channels

    @property
    def duration(self) -> float:
        return self.samples / self.sample_rate


class AgentState(str, Enum):
    LISTENING = "listening"
    USER_SPEAKING = "user_speaking"
    THINKING = "thinking"
    SPEAKING = "speaking"


@dataclass(slots=True)
class Event:
    interruptible: ClassVar[bool] = False
    at: float = field(default_factory=time.monotonic, kw_only=True)


@dataclass(slots=True)
class StateChanged(Event):
    state: AgentState
    previous: AgentState


@dataclass(slots=True)
class UserStartedSpeaking(Event):
    pass


@dataclass(slots=True)
class UserStoppedSpeaking(Event):
    pass


@dataclass(slots=True)
class Transcript(Event):
    text: str
    final: bool
    language: str | None = None
    typed: bool = False
    speech_s: float | None = None  # finals: how long the person spoke (first to last voiced window)
    pauses: list[float] = field(default_factory=list)  # finals: silences inside the utterance (s)
    audio: np.ndarray | None = field(default=None, repr=False)  # finals: the utterance, 16 kHz mono float32


@dataclass(slots=True)
class BotStartedSpeaking(Event):
    pass


@dataclass(slots=True)
class BotStoppedSpeaking(Event):
    interrupted: bool = False


@dataclass(slots=True)
class BotText(Event):
    """A clause of the reply: ``spoken=False`` when generated, ``True`` once its audio starts playing."""

    interruptible: ClassVar[bool] = True
    text: str
    spoken: bool
    tts_failed: bool = False  # shown as text only: the voice could not say it


@dataclass(slots=True)
class BotInterrupted(Event):
    """The person talked over the agent; ``spoken_text`` is what they actually heard."""

    spoken_text: str
    full_text: str


@dataclass(slots=True)
class BotTurnEnded(Event):
    """The agent's message as it entered the history: what was heard, and whether it was cut off."""

    text: str
    interrupted: bool = False


@dataclass(slots=True)
class Notice(Event):
    text: str


@dataclass(slots=True)
class ErrorEvent(Event):
    source: str  # "stt" | "llm" | "tts" | "pipeline"
    message: str
    fatal: bool = False


@dataclass(slots=True)
class TurnMetrics(Event):
    """Latencies of one turn, in milliseconds (None where a stage did not run)."""

    turn: int
    stt_ms: float | None = None  # end of speech -> final transcript
    llm_ttft_ms: float | None = None  # request -> first token
    tts_ttfb_ms: float | None = None  # first clause -> first audio
    voice_to_voice_ms: float | None = None  # end of speech -> first reply audio played
    pipeline_ms: float | None = None  # voice_to_voice minus the engines' own time
    endpoint_ms: float | None = None  # the silence that ended the turn (semantic end of turn's choice)
    preemptive: bool = False  # the reply was generated on the interim transcript, during that silence
    llm_discarded: int = 0  # preemptive LLM requests cancelled unheard since the previous reply
