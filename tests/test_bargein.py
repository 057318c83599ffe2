"""Barge-in on the audio clock: real speech over the agent stops it, clicks and backchannels do not.

Every case plays a long reply (espeak-ng) and injects real audio into the microphone while it
plays; latencies are counted in 20 ms frames of the Driver's clock, where output frame N is read
right after input frame N is pushed, as a transport does.
"""
from __future__ import annotations

import numpy as np

from driver import Driver
from pipeline import frames as F
from pipeline.echo import EchoOptions
from pipeline.turns import TurnOptions
from pipeline.tts import EspeakTTS
from pipeline_setup import conversation, llm, whisper
from test_audio_vad import voiced_bounds

FRAME_S = 0.02
FIRST = "The first thing I would like to hear about is the project you are most proud of from your last job."
LONG_REPLY = (f"{FIRST} Please describe what you built and why it mattered to the people who used it. "
              "After that we can talk about the hardest bug you ever had to track down.")
NEXT_REPLY = "All right, let us move on to something else."


def of(events, kind) -> list:
    return [e for e in events if isinstance(e, kind)]


async def speaking_agent(tiny_whisper_path, fake_llm, event_log, into_reply_s: float = 1.2):
    """A conversation whose agent is ``into_reply_s`` into the first sentence of LONG_REPLY."""
    fake_llm.script = [LONG_REPLY]
    fake_llm.behaviour.reply = NEXT_REPLY
    # No echo-canceller warm-up: these cases measure barge-in itself, 1.2 s into the first reply
    # (tests/test_echo.py covers the warm-up, when interruptions must last twice as long).
    conv = conversation(whisper(tiny_whisper_path), llm(fake_llm.url), event_log, echo=EchoOptions(aec_warmup_s=0))
    d = Driver(conv, event_log)
    await d.say(np.zeros(3200, np.float32))
    conv.push_text("Tell me about the role.")
    await d.run_until(lambda ev: of(ev, F.BotStartedSpeaking))
    first_audio = event_log.frame_of(event_log.of(F.BotStartedSpeaking)[0])
    await d.run_until(lambda ev: d.frame >= first_audio + into_reply_s / FRAME_S)
    return conv, d, first_audio


async def test_speech_over_the_agent_stops_it_within_200ms_and_keeps_only_what_was_heard(
        tiny_whisper_path, fake_llm, event_log, speech):
    conv, d, first_audio = await speaking_agent(tiny_whisper_path, fake_llm, event_log)
    try:
        utterance = speech("en_goforward.wav")
        onset_s, _ = voiced_bounds(utterance)
        onset = d.frame + int(onset_s / FRAME_S)  # the input frame where the person's voice begins
        await d.say(utterance, trailing_silence_s=0.8)
        await d.run_until(lambda ev: len(of(ev, F.BotStoppedSpeaking)) == 2)  # the answer to the interruption

        [interrupted] = event_log.of(F.BotInterrupted)
        cancelled = event_log.frame_of(interrupted)
        assert any(d.out[f].any() for f in range(onset - 3, onset + 1)), "the agent was not audible at the onset"
        stop = next(f for f in range(onset, cancelled + 1) if not any(d.out[g].any() for g in range(f, cancelled + 1)))
        assert (stop - onset) * FRAME_S * 1000 < 200, (onset, stop)
        # The pause became a cancellation once the speech lasted min_interruption_s (0.35 s).
        assert 0.35 <= (cancelled - onset) * FRAME_S < 0.35 + 0.3
        stopped = event_log.of(F.BotStoppedSpeaking)
        assert stopped[0].interrupted is True and event_log.frame_of(stopped[0]) == cancelled
        assert stopped[1].interrupted is False

        # History holds the words that were played, not the reply that was generated.
        entry = conv.history[1]
        assert entry["role"] == "assistant" and entry["interrupted"] is True
        heard = entry["content"].split()
        assert 0 < len(heard) < len(LONG_REPLY.split()) and heard == LONG_REPLY.split()[: len(heard)]
        assert interrupted.spoken_text == entry["content"]
        assert LONG_REPLY.startswith(interrupted.full_text)
        # espeak gives no word timings: the words are spread over the sentence's audio, so the
        # count heard matches the share of the first sentence played before the agent went quiet.
        pcm = np.concatenate([c.pcm async for c in EspeakTTS().synthesize(FIRST, "en")])
        sentence_s = len(pcm) / 22050
        played_s = (stop - first_audio) * FRAME_S
        expected = len(FIRST.split()) * played_s / sentence_s
        assert abs(len(heard) - expected) <= 2, (heard, expected)
        spoken = [e.text for e in event_log.of(F.BotText) if e.spoken]
        assert spoken[0] == FIRST and LONG_REPLY.split(". ")[1] not in " ".join(spoken)

        # The next request carries the truncated reply, without our bookkeeping key.
        second = fake_llm.requests[1]["messages"]
        final = [t for t in event_log.of(F.Transcript) if t.final and not t.typed][0]
        assert second[1:] == [
            {"role": "user", "content": "Tell me about the role."},
            {"role": "assistant", "content": entry["content"]},
            {"role": "user", "content": final.text},
        ]
        assert conv.history[-1] == {"role": "assistant", "content": NEXT_REPLY}
    finally:
        await conv.aclose()
    assert not conv._tasks


async def test_a_click_over_the_agent_does_not_interrupt(tiny_whisper_path, fake_llm, event_log):
    conv, d, _ = await speaking_agent(tiny_whisper_path, fake_llm, event_log)
    try:
        click = np.random.default_rng(1).normal(0, 0.3, int(0.150 * 16000)).astype(np.float32)
        at = d.frame
        await d.say(np.concatenate([click, np.zeros(16000, np.float32)]))
        await d.run_until(lambda ev: of(ev, F.BotStoppedSpeaking))
        # The agent never paused: it kept talking through the click.
        assert sum(d.out[f].any() for f in range(at, at + 25)) >= 20
        assert not event_log.of(F.BotInterrupted) and not event_log.of(F.UserStartedSpeaking)
        [stopped] = event_log.of(F.BotStoppedSpeaking)
        assert stopped.interrupted is False
        assert " ".join(e.text for e in event_log.of(F.BotText) if e.spoken) == LONG_REPLY
        assert conv.history[-1] == {"role": "assistant", "content": LONG_REPLY}
        assert len(fake_llm.requests) == 1
    finally:
        await conv.aclose()


async def test_a_short_backchannel_pauses_the_agent_then_it_resumes(tiny_whisper_path, fake_llm, event_log, speech):
    conv, d, _ = await speaking_agent(tiny_whisper_path, fake_llm, event_log)
    try:
        recording = speech("en_goforward.wav")
        onset_s, _ = voiced_bounds(recording)
        start = int(onset_s * 16000)
        mmhm = recording[start : start + int(0.22 * 16000)]  # "go": real speech, shorter than 0.35 s
        await d.say(np.concatenate([mmhm, np.zeros(16000, np.float32)]))
        await d.run_until(lambda ev: of(ev, F.BotStoppedSpeaking))

        # The VAD heard speech, so the agent paused at once...
        [heard], [ended] = event_log.of(F.UserStartedSpeaking), event_log.of(F.UserStoppedSpeaking)
        paused = event_log.frame_of(heard)
        resumed = next(f for f in range(paused, len(d.out)) if d.out[f].any())
        assert not any(d.out[f].any() for f in range(paused, resumed))
        # ...for the rest of the sound plus the short resume silence, not the whole endpoint silence.
        assert resumed - paused >= TurnOptions().backchannel_resume_s / FRAME_S
        assert resumed < event_log.frame_of(ended)
        # ...and carried on with the same sentence when it turned out to be a backchannel.
        assert sum(d.out[f].any() for f in range(resumed, resumed + 10)) >= 8
        second_sentence = [e for e in event_log.of(F.BotText) if e.spoken][1]
        assert event_log.frame_of(second_sentence) > resumed
        assert not event_log.of(F.BotInterrupted)
        [stopped] = event_log.of(F.BotStoppedSpeaking)
        assert stopped.interrupted is False
        assert " ".join(e.text for e in event_log.of(F.BotText) if e.spoken) == LONG_REPLY
        assert conv.history[-1] == {"role": "assistant", "content": LONG_REPLY}
        assert len(fake_llm.requests) == 1  # a backchannel is not a turn
        assert not [t for t in event_log.of(F.Transcript) if t.final and not t.typed]
    finally:
        await conv.aclose()


async def test_a_reply_ready_while_the_person_talks_again_does_not_talk_over_them(
        tiny_whisper_path, fake_llm, event_log, speech):
    fake_llm.script = ["Here is my answer to the first part.", "And here is my answer to all of it."]
    conv = conversation(whisper(tiny_whisper_path), llm(fake_llm.url), event_log)
    d = Driver(conv, event_log)
    try:
        await d.say(np.zeros(3200, np.float32))
        await d.say(speech("en_goforward.wav"), trailing_silence_s=0.6)  # turn 1 decided...
        more = speech("en_birch_canoe.wav")
        first_half = int(1.2 * 16000)
        await d.say(more[:first_half])  # ...but the person goes on before its reply is ready
        assert conv.segmenter.speaking
        await event_log.wait_for(lambda ev: conv.player.has_audio or of(ev, F.BotInterrupted))
        resumed_at = d.frame
        await d.say(more[first_half:], trailing_silence_s=0.8)
        await d.run_until(lambda ev: of(ev, F.BotStoppedSpeaking))

        assert not any(d.out[f].any() for f in range(resumed_at, resumed_at + len(more[first_half:]) // 320))
        spoken = [e.text for e in event_log.of(F.BotText) if e.spoken]
        assert spoken == ["And here is my answer to all of it."]  # the first reply was never heard
        finals = [t.text for t in event_log.of(F.Transcript) if t.final]
        assert fake_llm.requests[1]["messages"][1:] == [{"role": "user", "content": finals[0]},
                                                        {"role": "user", "content": finals[1]}]
        assert conv.history[-1] == {"role": "assistant", "content": "And here is my answer to all of it."}
    finally:
        await conv.aclose()
