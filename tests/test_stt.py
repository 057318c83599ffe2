"""Speech-to-text: faster-whisper on the suite's tiny Whisper through WhisperSTT, and the decode scheduler."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from faster_whisper import WhisperModel

from driver import Driver
from pipeline import frames as F
from pipeline.conversation import Conversation
from pipeline.stt import STTResult, WhisperOptions, WhisperSTT, _Scheduler, shared_whisper
from pipeline.tts import EspeakTTS
from pipeline.turns import ConversationConfig, TurnOptions
from pipeline_setup import llm, whisper
from test_audio_vad import voiced_bounds


async def test_tiny_whisper_loads_and_decodes_through_faster_whisper(tiny_whisper_path, speech):
    stt = whisper(tiny_whisper_path)
    audio = speech("en_birch_canoe.wav")
    result = await stt.transcribe(audio, final=True, language="en")
    assert isinstance(stt.load(), WhisperModel)  # the real faster-whisper model class, loaded once
    assert stt.load() is stt.load()
    assert result.text  # random weights: garbage, but decoded tokens
    assert result.language == "en"
    assert result.decode_ms > 0
    assert result.duration == pytest.approx(len(audio) / 16000)
    assert -np.inf < result.avg_logprob < 0 and 0 <= result.no_speech_prob <= 1


async def test_shared_whisper_is_one_engine_per_options(tiny_whisper_path):
    a = shared_whisper(WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=12))
    b = whisper(tiny_whisper_path)  # what every test conversation uses: equal options, built separately
    assert a is b
    other = shared_whisper(WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=5))
    assert other is not a
    assert shared_whisper(WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=5)) is other


async def test_language_is_passed_through_or_detected(tiny_whisper_path, speech):
    stt = whisper(tiny_whisper_path)
    audio = speech("fr_picovoice_cv.wav")
    assert (await stt.transcribe(audio, final=True, language="fr")).language == "fr"
    assert (await stt.transcribe(audio, final=True, language="de")).language == "de"
    detected = await stt.transcribe(audio, final=True, language=None)
    assert isinstance(detected.language, str) and len(detected.language) in (2, 3)  # Whisper's language id


@pytest.mark.parametrize("audio", [
    np.zeros(0, np.float32),  # nothing
    np.zeros(16000, np.float32),  # a second of digital silence
    np.full(16000, 1e-4, np.float32),  # a second far below speech level (-80 dBFS)
    None,  # 0.2 s of real speech: shorter than min_audio_s
], ids=["empty", "silent", "very-quiet", "very-short"])
async def test_empty_short_and_silent_audio_give_empty_text_without_decoding(audio, speech, tmp_path):
    if audio is None:
        x = speech("en_birch_canoe.wav")
        onset, _ = voiced_bounds(x)
        audio = x[int(onset * 16000) : int(onset * 16000) + 3200]
    # An engine whose model cannot even load: any decode attempt would raise.
    stt = WhisperSTT(WhisperOptions(model=str(tmp_path), device="cpu"))
    try:
        for final in (True, False):
            result = await stt.transcribe(audio, final=final, language="en")
            assert isinstance(result, STTResult)
            assert result.text == "" and result.decode_ms == 0.0 and result.language == "en"
        assert stt._model is None
    finally:
        stt.close()


async def test_model_that_cannot_load_fails_with_a_clear_error(tmp_path, speech):
    stt = WhisperSTT(WhisperOptions(model=str(tmp_path), device="cpu"))
    try:
        with pytest.raises(RuntimeError, match="cannot load Whisper model"):
            await stt.transcribe(speech("en_goforward.wav"), final=True)
        # The failure freed the decode slot: the next request fails the same way instead of hanging.
        with pytest.raises(RuntimeError, match="cannot load Whisper model"):
            await asyncio.wait_for(stt.transcribe(speech("en_goforward.wav"), final=True), 10)
    finally:
        stt.close()


async def test_partials_while_speaking_then_one_final(tiny_whisper_path, fake_llm, event_log, speech):
    fake_llm.behaviour.reply = "Merci."
    conv = Conversation(stt=whisper(tiny_whisper_path), llm=llm(fake_llm.url), tts=EspeakTTS(), emit=event_log,
                        config=ConversationConfig(language="fr"),
                        turn_options=TurnOptions(partial_interval_s=0.5), name="test")
    d = Driver(conv, event_log)
    try:
        await d.say(np.zeros(8000, np.float32))
        await d.say_with_partials(speech("en_LDC93S1_timit.wav"), trailing_silence_s=0.8)  # 2.9 s, one utterance
        await d.run_until(lambda ev: any(isinstance(e, F.BotStoppedSpeaking) for e in ev))
        transcripts = event_log.of(F.Transcript)
        partials = [t for t in transcripts if not t.final]
        finals = [t for t in transcripts if t.final]
        assert len(finals) == 1 and finals[0].text
        assert len(partials) >= 3, transcripts  # ~0.5 s apart over a 2.9 s utterance
        assert all(t.text for t in partials)
        assert transcripts.index(finals[0]) == len(transcripts) - 1  # every partial came before the final
        assert {t.language for t in transcripts} == {"fr"}  # the conversation's language reached Whisper
        # Partials are only shown while the person speaks: all between the start and stop events.
        started = event_log.events.index(event_log.of(F.UserStartedSpeaking)[0])
        stopped = event_log.events.index(event_log.of(F.UserStoppedSpeaking)[0])
        assert all(started < event_log.events.index(t) < stopped for t in partials)
        assert fake_llm.requests[0]["messages"][-1] == {"role": "user", "content": finals[0].text}
    finally:
        await conv.aclose()
    assert not conv._tasks


# ---------------------------------------------------------------------- the decode scheduler


async def _queue(scheduler: _Scheduler, name: str, final: bool, order: list[str], deadline: float | None = None):
    """Start a waiter and let it reach the queue (one loop iteration, no timing involved)."""

    async def waiter():
        granted = await scheduler.acquire(final, deadline)
        order.append(name if granted else f"{name}:dropped")
        if granted:
            scheduler.release()  # the "decode" is instant: pass the slot on

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    return task


async def test_scheduler_serves_finals_first_then_newest_partials():
    s, order = _Scheduler(), []
    assert await s.acquire(final=False, deadline=None)  # free: granted at once
    tasks = [await _queue(s, "p1", False, order), await _queue(s, "f1", True, order),
             await _queue(s, "p2", False, order), await _queue(s, "f2", True, order)]
    assert s.queued == 4 and not order
    s.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    # Finals in arrival order; then partials newest first (an older partial is superseded anyway).
    assert order == ["f1", "f2", "p2", "p1"]
    assert s.queued == 0 and await s.acquire(final=True, deadline=None)  # the slot is free again


async def test_scheduler_drops_partials_past_their_deadline():
    s, order = _Scheduler(), []
    assert await s.acquire(final=True, deadline=None)
    # Already past its deadline while the slot is busy: dropped at once, not queued.
    assert await s.acquire(final=False, deadline=time.monotonic()) is False
    assert s.queued == 0
    fresh = await _queue(s, "fresh", False, order, deadline=time.monotonic() + 60)
    final = await _queue(s, "final", True, order)
    s.release()
    await asyncio.wait_for(asyncio.gather(fresh, final), 5)
    assert order == ["final", "fresh"]


async def test_scheduler_passes_on_a_slot_granted_to_a_cancelled_waiter():
    s, order = _Scheduler(), []
    assert await s.acquire(final=True, deadline=None)
    gone = await _queue(s, "gone", True, order)
    after = await _queue(s, "after", False, order)
    s.release()  # grants "gone", which is cancelled before it can run
    gone.cancel()
    await asyncio.wait_for(asyncio.gather(gone, after, return_exceptions=True), 5)
    assert gone.cancelled() and order == ["after"]
    assert await s.acquire(final=True, deadline=None)


async def test_stale_partial_is_dropped_by_a_busy_engine(tiny_whisper_path, speech):
    stt = WhisperSTT(WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=12,
                                    partial_deadline_s=0.0))
    try:
        audio = speech("en_goforward.wav")
        final = asyncio.create_task(stt.transcribe(audio, final=True, language="en"))
        await asyncio.sleep(0)  # one iteration: the final holds the decode slot
        assert await stt.transcribe(audio, final=False, language="en") is None
        assert (await asyncio.wait_for(final, 30)).text
    finally:
        stt.close()


async def test_cancelled_decode_keeps_the_slot_until_the_thread_is_done(tiny_whisper_path, speech):
    # Long decodes (~0.2 s: 200 tokens of garbage), so the abandoned one is surely still running.
    stt = WhisperSTT(WhisperOptions(model=str(tiny_whisper_path), device="cpu", max_new_tokens=200))
    try:
        await _abandon_a_decode_then_race(stt, speech("en_birch_canoe.wav"))
    finally:
        stt.close()


async def _abandon_a_decode_then_race(stt: WhisperSTT, audio: np.ndarray) -> None:
    await stt.warm_up()
    abandoned = asyncio.create_task(stt.transcribe(audio, final=False, language="en"))
    await asyncio.sleep(0)  # one iteration: it holds the slot and its decode is running
    abandoned.cancel()
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    order: list[str] = []

    async def run(name: str, final: bool) -> None:
        result = await stt.transcribe(audio, final=final, language="en")
        order.append(name if result is not None else f"{name}:dropped")

    partial = asyncio.create_task(run("partial", False))
    await asyncio.sleep(0)
    final = asyncio.create_task(run("final", True))
    await asyncio.wait_for(asyncio.gather(partial, final), 30)
    # The partial asked first, but the slot was still held by the abandoned decode, so the final
    # (which a person is waiting for) went first.
    assert order == ["final", "partial"]
