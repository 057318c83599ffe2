"""Turn-taking options: when a turn ends, when talking over the agent counts as an interruption.

The defaults follow what people do in conversation and what the recordings in ../shared/speech
show (see pipeline/vad.py for the VAD figures).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .echo import EchoOptions


@dataclass(frozen=True)
class EndpointingOptions:
    """Semantic end of turn (``pipeline/endpointing.py``): the silence that ends a turn depends on
    whether the interim transcript reads as finished. The VAD's ``endpoint_silence_ms`` (the
    persona's, else the server's) is the base: the long wait is never shorter than it, and the
    short and middle ones never longer. ``bench/endpointing.py`` measured these defaults."""

    # Off: every turn ends after the VAD's fixed endpoint silence, as before.
    enabled: bool = True
    # The text reads as finished ("...last year.", "Yes" to a question): people leave 200-300 ms
    # between turns, so waiting longer only adds latency.
    complete_silence_ms: int = 250
    # The text stops on "and", "the", "um", a comma, "I think that": a pause to think, not the end.
    incomplete_silence_ms: int = 1200
    # No interim text yet, or none that says either way: the middle ground.
    unknown_silence_ms: int = 700
    # With a turn model (pipeline/turn_model.py): words that say neither way but sound unfinished
    # (its P(complete) below this) get the long wait. bench/endpointing.py: 0.5 takes the false
    # cut-offs from 26 to 10 of 119 at the same latency.
    audio_incomplete_below: float = 0.5
    # ...and a full stop that does not sound final (below this) only the middle one: for Whisper's
    # habit of ending a fragment with a stop. 0: off, the default, as a sentence end the model
    # misjudges (about a quarter of them in that bench) would then wait 450 ms longer.
    audio_veto_below: float = 0.0


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
    # A transcript has heard every word once its audio runs this far past the VAD's last voiced
    # window (the pause is then transcribed at once, and that decode reused as the final)...
    partial_reuse_margin_s: float = 0.1
    # ...or this far past the end of the sound itself (pipeline/vad.py ``Segmenter.sound_end``),
    # whichever comes first. Silero's probability lags the sound by 30-100 ms; the energy does not.
    # Three 32 ms windows (bench/endpointing.py): the pause is transcribed a median 148 ms after
    # the true end of speech instead of 230, at 1.49 decodes per utterance before its end instead
    # of 1.24 (stop consonants' closures: each a decode and maybe an LLM request in vain). Two
    # windows: 32 ms sooner, but in 9 such gaps instead of 2 over the 14 English recordings.
    pause_quiet_s: float = 0.096
    # The decode made when the silence began heard every word, with the final's model and options:
    # it is the final transcript, saving a whole decode per turn (~370 ms for whisper-tiny on 2
    # cores). Turn off for an STT whose finals are better than its partials (a cloud engine, or
    # partials from a smaller model): then the final is decoded again and the early reply kept
    # only if the words agree.
    reuse_interim_as_final: bool = True
    # Longest the agent waits for a reply to finish playing before it gives up on it.
    max_reply_s: float = 120.0
    stt_timeout_s: float = 30.0
    tts_timeout_s: float = 20.0
    endpointing: EndpointingOptions = field(default_factory=EndpointingOptions)
    # Start the LLM on the interim transcript as soon as the silence begins; the reply is played
    # only if the final transcript says the same words, else it is cancelled and restarted on the
    # final one. Costs an extra LLM request whenever the interim and final differ or the person
    # goes on talking (counted: ``Conversation.preemptive``, TurnMetrics.llm_discarded).
    preemptive_generation: bool = True
    # The agent's own voice leaking into the microphone is neither a barge-in nor a turn.
    echo: EchoOptions = field(default_factory=EchoOptions)
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
