"""The audio side of the end of turn: Smart Turn v3 (pipeline/turn_model.py), loaded from an
installed pipecat-ai's model file, on real recordings and in a real conversation."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from pipeline import turn_model
from pipeline.endpointing import Verdict, with_audio
from pipeline.turns import EndpointingOptions
from test_endpointing import voiced

MODEL = turn_model.bundled_model()
needs_model = pytest.mark.skipif(MODEL is None, reason="no Smart Turn model: pip install --no-deps pipecat-ai "
                                                       "(scripts/test installs it)")


def test_the_words_verdict_is_corrected_by_how_the_speech_sounds():
    o = EndpointingOptions()
    assert with_audio(Verdict.UNKNOWN, 0.2, o) is Verdict.INCOMPLETE  # neither way in words, unfinished by ear
    assert with_audio(Verdict.UNKNOWN, 0.8, o) is Verdict.UNKNOWN
    assert with_audio(Verdict.UNKNOWN, None, o) is Verdict.UNKNOWN  # no model, or no answer yet
    assert with_audio(Verdict.INCOMPLETE, 0.99, o) is Verdict.INCOMPLETE  # "and..." wins over a falling voice
    assert with_audio(Verdict.COMPLETE, 0.01, o) is Verdict.COMPLETE  # no veto by default
    veto = EndpointingOptions(audio_veto_below=0.2)
    assert with_audio(Verdict.COMPLETE, 0.1, veto) is Verdict.UNKNOWN
    assert with_audio(Verdict.COMPLETE, 0.3, veto) is Verdict.COMPLETE


def test_settings_off_or_a_missing_file_or_a_wrong_model(tmp_path):
    assert turn_model.load("off") is None
    with pytest.raises(ValueError, match="no such file"):
        turn_model.load(str(tmp_path / "nowhere.onnx"))
    silero = importlib.util.find_spec("silero_vad").submodule_search_locations[0] + "/data/silero_vad.onnx"
    with pytest.raises(RuntimeError, match="not a Smart Turn v3 model"):  # a real ONNX model, not this one
        turn_model.load(silero)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(RuntimeError, match="cannot load the turn model"):
        turn_model.load(str(junk))


def test_the_server_gives_every_conversation_its_turn_model(tmp_path):
    from agent.config import Settings
    from agent.engines import Engines
    from agent.engines import turn_model as for_settings
    from agent.session import build_conversation
    from personas.catalog import build
    from pipeline.tts import EspeakTTS

    assert for_settings(Settings(_env_file=None, turn_model="off")) is None
    assert for_settings(Settings(_env_file=None, semantic_endpointing=False)) is None  # nothing would ask it
    assert for_settings(Settings(_env_file=None)) is turn_model.load("auto")  # installed or not
    with pytest.raises(ValueError, match="no such file"):  # named explicitly: must load, or no start
        for_settings(Settings(_env_file=None, turn_model=str(tmp_path / "missing.onnx")))
    hearing = object()
    engines = Engines(stt=None, tts=EspeakTTS(), llm=None, turn_model=hearing)
    conv = build_conversation(build("teacher", {}), Settings(_env_file=None), engines, None, lambda ev: None, "r")
    assert conv.turn_model is hearing


@needs_model
def test_features_are_the_models_own_preprocessing_bit_for_bit(speech):
    # The reference: the feature code shipped beside the model file (numpy only; loaded from its
    # file so that pipecat's package, whose dependencies are not installed, is never imported).
    spec = importlib.util.spec_from_file_location("smart_turn_features", MODEL.parent.parent / "_whisper_features.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    audio = speech("en_birch_canoe.wav")
    for x in (audio, audio[:20000], np.tile(audio, 4)):  # shorter than 8 s, and longer
        window = np.concatenate([np.zeros(max(0, 128000 - len(x)), np.float32), x[-128000:]])
        assert np.array_equal(turn_model.features(x), reference.compute_whisper_log_mel_features(window))


@needs_model
def test_a_whole_sentence_sounds_finished_and_its_first_half_does_not(speech):
    model = turn_model.load("auto")
    assert turn_model.load("auto") is model  # one per process
    audio = voiced(speech("en_birch_canoe.wav"))  # "The birch canoe slid on the smooth planks."
    assert model.probability(audio) > 0.9
    assert model.probability(audio[: len(audio) // 2]) < 0.1  # "The birch canoe sl..."
    assert model.probability(audio[: len(audio) * 6 // 10]) < 0.5


@needs_model
async def test_a_pause_that_sounds_unfinished_waits_for_the_rest(fake_llm, event_log, speech):
    """'The birch canoe' + 700 ms: the words say neither way (the middle 500 ms ending here), the
    voice says more is coming, so the turn waits (1200 ms) and the rest of the sentence joins it.
    Without the model, or with one that fails, the words decide alone and the turn is cut."""
    from conftest import EventLog
    from driver import Driver
    from pipeline import frames as F
    from pipeline.conversation import Conversation
    from pipeline.tts import EspeakTTS
    from pipeline.turns import ConversationConfig, TurnOptions
    from pipeline_setup import llm
    from scripted_stt import ScriptedSTT

    audio = voiced(speech("en_birch_canoe.wav"))
    half = len(audio) // 2
    model = Counting(turn_model.load("auto"))
    for hearing, log in ((model, event_log), (None, EventLog()), (Broken(), EventLog())):
        stt = ScriptedSTT("The birch canoe", "The birch canoe slid on the smooth planks.")
        conv = Conversation(stt=stt, llm=llm(fake_llm.url), tts=EspeakTTS(), emit=log, turn_options=TurnOptions(),
                            config=ConversationConfig(system_prompt="You are a test interviewer."), name="test",
                            turn_model=hearing)
        d = Driver(conv, log)
        try:
            await d.say(np.zeros(3200, np.float32))
            await d.say_with_partials(audio[:half], trailing_silence_s=0.7)
            if hearing is not model:  # the words alone (no model, or a broken one): the middle endpoint
                assert log.of(F.UserStoppedSpeaking)  # ...and the sentence is cut
                assert not log.of(F.ErrorEvent)  # a failing model is logged, never the person's problem
                continue
            assert conv.segmenter.speaking and not log.of(F.UserStoppedSpeaking)
            assert conv._eot[1] is Verdict.INCOMPLETE and conv._eot[2] == 1200
            # (Interim text stays "The birch canoe": a script cannot know when each later word is said.)
            await d.say_with_partials(audio[half:])
            spoke_until = d.frame
            await d.say_with_partials(np.zeros(int(0.8 * 16000), np.float32))
            [stopped] = log.of(F.UserStoppedSpeaking)  # one turn, ended after the whole sentence
            assert log.frame_of(stopped) > spoke_until
            assert len([t for t in log.of(F.Transcript) if t.final]) == 1
            assert model.calls == sum(stt.urgent)  # once per pause (its words said neither way), not per interim
        finally:
            await conv.aclose()


class Broken:
    def probability(self, audio: np.ndarray) -> float:
        raise RuntimeError("onnxruntime exploded")


class Counting:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def probability(self, audio: np.ndarray) -> float:
        self.calls += 1
        return self.model.probability(audio)


@needs_model
async def test_words_that_decide_leave_the_turn_model_unasked(fake_llm, event_log, speech):
    """A finished sentence (or a trailing "and") needs no second opinion: no CPU spent on it."""
    from driver import Driver
    from pipeline import frames as F
    from pipeline.conversation import Conversation
    from pipeline.tts import EspeakTTS
    from pipeline.turns import ConversationConfig, TurnOptions
    from pipeline_setup import llm
    from scripted_stt import ScriptedSTT

    model = Counting(turn_model.load("auto"))
    text = "The birch canoe slid on the smooth planks."
    conv = Conversation(stt=ScriptedSTT(text, text), llm=llm(fake_llm.url), tts=EspeakTTS(), emit=event_log,
                        turn_options=TurnOptions(), config=ConversationConfig(system_prompt="You are a test."),
                        name="test", turn_model=model)
    d = Driver(conv, event_log)
    try:
        await d.say(np.zeros(3200, np.float32))
        await d.say_with_partials(voiced(speech("en_birch_canoe.wav")), trailing_silence_s=0.5)
        assert event_log.of(F.UserStoppedSpeaking) and model.calls == 0
    finally:
        await conv.aclose()
