"""An STT that says what the test scripts, through the real ``STT`` protocol.

For turn-taking logic that depends on words: the tiny test Whisper's text is random, and a real
model's interim and final transcripts differ only when they happen to. ``partial_text`` answers
interim decodes (a test may change it between utterances), ``final_text`` the final one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.frames import PIPELINE_RATE
from pipeline.stt import STTResult


@dataclass
class ScriptedSTT:
    partial_text: str
    final_text: str
    calls: list[tuple[bool, float, str]] = field(default_factory=list)  # (final, seconds of audio, text)
    urgent: list[bool] = field(default_factory=list)  # each call's urgency

    async def transcribe(self, audio: np.ndarray, *, final: bool, language: str | None = None,
                         prompt: str | None = None, urgent: bool = False) -> STTResult:
        seconds = len(audio) / PIPELINE_RATE
        text = self.final_text if final else self.partial_text
        self.calls.append((final, seconds, text))
        self.urgent.append(urgent)
        return STTResult(text, language or "en", 0.0, 0.0, seconds, 0.0)
