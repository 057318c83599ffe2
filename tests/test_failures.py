"""Failures of the engines, typed input and closing: the conversation always says something and goes on."""
from __future__ import annotations

import shutil
import socket

import numpy as np
import pytest

from driver import Driver
from fake_llm import Behaviour, FakeLLM
from pipeline import frames as F
from pipeline.stt import WhisperOptions, WhisperSTT
from pipeline.tts import EdgeTTS, EspeakTTS, FallbackTTS
from pipeline.turns import TurnOptions
from pipeline_setup import conversation, llm, whisper
from test_bargein import LONG_REPLY, of

FALLBACK = TurnOptions().llm_fallback_line


def free_port() -> int:
    """A loopback port nobody listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stopped(n: int):
    return lambda ev: len(of(ev, F.BotStoppedSpeaking)) >= n


def listening_again(ev) -> bool:
    return any(isinstance(e, F.StateChanged) and e.state is F.AgentState.LISTENING for e in ev)


@pytest.mark.parametrize("failure, message", [
    ("http-500", "HTTP 500"),
    ("connection-refused", "connection failed"),
    ("first-token-timeout", "timed out"),
])
async def test_llm_failure_speaks_the_fallback_line_and_the_next_turn_works(failure, message, fake_llm, event_log):
    server = fake_llm
    if failure == "connection-refused":
        server = FakeLLM(port=free_port())  # started only once the failure has been seen
        server.url = f"http://127.0.0.1:{server.port}/v1"
    elif failure == "http-500":
        fake_llm.behaviour = Behaviour(status=500)
    else:
        fake_llm.behaviour = Behaviour(hang=True)
    conv = conversation(None, llm(server.url, first_token_timeout_s=0.5, retries=1), event_log)
    d = Driver(conv, event_log)
    try:
        conv.push_text("Hello, shall we start?")
        await d.run_until(stopped(1))
        [error] = event_log.of(F.ErrorEvent)
        assert error.source == "llm" and not error.fatal
        assert error.message == f"the language model is unavailable ({message})"
        said = [e for e in event_log.of(F.BotText)]
        assert [(e.text, e.spoken) for e in said] == [(FALLBACK, False), (FALLBACK, True)]
        assert event_log.events.index(error) < event_log.events.index(said[0])
        assert np.abs(d.audio()).max() > 1000  # the fallback line was spoken, not only shown
        if failure != "connection-refused":
            assert len(fake_llm.requests) == 2  # one retry, then the fallback
        assert conv.history == [{"role": "user", "content": "Hello, shall we start?"},
                                {"role": "assistant", "content": FALLBACK}]

        # The model is back: the next turn gets a real answer.
        if failure == "connection-refused":
            await server.start()
        server.behaviour = Behaviour(reply="Yes, let us begin.")
        conv.push_text("Are you there?")
        await d.run_until(stopped(2))
        assert [e.text for e in event_log.of(F.BotText) if e.spoken][-1] == "Yes, let us begin."
        assert conv.history[-1] == {"role": "assistant", "content": "Yes, let us begin."}
        assert server.requests[-1]["messages"][1:] == [
            {"role": "user", "content": "Hello, shall we start?"},
            {"role": "assistant", "content": FALLBACK},
            {"role": "user", "content": "Are you there?"},
        ]
        assert len(event_log.of(F.ErrorEvent)) == 1
    finally:
        await conv.aclose()
        if server is not fake_llm:
            await server.stop()
    assert not conv._tasks


def broken_espeak(path: str = "/nonexistent/espeak-ng") -> EspeakTTS:
    tts = EspeakTTS()
    tts.binary = path
    return tts


@pytest.mark.parametrize("engine", ["espeak-missing", "fallback-both-fail"])
async def test_tts_failure_shows_the_text_and_the_next_turn_is_spoken(engine, fake_llm, event_log):
    espeak = broken_espeak()
    tts = espeak if engine == "espeak-missing" else FallbackTTS(broken_espeak("/nonexistent/primary"), espeak)
    fake_llm.script = ["Here is my first answer. It has two sentences.", "And this one is spoken."]
    conv = conversation(None, llm(fake_llm.url), event_log, tts=tts)
    d = Driver(conv, event_log)
    try:
        conv.push_text("Hello?")
        await d.run_until(listening_again)
        errors = event_log.of(F.ErrorEvent)
        assert [e.source for e in errors] == ["tts", "tts"]  # one per sentence; no crashed reply
        assert all(e.message.startswith("speech synthesis failed") and "/nonexistent/espeak-ng" in e.message
                   for e in errors)
        shown = [e.text for e in event_log.of(F.BotText) if not e.spoken]
        assert "Here is my first answer." in shown and "It has two sentences." in shown
        assert not [e for e in event_log.of(F.BotText) if e.spoken]
        assert not event_log.of(F.BotStartedSpeaking)
        assert not any(f.any() for f in d.out)
        assert conv.history[-1] == {"role": "assistant", "content": "Here is my first answer. It has two sentences."}

        espeak.binary = shutil.which("espeak-ng")  # the voice is back
        conv.push_text("Can you hear me now?")
        await d.run_until(stopped(1))
        assert [e.text for e in event_log.of(F.BotText) if e.spoken] == ["And this one is spoken."]
        assert np.abs(d.audio()).max() > 1000
        assert len(event_log.of(F.ErrorEvent)) == 2
    finally:
        await conv.aclose()
    assert not conv._tasks


async def test_edge_tts_offline_falls_back_to_espeak(fake_llm, event_log):
    tts = FallbackTTS(EdgeTTS(connect_timeout_s=3.0), EspeakTTS())
    fake_llm.behaviour.reply = "Hello from whichever voice works."
    conv = conversation(None, llm(fake_llm.url), event_log, tts=tts)
    d = Driver(conv, event_log)
    try:
        conv.push_text("Hi!")
        await d.run_until(stopped(1))
        assert [e.text for e in event_log.of(F.BotText) if e.spoken] == ["Hello from whichever voice works."]
        assert np.abs(d.audio()).max() > 1000
        assert not event_log.of(F.ErrorEvent)  # the fallback hid the outage from the person
        if tts.last_error is not None:  # no network here: edge-tts failed and espeak spoke
            assert "edge-tts" in tts.last_error
    finally:
        await conv.aclose()


async def test_stt_failure_is_reported_and_the_conversation_keeps_listening(tmp_path, fake_llm, event_log, speech):
    broken = WhisperSTT(WhisperOptions(model=str(tmp_path), device="cpu"))  # no model.bin: cannot load
    conv = conversation(broken, llm(fake_llm.url), event_log)
    d = Driver(conv, event_log)
    try:
        await d.say(np.zeros(4000, np.float32))
        await d.say_with_partials(speech("en_goforward.wav"), trailing_silence_s=0.8)
        error = await event_log.wait_for(lambda ev: next((e for e in of(ev, F.ErrorEvent) if e.source == "stt"), None))
        assert error.message.startswith("speech recognition failed: cannot load Whisper model")
        await event_log.wait_for(lambda ev: listening_again(ev[ev.index(error):]))
        assert not fake_llm.requests and not conv.history
        conv.push_text("Let me type instead.")
        await d.run_until(stopped(1))
        assert conv.history[-1]["role"] == "assistant"
        # Reported once, as the engine's failure: the failed interim decodes stayed quiet.
        assert [e.source for e in event_log.of(F.ErrorEvent)] == ["stt"]
    finally:
        await conv.aclose()
        broken.close()


async def test_typed_text_interrupts_a_speaking_agent(tiny_whisper_path, fake_llm, event_log):
    fake_llm.script = [LONG_REPLY, "Sure, go ahead."]
    conv = conversation(whisper(tiny_whisper_path), llm(fake_llm.url), event_log)
    d = Driver(conv, event_log)
    try:
        conv.push_text("Tell me about the role.")
        await d.run_until(lambda ev: of(ev, F.BotStartedSpeaking))
        started = d.frame
        await d.run_until(lambda ev: d.frame >= started + 60)
        assert d.out[-5:] and any(f.any() for f in d.out[-5:])
        typed_at = d.frame
        conv.push_text("Sorry, can I ask something first?")
        await d.run_until(stopped(2))

        [interrupted] = event_log.of(F.BotInterrupted)
        assert event_log.frame_of(interrupted) == typed_at
        first, second = event_log.of(F.BotStoppedSpeaking)
        assert first.interrupted and not second.interrupted
        # Not one more word of the old reply: everything spoken from then on is the new one.
        assert [e.text for e, f in zip(event_log.events, event_log.frames)
                if isinstance(e, F.BotText) and e.spoken and f >= typed_at] == ["Sure, go ahead."]
        heard = conv.history[1]
        assert heard["interrupted"] and LONG_REPLY.startswith(heard["content"]) and heard["content"] != LONG_REPLY
        assert [t.text for t in event_log.of(F.Transcript) if t.typed] == [
            "Tell me about the role.", "Sorry, can I ask something first?"]
        assert conv.history[2:] == [{"role": "user", "content": "Sorry, can I ask something first?"},
                                    {"role": "assistant", "content": "Sure, go ahead."}]
        assert fake_llm.requests[1]["messages"][2] == {"role": "assistant", "content": heard["content"]}
    finally:
        await conv.aclose()


async def test_aclose_mid_reply_leaves_no_tasks_and_keeps_the_partial_reply(tiny_whisper_path, fake_llm, event_log):
    fake_llm.behaviour = Behaviour(reply=LONG_REPLY, token_delay_s=0.01)  # still generating while it speaks
    conv = conversation(whisper(tiny_whisper_path), llm(fake_llm.url), event_log)
    d = Driver(conv, event_log)
    conv.push_text("Tell me about the role.")
    await d.run_until(lambda ev: of(ev, F.BotStartedSpeaking))
    started = d.frame
    await d.run_until(lambda ev: d.frame >= started + 40)
    assert conv._tasks  # the reply is still being generated, synthesized and played
    await conv.aclose()
    assert not conv._tasks
    entry = conv.history[-1]
    assert entry["role"] == "assistant" and entry["interrupted"] is True
    assert 0 < len(entry["content"]) < len(LONG_REPLY) and LONG_REPLY.startswith(entry["content"])
    assert not conv.read_frame().any()  # nothing left to play
    conv.push_text("Are you still there?")  # ignored once closed
    assert conv.history[-1] is entry and len(fake_llm.requests) == 1
