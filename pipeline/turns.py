"""Turn-taking options: when a turn ends, when talking over the agent counts as an interruption.

The defaults follow what people do in conversation and what the recordings in ../shared/speech
show (see pipeline/vad.py for the VAD figures).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TurnOptions:
    # Speech over the agent shorter than this is a backchannel ("mm-hm"), a cough or a click:
    # playback pauses at its onset and resumes when it ends. Longer speech interrupts the reply.
    min_interruption_s: float = 0.35
    # After such a short sound, the paused reply resumes once the person has been quiet this long,
    # well before the VAD's endpoint silence closes the segment.
    backchannel_resume_s: float = 0.2
    # Re-decode the growing utterance this often (audio clock) for interim transcripts; 0 disables.
    partial_interval_s: float = 0.6
    # A partial that already covers the end of speech plus this margin is reused as the final.
    partial_reuse_margin_s: float = 0.1
    # Longest the agent waits for a reply to finish playing before it gives up on it.
    max_reply_s: float = 120.0
    stt_timeout_s: float = 30.0
    tts_timeout_s: float = 20.0
    llm_fallback_line: str = "Sorry, I couldn't think of an answer just now. Could you say that again?"


@dataclass(frozen=True)
class ConversationConfig:
    """What a persona decides for one conversation (the pipeline knows nothing else about personas)."""

    system_prompt: str = "You are a helpful conversation partner. Keep replies short and spoken."
    language: str | None = "en"  # None: let Whisper detect it
    stt_prompt: str | None = None  # vocabulary hints for Whisper
    voice: str | None = None  # TTS voice; None: the engine's voice for ``language``
    greeting: str | None = None  # spoken when the conversation starts
    # Silence that ends a turn, when the persona wants other than the server default: people
    # answering an interview question pause to think mid-answer.
    endpoint_silence_ms: int | None = None
