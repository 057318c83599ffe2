"""Semantic end of turn: the text policy, and the conversation ending a turn earlier or later with it."""
from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.endpointing import Verdict, classify, endpoint_ms, same_words
from pipeline.turns import EndpointingOptions

C, I, U = Verdict.COMPLETE, Verdict.INCOMPLETE, Verdict.UNKNOWN


@pytest.mark.parametrize("text, language, expected", [
    ("I led the migration of our billing service.", "en", C),
    ("Why would anyone do that?", "en", C),
    ("That was amazing!", "en", C),
    ("I led the migration and", "en", I),
    ("I led the migration and.", "en", I),  # Whisper's full stop after a fragment does not end it
    ("so we moved it to the", "en", I),
    ("It took us, um", "en", I),
    ("Well, uh.", "en", I),
    ("I think that", "en", I),
    ("The first thing,", "en", I),
    ("We tried it first…", "en", I),
    ("Mr.", "en", I),  # an abbreviation, not a sentence
    ("because it was slow", "en", U),
    ("I worked on it for", "en", I),  # a preposition without punctuation
    ("What are you looking at?", "en", C),  # ... but a question may end on one
    ("I think so.", "en", C),
    ("", "en", U),
    (None, "en", U),
    ("Ich habe das Projekt geleitet.", "de", C),
    ("Ich habe das Projekt geleitet und", "de", I),
    ("Ich glaube", "de", I),
    ("J'ai dirigé le projet.", "fr", C),
    ("J'ai dirigé le projet parce que", "fr", I),
    ("je suis allé à l'", "fr", I),
    ("Dirigí el proyecto.", "es", C),
    ("Dirigí el proyecto pero", "es", I),
    ("Dirigí el proyecto porque", "es-ES", I),
    ("it went well and", None, I),  # no language: English
    ("it went well and", "ja", I),  # a language without lists: English
])
def test_classify(text, language, expected):
    assert classify(text, language) is expected


def test_a_short_answer_to_a_question_is_complete_without_punctuation():
    assert classify("yes", "en", after_question=True) is C
    assert classify("yes", "en") is U
    assert classify("ja", "de", after_question=True) is C
    assert classify("yes and", "en", after_question=True) is I


def test_endpoints_respect_the_persona_base():
    o = EndpointingOptions()
    assert (endpoint_ms(C, o, 500), endpoint_ms(U, o, 500), endpoint_ms(I, o, 500)) == (250, 500, 1200)
    # An interviewer that asked for 1.4 s keeps it for unfinished sentences.
    assert (endpoint_ms(C, o, 1400), endpoint_ms(U, o, 1400), endpoint_ms(I, o, 1400)) == (250, 700, 1400)
    assert endpoint_ms(C, EndpointingOptions(complete_silence_ms=300), 200) == 200


def test_same_words_ignores_case_punctuation_and_spacing():
    assert same_words("i led the  migration", "I led the migration.")
    assert same_words("Well, yes!", "well yes")
    assert not same_words("I led the migration", "I led the migration last year.")
    assert not same_words("", "")


def test_the_policy_is_cheap():
    text = "So the first thing I would say about the project is that we moved the billing service and"
    t = time.perf_counter()
    for _ in range(2000):
        classify(text, "en")
    assert (time.perf_counter() - t) / 2000 < 200e-6  # per call: nothing next to a 20 ms frame


# ---------------------------------------------------------------- in the conversation (real Silero VAD)

FRAME_S = 0.02


def voiced(audio: np.ndarray) -> np.ndarray:
    from test_audio_vad import voiced_bounds

    start, end = voiced_bounds(audio)
    return audio[int(start * 16000): int(end * 16000)]


async def frames_to_end_of_turn(fake_llm, event_log, audio: np.ndarray, text: str, **turn_kw) -> int:
    """Say ``audio`` (interim and final transcripts: ``text``); frames from its end to the turn's end."""
    from driver import Driver
    from pipeline import frames as F
    from pipeline_setup import conversation, llm
    from scripted_stt import ScriptedSTT

    conv = conversation(ScriptedSTT(text, text), llm(fake_llm.url), event_log, **turn_kw)
    d = Driver(conv, event_log)
    try:
        await d.say(np.zeros(3200, np.float32))
        await d.say(audio)
        spoke_until = d.frame
        await d.say(np.zeros(int(1.6 * 16000), np.float32))
        [stopped] = event_log.of(F.UserStoppedSpeaking)
        return event_log.frame_of(stopped) - spoke_until
    finally:
        await conv.aclose()


async def test_a_finished_sentence_ends_the_turn_sooner_than_the_fixed_endpoint(fake_llm, event_log, speech):
    from conftest import EventLog
    from pipeline.turns import EndpointingOptions

    audio = voiced(speech("en_birch_canoe.wav"))
    text = "The birch canoe slid on the smooth planks."
    semantic = await frames_to_end_of_turn(fake_llm, event_log, audio, text)
    fixed = await frames_to_end_of_turn(fake_llm, EventLog(), audio, text,
                                        endpointing=EndpointingOptions(enabled=False))
    # 250 ms of silence plus Silero's lag against 500 ms plus the same lag.
    assert semantic * FRAME_S < 0.45 and fixed * FRAME_S >= 0.5, (semantic, fixed)
    assert fixed - semantic >= round(0.2 / FRAME_S)


async def test_a_pause_after_and_does_not_end_the_turn(fake_llm, event_log, speech):
    from driver import Driver
    from pipeline import frames as F
    from pipeline_setup import conversation, llm
    from scripted_stt import ScriptedSTT

    first, second = voiced(speech("en_goforward.wav")), voiced(speech("en_birch_canoe.wav"))
    stt = ScriptedSTT("Go forward ten meters and", "Go forward ten meters and the birch canoe slid.")
    conv = conversation(stt, llm(fake_llm.url), event_log)
    d = Driver(conv, event_log)
    try:
        await d.say(np.zeros(3200, np.float32))
        await d.say(first, trailing_silence_s=0.9)  # beyond the fixed 500 ms endpoint
        assert conv.segmenter.speaking and not event_log.of(F.UserStoppedSpeaking)
        stt.partial_text = stt.final_text
        await d.say(second, trailing_silence_s=0.8)
        finals = [t.text for t in event_log.of(F.Transcript) if t.final]
        assert finals == [stt.final_text]
        assert [t.pauses for t in event_log.of(F.Transcript) if t.final][0][0] >= 0.85
    finally:
        await conv.aclose()


def test_server_settings_reach_the_conversation():
    from agent.config import Settings
    from agent.engines import Engines
    from agent.session import build_conversation
    from personas.catalog import build
    from pipeline.tts import EspeakTTS

    engines = Engines(stt=None, tts=EspeakTTS(), llm=None)
    for on in (True, False):
        settings = Settings(_env_file=None, semantic_endpointing=on, endpoint_complete_ms=300,
                            preemptive_generation=on)
        conv = build_conversation(build("teacher", {}), settings, engines, None, lambda ev: None, "r")
        assert conv.options.endpointing.enabled is on and conv.options.preemptive_generation is on
        assert conv.options.endpointing.complete_silence_ms == 300
        assert conv.vad_options.endpoint_silence_ms == 1200  # the teacher persona's base silence
