"""The agent's own voice leaking back into the microphone (speakers, no or unconverged AEC) is
neither an interruption nor a turn; a person talking over it still interrupts.

The Driver's clock with a feedback loop: every input frame is what the agent played
``ECHO_DELAY`` frames earlier, attenuated (a speaker-to-microphone path), plus the person's voice
when a test has one. Real Silero, real espeak-ng audio, the real OpenAI protocol.
"""
from __future__ import annotations

import numpy as np

from driver import FRAME_16K, Driver, to_frames
from pipeline import frames as F
from pipeline.echo import EchoGuard, EchoOptions
from pipeline.frames import AudioFrame
from pipeline_setup import conversation, llm, whisper
from test_audio_vad import voiced_bounds

REPLY = ("The first thing I would like to hear about is the project you are most proud of. "
         "Please describe what you built and why it mattered to the people who used it.")
ECHO_DELAY = 9  # frames: 180 ms from the transport to the microphone and back
ECHO_GAIN = 0.5


def of(events, kind) -> list:
    return [e for e in events if isinstance(e, kind)]


async def agent_with_echo(tiny_whisper_path, fake_llm, event_log, speech, echo: EchoOptions,
                          person: np.ndarray | None = None, person_after_s: float = 1.5,
                          reply: str = REPLY, delay: int = ECHO_DELAY):
    fake_llm.script = [reply]
    fake_llm.behaviour.reply = "Understood."
    conv = conversation(whisper(tiny_whisper_path), llm(fake_llm.url), event_log, echo=echo)
    d = Driver(conv, event_log)
    await d.say(np.zeros(3200, np.float32))
    conv.push_text("Tell me about the role.")
    await d.run_until(lambda ev: of(ev, F.BotStartedSpeaking))
    start = d.frame
    voice = to_frames(person) if person is not None else []
    first_voice = start + int(person_after_s / 0.02)
    tail = None  # the echo keeps arriving for a round trip after the reply ends: run on 1 s more
    while (tail is None or d.frame < tail) and d.frame < start + 1500:
        if tail is None and of(event_log.events, F.BotStoppedSpeaking):
            tail = d.frame + 50
        played = d.out[d.frame - delay] if d.frame - delay >= 0 else np.zeros(960, np.int16)
        mic = np.repeat((played * ECHO_GAIN).astype(np.int16), 2)
        k = d.frame - first_voice
        if 0 <= k < len(voice):
            mic = np.clip(mic.astype(np.int32) + voice[k].pcm, -32768, 32767).astype(np.int16)
        await d.step(AudioFrame(mic, 48000, 2))
    return conv, d


async def test_the_agents_own_voice_leaking_back_is_not_an_interruption(tiny_whisper_path, fake_llm,
                                                                        event_log, speech):
    conv, d = await agent_with_echo(tiny_whisper_path, fake_llm, event_log, speech, EchoOptions())
    try:
        [stopped] = event_log.of(F.BotStoppedSpeaking)
        assert stopped.interrupted is False  # the whole reply played
        assert not event_log.of(F.BotInterrupted) and not event_log.of(F.UserStartedSpeaking)
        assert conv.echo.detections > 0  # the VAD did hear "speech": the echo guard turned it away
        assert [m["role"] for m in conv.history] == ["user", "assistant"]  # and no turn came of it
    finally:
        await conv.aclose()


async def test_an_echo_that_comes_back_after_a_short_reply_ended_is_not_a_turn(tiny_whisper_path, fake_llm,
                                                                               event_log, speech):
    """A round trip longer than the reply (0.9 s; the guard told to expect up to 1 s): the whole
    echo arrives once the agent is done, when no reply is playing any more, and must not become a
    turn the agent answers."""
    conv, d = await agent_with_echo(tiny_whisper_path, fake_llm, event_log, speech, EchoOptions(max_delay_s=1.0),
                                    reply="Okay.", delay=45)
    try:
        assert conv.echo.detections > 0
        assert not event_log.of(F.UserStartedSpeaking)
        assert [m["role"] for m in conv.history] == ["user", "assistant"]
    finally:
        await conv.aclose()


async def test_without_the_guard_the_same_echo_interrupts_the_agent(tiny_whisper_path, fake_llm, event_log, speech):
    """The control: the echo above is loud enough to fool a plain VAD barge-in."""
    conv, d = await agent_with_echo(tiny_whisper_path, fake_llm, event_log, speech, EchoOptions(enabled=False))
    try:
        assert event_log.of(F.BotInterrupted)
    finally:
        await conv.aclose()


async def test_a_person_talking_over_the_echo_still_interrupts(tiny_whisper_path, fake_llm, event_log, speech):
    utterance = speech("en_goforward.wav")
    start, end = voiced_bounds(utterance)
    conv, d = await agent_with_echo(tiny_whisper_path, fake_llm, event_log, speech, EchoOptions(),
                                    person=utterance[int(start * 16000): int(end * 16000)], person_after_s=2.5)
    try:
        [interrupted] = event_log.of(F.BotInterrupted)
        assert event_log.of(F.UserStartedSpeaking)
        assert conv.history[1]["interrupted"] is True
    finally:
        await conv.aclose()


def test_similarity_is_high_for_delayed_filtered_echo_and_low_for_another_voice(speech):
    guard = EchoGuard()
    agent = speech("en_birch_canoe.wav")[:16000]
    person = speech("en_goforward.wav")[8000:24000]
    x48 = np.repeat(agent, 3)  # what the transport played, at 48 kHz
    for i in range(0, len(x48) - 960 + 1, 960):
        guard.played((x48[i : i + 960] * 20000).astype(np.int16))
    delay = 2400  # 150 ms
    echo = 0.4 * np.convolve(agent, [0.6, 0.3, 0.1])[: len(agent)]  # a room's smoothing
    mic_echo = echo[len(agent) - 4800 - delay : len(agent) - delay]
    assert guard.similarity(mic_echo) > 0.8
    assert guard.similarity(person[:4800]) < 0.4
    assert guard.similarity(mic_echo + person[:4800]) < 0.6  # a voice over the echo is not echo
    assert EchoGuard().similarity(mic_echo) == 0.0  # nothing played yet
    assert guard.similarity(np.zeros(4800, np.float32)) is None  # silence cannot tell
