"""Preemptive generation: the LLM starts on the interim transcript while the person is silent, and
its reply is heard only if the final transcript says the same words.

Real Silero VAD on real recordings, the real OpenAI protocol (tests/fake_llm.py) and espeak-ng; the
STT is scripted so that the interim and final transcripts differ exactly when a test wants them to.
"""
from __future__ import annotations

import asyncio

import numpy as np

from driver import Driver
from fake_llm import last_user
from pipeline import frames as F
from pipeline.conversation import PreemptiveStats
from pipeline_setup import conversation, llm
from scripted_stt import ScriptedSTT
from test_audio_vad import voiced_bounds

INTERIM = "I led the billing migration."
FINAL = "I led the billing migration last year."


def of(events, kind) -> list:
    return [e for e in events if isinstance(e, kind)]


def voiced(audio: np.ndarray) -> np.ndarray:
    start, end = voiced_bounds(audio)
    return audio[int(start * 16000): int(end * 16000)]


async def silence_until_preemptive(d: Driver, conv, fake_llm, n: int) -> int:
    """Silence in until the n-th preemptive request reached the LLM server; the frame it started.

    On a real clock the request is on the wire within a few ms of the interim transcript; the
    compressed clock would end the turn first, so this waits for it, as the person's clock would."""
    for _ in range(40):
        if conv.preemptive.started >= n:
            break
        await d.step()
    assert conv.preemptive.started >= n, "no preemptive request during the silence"
    frame = d.frame
    await fake_llm.wait_requests(n)
    return frame


async def say_the_answer(d: Driver, speech) -> None:
    """A moment of silence, then the person's answer (the recording's voiced part)."""
    await d.say(np.zeros(3200, np.float32))
    await d.say(voiced(speech("en_birch_canoe.wav")))


async def silence_until_the_reply_ends(d: Driver) -> None:
    """The person stays quiet past the endpoint and hears the agent's whole reply."""
    await d.say(np.zeros(int(0.8 * 16000), np.float32))
    await d.run_until(lambda ev: of(ev, F.BotStoppedSpeaking))


def answer(body) -> str:
    return f"You told me: {last_user(body)}"


async def test_a_final_transcript_that_differs_cancels_the_early_reply_and_answers_the_final_words(
        fake_llm, event_log, speech):
    fake_llm.reply_for = answer
    fake_llm.behaviour.first_token_delay_s = 0.3  # still streaming when the final transcript differs
    stt = ScriptedSTT(partial_text=INTERIM, final_text=FINAL)
    # An engine whose finals are decoded again (better than its partials): the words can change.
    conv = conversation(stt, llm(fake_llm.url), event_log, reuse_interim_as_final=False)
    d = Driver(conv, event_log)
    try:
        await say_the_answer(d, speech)
        await silence_until_preemptive(d, conv, fake_llm, 1)
        await silence_until_the_reply_ends(d)

        assert [last_user(r) for r in fake_llm.requests] == [INTERIM, FINAL]
        await fake_llm.wait_cancelled(1)
        assert fake_llm.cancelled == [0]  # the early request was abandoned mid-reply
        spoken = " ".join(e.text for e in event_log.of(F.BotText) if e.spoken)
        assert spoken == f"You told me: {FINAL}"
        # Nothing of the reply to the interim words reached the person, not even as text.
        assert not [e for e in event_log.of(F.BotText) if INTERIM in e.text and FINAL not in e.text]
        assert conv.history == [{"role": "user", "content": FINAL},
                                {"role": "assistant", "content": f"You told me: {FINAL}"}]
        assert conv.preemptive == PreemptiveStats(started=1, used=0, discarded=1)
        [m] = event_log.of(F.TurnMetrics)
        assert m.preemptive is False and m.llm_discarded == 1
    finally:
        await conv.aclose()
    assert not conv._tasks


async def test_a_matching_final_transcript_keeps_the_early_reply(fake_llm, event_log, speech):
    fake_llm.reply_for = answer
    # Same words, different case and punctuation: the early reply is kept.
    stt = ScriptedSTT(partial_text="i led the billing migration last year", final_text=FINAL)
    conv = conversation(stt, llm(fake_llm.url), event_log, reuse_interim_as_final=False)
    d = Driver(conv, event_log)
    try:
        await say_the_answer(d, speech)
        started = await silence_until_preemptive(d, conv, fake_llm, 1)
        await silence_until_the_reply_ends(d)

        assert len(fake_llm.requests) == 1 and not fake_llm.cancelled
        [stopped] = event_log.of(F.UserStoppedSpeaking)
        assert started <= event_log.frame_of(stopped)  # the LLM was asked before the turn ended
        spoken = " ".join(e.text for e in event_log.of(F.BotText) if e.spoken)
        assert spoken == "You told me: i led the billing migration last year"
        assert conv.history[0] == {"role": "user", "content": FINAL}  # the history keeps the final words
        assert conv.history[1]["role"] == "assistant" and len(conv.history) == 2
        assert conv.preemptive == PreemptiveStats(started=1, used=1, discarded=0)
        [m] = event_log.of(F.TurnMetrics)
        assert m.preemptive is True and m.llm_discarded == 0 and m.voice_to_voice_ms is not None
        assert np.abs(d.audio()).max() > 1000  # and it was played
    finally:
        await conv.aclose()
    assert not conv._tasks


async def test_speaking_again_during_the_silence_cancels_the_early_reply(fake_llm, event_log, speech):
    fake_llm.reply_for = answer
    fake_llm.behaviour.first_token_delay_s = 0.3
    stt = ScriptedSTT(partial_text="Go forward ten meters and", final_text="Go forward ten meters and the birch canoe.")
    conv = conversation(stt, llm(fake_llm.url), event_log)
    d = Driver(conv, event_log)
    try:
        await d.say(np.zeros(3200, np.float32))
        await d.say(voiced(speech("en_goforward.wav")))
        await silence_until_preemptive(d, conv, fake_llm, 1)
        await d.say(np.zeros(int(0.3 * 16000), np.float32))  # a pause after "and": not the end
        stt.partial_text = stt.final_text
        await d.say(voiced(speech("en_birch_canoe.wav")))
        await fake_llm.wait_cancelled(1)  # the early reply to half a sentence went as they spoke
        await silence_until_preemptive(d, conv, fake_llm, 2)
        await silence_until_the_reply_ends(d)

        assert [last_user(r) for r in fake_llm.requests] == ["Go forward ten meters and", stt.final_text]
        assert fake_llm.cancelled == [0]
        assert len([t for t in event_log.of(F.Transcript) if t.final]) == 1  # one turn, pause included
        assert " ".join(e.text for e in event_log.of(F.BotText) if e.spoken) == f"You told me: {stt.final_text}"
        assert conv.preemptive == PreemptiveStats(started=2, used=1, discarded=1)
        [m] = event_log.of(F.TurnMetrics)
        assert m.preemptive is True and m.llm_discarded == 1
    finally:
        await conv.aclose()
    assert not conv._tasks


async def test_preemptive_generation_can_be_turned_off(fake_llm, event_log, speech):
    stt = ScriptedSTT(partial_text=FINAL, final_text=FINAL)
    conv = conversation(stt, llm(fake_llm.url), event_log, preemptive_generation=False)
    d = Driver(conv, event_log)
    try:
        await d.say(np.zeros(3200, np.float32))
        await d.say(voiced(speech("en_birch_canoe.wav")), trailing_silence_s=0.8)
        await d.run_until(lambda ev: of(ev, F.BotStoppedSpeaking))
        assert len(fake_llm.requests) == 1 and conv.preemptive == PreemptiveStats()
        assert event_log.of(F.TurnMetrics)[0].preemptive is False
    finally:
        await conv.aclose()


def test_prometheus_counts_the_extra_llm_requests():
    from agent.metrics import Metrics

    m = Metrics()
    m.observe(F.TurnMetrics(1, preemptive=True))
    m.observe(F.TurnMetrics(2, llm_discarded=2))
    text = m.render()[0].decode()
    assert 'parley_llm_preemptive_requests_total{outcome="used"} 1.0' in text
    assert 'parley_llm_preemptive_requests_total{outcome="discarded"} 2.0' in text


async def test_by_default_the_decode_at_the_silence_is_the_final_one(fake_llm, event_log, speech):
    """No second decode after the turn ends: the interim made when the silence began heard it all."""
    fake_llm.reply_for = answer
    stt = ScriptedSTT(partial_text=FINAL, final_text="never asked for")
    conv = conversation(stt, llm(fake_llm.url), event_log)
    d = Driver(conv, event_log)
    try:
        await say_the_answer(d, speech)
        await silence_until_preemptive(d, conv, fake_llm, 1)
        await silence_until_the_reply_ends(d)

        assert not [c for c in stt.calls if c[0]]  # no final decode
        [final] = [t for t in event_log.of(F.Transcript) if t.final]
        assert final.text == FINAL and conv.history[0] == {"role": "user", "content": FINAL}
        assert len(fake_llm.requests) == 1 and conv.preemptive == PreemptiveStats(started=1, used=1, discarded=0)
        assert " ".join(e.text for e in event_log.of(F.BotText) if e.spoken) == f"You told me: {FINAL}"
    finally:
        await conv.aclose()
    assert not conv._tasks


async def test_the_pause_is_transcribed_when_the_sound_stops_not_when_silero_lets_go(fake_llm, event_log, speech):
    """Silero's probability trails the last word by 30-100 ms. The decode that decides the turn
    (and starts the reply) begins once the sound itself has been quiet for ``pause_quiet_s``,
    before the VAD has counted ``partial_reuse_margin_s`` of silence, and is still the final."""
    fake_llm.reply_for = answer
    stt = ScriptedSTT(partial_text=FINAL, final_text="never asked for")
    conv = conversation(stt, llm(fake_llm.url), event_log)
    d = Driver(conv, event_log)
    try:
        await d.say(np.zeros(16000, np.float32))  # the room before the person speaks: its noise floor
        await d.say(speech("en_birch_canoe.wav"))  # the words, as recorded: the room's tail and all
        vad_silence_at_decode = None
        for _ in range(25):
            await d.step()
            if True in stt.urgent:
                vad_silence_at_decode = conv.segmenter.silence_s
                break
        assert vad_silence_at_decode is not None, "the pause was never transcribed"
        assert vad_silence_at_decode < conv.options.partial_reuse_margin_s
        await silence_until_preemptive(d, conv, fake_llm, 1)
        await silence_until_the_reply_ends(d)

        assert [c[0] for c in stt.calls if c[0]] == []  # it heard every word: no second decode
        assert conv.preemptive == PreemptiveStats(started=1, used=1, discarded=0)
        assert " ".join(e.text for e in event_log.of(F.BotText) if e.spoken) == f"You told me: {FINAL}"
    finally:
        await conv.aclose()
    assert not conv._tasks


class _SlowCaptionSTT(ScriptedSTT):
    """The first interim decode (a caption, taken while the person talks) never finishes by
    itself: as on a busy CPU, where a caption can still be decoding when the person stops."""

    def __init__(self, text: str):
        super().__init__(partial_text=text, final_text=text)
        self.caption_started = asyncio.Event()
        self.caption_cancelled = False

    async def transcribe(self, audio, *, final, language=None, prompt=None, urgent=False):
        if not final and not self.caption_started.is_set():
            assert not urgent  # a caption: behind every pause's decode in a shared engine
            self.caption_started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.caption_cancelled = True
                raise
        return await super().transcribe(audio, final=final, language=language, prompt=prompt, urgent=urgent)


async def test_the_pause_does_not_wait_for_a_caption_still_decoding(fake_llm, event_log, speech):
    """A caption decode of audio that stops before the pause is superseded: it is cancelled and
    the pause's own decode starts at once (waiting for it cost ~100 ms a turn on a CPU)."""
    fake_llm.reply_for = answer
    stt = _SlowCaptionSTT(FINAL)
    conv = conversation(stt, llm(fake_llm.url), event_log)
    d = Driver(conv, event_log)
    try:
        await say_the_answer(d, speech)
        assert stt.caption_started.is_set(), "no caption was decoded while the person talked"
        assert not stt.caption_cancelled
        await silence_until_preemptive(d, conv, fake_llm, 1)
        assert stt.caption_cancelled
        await silence_until_the_reply_ends(d)

        assert [c[0] for c in stt.calls] == [False]  # the pause's decode only; no final decode
        assert stt.urgent == [True]  # which a shared engine serves ahead of other rooms' captions
        assert conv.preemptive == PreemptiveStats(started=1, used=1, discarded=0)
        assert " ".join(e.text for e in event_log.of(F.BotText) if e.spoken) == f"You told me: {FINAL}"
    finally:
        await conv.aclose()
    assert not conv._tasks
