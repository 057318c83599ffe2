"""Whole turns through the real pipeline: Silero, tiny Whisper, the OpenAI protocol, espeak-ng."""
from __future__ import annotations

import numpy as np

from driver import Driver
from pipeline import frames as F
from pipeline_setup import conversation, llm, whisper


async def test_full_turn_yields_reply_audio_and_history_reaches_next_turn(tiny_whisper_path, fake_llm, event_log, speech):
    fake_llm.script = ["Nice to meet you. What is your name?", "Thanks, that is all."]
    conv = conversation(whisper(tiny_whisper_path), llm(fake_llm.url), event_log)
    d = Driver(conv, event_log)
    try:
        await d.say(np.zeros(8000, np.float32))
        await d.say(speech("en_birch_canoe.wav"), trailing_silence_s=0.8)
        await d.run_until(lambda ev: any(isinstance(e, F.BotStoppedSpeaking) for e in ev))
        finals = [e for e in event_log.of(F.Transcript) if e.final]
        assert len(finals) == 1 and finals[0].text
        spoken = [e.text for e in event_log.of(F.BotText) if e.spoken]
        assert " ".join(spoken) == "Nice to meet you. What is your name?"
        reply_audio = d.audio()
        assert np.abs(reply_audio).max() > 1000  # espeak's voice, not silence
        [m] = event_log.of(F.TurnMetrics)
        assert m.stt_ms is not None and m.llm_ttft_ms is not None and m.tts_ttfb_ms is not None
        assert m.voice_to_voice_ms > m.stt_ms

        await d.say(speech("en_goforward.wav"), trailing_silence_s=0.8)
        await d.run_until(lambda ev: len(ev_of(ev, F.BotStoppedSpeaking)) == 2)
        second = fake_llm.requests[1]["messages"]
        assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
        assert second[1]["content"] == finals[0].text
        assert second[2]["content"] == "Nice to meet you. What is your name?"
        assert conv.history[-1] == {"role": "assistant", "content": "Thanks, that is all."}
        states = [e.state for e in event_log.of(F.StateChanged)]
        assert states[:4] == [F.AgentState.USER_SPEAKING, F.AgentState.THINKING, F.AgentState.SPEAKING,
                              F.AgentState.LISTENING]
    finally:
        await conv.aclose()
    assert not conv._tasks


def ev_of(events, kind):
    return [e for e in events if isinstance(e, kind)]


async def test_the_reply_starts_without_the_tts_engines_leading_silence(fake_llm, event_log):
    """espeak-ng opens "Good." with 13 ms of silence: the first sentence is heard within the 5 ms
    lead-in kept before its onset."""
    fake_llm.script = ["Good. Tell me more."]
    conv = conversation(None, llm(fake_llm.url), event_log)
    d = Driver(conv, event_log)
    try:
        conv.push_text("I finished the project early.")
        await d.run_until(lambda ev: any(isinstance(e, F.BotStoppedSpeaking) for e in ev))
        start = event_log.frame_of(event_log.of(F.BotStartedSpeaking)[0]) * 960
        audible = np.flatnonzero(np.abs(d.audio().astype(np.int32)) > 104)
        assert 0 <= audible[0] - start <= 240 + 48
    finally:
        await conv.aclose()
