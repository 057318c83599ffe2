"""Personas: data validation, question plans, the interview flow with a real OpenAI-protocol server,
offline mode, delivery metrics on real speech, and the language teacher."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from driver import Driver
from personas.catalog import PersonaError, PersonaFileError, build, default_dir, list_personas, load_catalog
from personas.delivery import analyse, count_fillers
from personas.runtime import make_runtime
from pipeline import frames as F
from pipeline.conversation import Conversation
from pipeline.tts import EDGE_VOICES, ESPEAK_VOICES, EspeakTTS
from pipeline.vad import Segmenter, SpeechEnd
from pipeline_setup import llm, whisper
from test_audio_vad import voiced_bounds

ROLES = ["software-engineer-backend", "software-engineer-frontend", "software-engineer-fullstack", "data-scientist",
         "machine-learning-engineer", "product-manager", "project-manager", "marketing-manager", "customer-service",
         "call-centre-agent", "consultant", "hr", "behavioural"]


# ---------------------------------------------------------------------------- data files

def test_every_persona_file_validates_and_the_banks_are_full():
    cat = load_catalog()
    assert {"interviewer", "teacher"} <= set(cat.personas)
    assert set(ROLES) <= set(cat.roles)
    for role in ROLES:
        qs = cat.roles[role].questions
        assert len(qs) >= 36, role
        assert {q.kind for q in qs} == ({"behavioural"} if role == "behavioural" else {"technical", "behavioural"})
        assert {q.difficulty for q in qs} == {"easy", "medium", "hard"}
    assert {"en", "de", "fr", "es", "it", "pt"} <= set(cat.languages)
    for lang in cat.languages.values():
        assert lang.id in ESPEAK_VOICES and lang.id in EDGE_VOICES, f"no voice for {lang.id}"


@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(default_dir(), root)
    return root


def test_a_malformed_question_names_the_file_and_the_field(data_copy):
    path = data_copy / "questions" / "data-scientist.yaml"
    path.write_text(path.read_text().replace("difficulty: hard", "difficulty: extreme", 1))
    with pytest.raises(PersonaFileError) as e:
        load_catalog(data_copy)
    assert "data-scientist.yaml" in str(e.value) and "difficulty" in str(e.value) and "questions." in str(e.value)


def test_broken_yaml_unknown_keys_and_missing_banks_are_clear_errors(data_copy):
    (data_copy / "teacher.yaml").write_text("kind: teacher\nid: [unclosed\n")
    with pytest.raises(PersonaFileError, match=r"teacher\.yaml: not valid YAML"):
        load_catalog(data_copy)
    shutil.copy(default_dir() / "teacher.yaml", data_copy / "teacher.yaml")
    iv = data_copy / "interviewer.yaml"
    iv.write_text(iv.read_text() + "\nmax_questons: 30\n")
    with pytest.raises(PersonaFileError, match=r"interviewer\.yaml: max_questons: Extra inputs"):
        load_catalog(data_copy)
    iv.write_text(iv.read_text().replace("\nmax_questons: 30\n", "").replace(
        "default_role: software-engineer-backend", "default_role: astronaut"))
    with pytest.raises(PersonaFileError, match=r"interviewer\.yaml: roles: no question bank questions/astronaut\.yaml"):
        load_catalog(data_copy)


def test_adding_a_persona_needs_no_code(data_copy):
    text = (data_copy / "interviewer.yaml").read_text()
    text = text.replace("id: interviewer", "id: support-coach").replace("name: Job interviewer", "name: Support coach")
    text = text.replace("roles: all", "roles: [customer-service, call-centre-agent]").replace(
        "default_role: software-engineer-backend", "default_role: customer-service")
    (data_copy / "support-coach.yaml").write_text(text)
    cat = load_catalog(data_copy)
    listed = {p["id"]: p for p in list_personas(cat)}
    roles = next(o for o in listed["support-coach"]["options"] if o["name"] == "role")
    assert [c["id"] for c in roles["choices"]] == ["customer-service", "call-centre-agent"]
    session = build("support-coach", {"questions": 3}, catalog=cat, seed=1)
    assert session.role.id == "customer-service" and len(session.questions) == 3


def test_question_plans_follow_type_difficulty_and_length():
    mixed = build("interviewer", {"role": "data-scientist", "interview_type": "mixed", "questions": 6}, seed=3)
    assert [q.kind for q in mixed.questions] == ["technical", "behavioural"] * 3
    assert len({q.text for q in mixed.questions}) == 6
    hard = build("interviewer", {"role": "data-scientist", "interview_type": "technical", "difficulty": "hard",
                                 "questions": 5}, seed=3)
    assert all(q.kind == "technical" and q.difficulty == "hard" for q in hard.questions)
    assert len(build("interviewer", {}).questions) == 5  # the default length
    assert len(build("interviewer", {"questions": 25}).questions) == 25
    with pytest.raises(PersonaError, match="between 1 and 25"):
        build("interviewer", {"questions": 26})
    with pytest.raises(PersonaError, match="unknown role 'astronaut'"):
        build("interviewer", {"role": "astronaut"})
    assert "K-means" in build("interviewer", {"role": "data-scientist"}).config.stt_prompt


# ---------------------------------------------------------------------------- delivery

def test_pace_on_real_recordings_matches_a_hand_count(speech):
    # Hand count: words in the reference transcript over the voiced span measured from the waveform.
    for name, transcript in [
        ("en_LDC93S1_timit.wav", "She had your dark suit in greasy wash water all year."),
        ("en_birch_canoe.wav", "THE BIRCH CANOE SLID ON THE SMOOTH PLANKS"),
        ("en_harvard_spk1_snt3.wav", "AT THAT HIGH LEVEL THE AIR IS PURE"),
    ]:
        audio = speech(name)
        onset, offset = voiced_bounds(audio)
        hand_wpm = len(transcript.split()) / (offset - onset) * 60
        seg = Segmenter()
        x = np.concatenate([audio, np.zeros(16000, np.float32)])
        [end] = [e for i in range(0, len(x), 320) for e in seg.feed(x[i : i + 320]) if isinstance(e, SpeechEnd)]
        d = analyse(transcript, end.speech_s, end.pauses)
        assert d.wpm == pytest.approx(hand_wpm, rel=0.10), (name, d.wpm, hand_wpm)


def test_fillers_pauses_and_pace_flags():
    text = "Um, so I think, uh, the main thing was, like, testing. You know, I mean, we, um, shipped it."
    assert count_fillers(text) == {"um": 2, "uh": 1, "like": 1, "you know": 1, "i mean": 1}
    assert count_fillers("I like Python and I would like to work here.") == {}
    d = analyse(text, 6.0, [0.4, 2.5, 3.1])
    assert d.fillers["count"] == 6 and d.fillers["per_minute"] == 60.0
    assert d.long_pauses == 2 and d.longest_pause_s == 3.1
    assert d.pace == "fast" and analyse("word " * 20, 12.0).pace == "slow" and analyse("word " * 28, 12.0).pace == "ok"
    assert analyse("yes", 0.4).pace == "unknown"


# ---------------------------------------------------------------------------- the interview, scripted

def feedback_json(score: int, good="Clear structure.", missing="No metrics.") -> str:
    return json.dumps({"score": score, "good": [good], "missing": [missing],
                       "better_answer": "Situation, task, action, then a measured result.",
                       "star": {"situation": True, "task": True, "action": True, "result": False}})


class ScriptedLLM:
    """Routes the fake server's replies: spoken turns by the interviewer's instruction, structured
    calls by schema name. Records what it was asked."""

    def __init__(self, feedback: list[str]):
        self.feedback = feedback
        self.spoken: list[list[dict]] = []

    def __call__(self, body: dict) -> str:
        fmt = body.get("response_format")
        if fmt:
            name = fmt.get("json_schema", {}).get("name", "answer_feedback")
            if name == "answer_feedback":
                return self.feedback.pop(0) if self.feedback else feedback_json(6)
            if name == "scorecard":
                return json.dumps({"strengths": ["Good examples."], "improvements": ["Quantify results."]})
            return json.dumps({"corrections": [], "vocabulary": []})
        self.spoken.append(body["messages"])
        instruction = body["messages"][-1]["content"]
        if "follow-up" in instruction:
            return "What was the outcome?"
        if "last question" in instruction:
            return "Thank you, that is the end of the interview."
        return "Thanks. Next question."


LONG = ("In my last job I was responsible for the billing service. We were losing payments because retries "
        "were not idempotent, so I decided to add idempotency keys to every request, I wrote the migration, "
        "I talked to the payments team and as a result we reduced duplicate charges by ninety percent in a month "
        "and the on-call load dropped a lot because nobody had to fix the data by hand anymore.")


def good(question) -> str:
    """A long answer that also covers the question's key points: no follow-up needed."""
    return LONG + " Also, " + "; ".join(question.key_points) + "."


async def run_typed_interview(conv: Conversation, log, answers: list[str]) -> None:
    d = Driver(conv, log)
    conv.start()
    await d.run_until(lambda ev: any(isinstance(e, F.BotStoppedSpeaking) for e in ev))
    for i, answer in enumerate(answers):
        n = len(log.of(F.BotStoppedSpeaking))
        conv.push_text(answer)
        await d.run_until(lambda ev: len([e for e in ev if isinstance(e, F.BotStoppedSpeaking)]) > n, timeout=30)


def make_conv(session, runtime, log, stt=None) -> Conversation:
    def emit(ev):
        log(ev)
        runtime.on_event(ev)
    return Conversation(stt=stt, llm=runtime, tts=EspeakTTS(), config=session.config, emit=emit, name="persona-test")


async def test_scripted_interview_asks_n_questions_follows_up_scores_and_ends(fake_llm, event_log):
    scripted = ScriptedLLM([feedback_json(8), "this is {not json", feedback_json(5), feedback_json(7)])
    fake_llm.reply_for = scripted
    session = build("interviewer", {"role": "software-engineer-backend", "interview_type": "mixed", "questions": 3},
                    seed=7)
    sent: list[dict] = []
    client = llm(fake_llm.url)
    runtime = make_runtime(session, client, client, sent.append)
    conv = make_conv(session, runtime, event_log)
    try:
        # Q1: a short answer gets a follow-up; the full answer to it moves on. Q2: long answer.
        # Q3: "I don't know" gets a hint first.
        q = session.questions
        await run_typed_interview(conv, event_log, ["I fixed the retries.", good(q[0]), good(q[1]), "I don't know.",
                                                    good(q[2])])
        instructions = [m[-1]["content"] for m in scripted.spoken]
        follow_up = instructions[0]
        assert "follow-up" in follow_up and '"I fixed the retries."' in follow_up  # probes the last answer
        assert session.questions[0].text in follow_up
        assert f'"{session.questions[1].text}"' in instructions[1] and "question 2 of 3" in instructions[1]
        assert f'"{session.questions[2].text}"' in instructions[2]
        assert "stuck" in instructions[3] and session.questions[2].hint in instructions[3]
        assert "last question" in instructions[4]
        # The spoken history is the conversation itself: instructions never enter it.
        assert [m["role"] for m in scripted.spoken[1][1:-1]] == ["assistant", "user", "assistant", "user"]

        card = await runtime.finish()
        feedback = [m for m in sent if m["type"] == "feedback"]
        assert [f["question_index"] for f in sorted(feedback, key=lambda f: f["question_index"])] == [0, 1, 2]
        by_q = {f["question_index"]: f for f in feedback}
        assert by_q[0]["score"] == 8 and by_q[0]["source"] == "llm"
        assert by_q[0]["answer"] == "I fixed the retries. " + good(q[0])  # the answer and its follow-up together
        assert by_q[1]["score"] == 5  # invalid JSON was retried
        assert card["overall_score"] == pytest.approx((8 + 5 + 7) / 3, abs=0.05)
        assert card["strengths"] == ["Good examples."] and card["source"] == "llm"
        assert [m["type"] for m in sent][-2:] == ["scorecard", "session-ended"]
        assert any(m["type"] == "delivery" for m in sent)
    finally:
        await conv.aclose()
        await runtime.aclose()
        await client.aclose()


async def test_invalid_json_twice_degrades_to_text_feedback(fake_llm, event_log):
    fake_llm.reply_for = ScriptedLLM(["not json at all", "still {not json"])
    session = build("interviewer", {"questions": 1}, seed=1)
    sent: list[dict] = []
    client = llm(fake_llm.url)
    runtime = make_runtime(session, client, client, sent.append)
    conv = make_conv(session, runtime, event_log)
    try:
        await run_typed_interview(conv, event_log, [good(session.questions[0])])
        card = await runtime.finish()
        [fb] = [m for m in sent if m["type"] == "feedback"]
        assert fb["source"] == "heuristic" and "still {not json" in fb["note"] and 1 <= fb["score"] <= 10
        assert card["overall_score"] == fb["score"]
    finally:
        await conv.aclose()
        await runtime.aclose()
        await client.aclose()


async def test_offline_interview_runs_end_to_end_with_a_heuristic_scorecard(event_log):
    session = build("interviewer", {"role": "behavioural", "interview_type": "behavioural", "questions": 2}, seed=2)
    sent: list[dict] = []
    runtime = make_runtime(session, None, None, sent.append)
    conv = make_conv(session, runtime, event_log)
    try:
        q = session.questions
        await run_typed_interview(conv, event_log, ["It went fine.", good(q[0]), good(q[1])])
        spoken = " ".join(e.text for e in event_log.of(F.BotText) if e.spoken)
        assert session.questions[0].text in spoken and session.questions[1].text in spoken
        assert "result" in spoken.lower()  # the offline follow-up asked for the missing STAR part
        assert "connect a language model" in spoken
        card = await runtime.finish()
        assert card["source"] == "heuristic" and "no LLM" in card["note"]
        assert len(card["questions"]) == 2 and all(1 <= q["score"] <= 10 for q in card["questions"])
        assert card["strengths"] and card["improvements"]
        feedback = [m for m in sent if m["type"] == "feedback"]
        assert len(feedback) == 2 and all(f["star"] is not None for f in feedback)
        strong = next(f for f in feedback if f["question_index"] == 1)
        assert strong["star"] == {"situation": True, "task": True, "action": True, "result": True}
    finally:
        await conv.aclose()
        await runtime.aclose()


async def test_a_long_silence_after_a_question_gets_a_hint_offline(event_log):
    session = build("interviewer", {"questions": 2}, seed=4)
    runtime = make_runtime(session, None, None, lambda m: None)
    conv = make_conv(session, runtime, event_log)
    try:
        d = Driver(conv, event_log)
        conv.start()
        await d.run_until(lambda ev: any(isinstance(e, F.BotStoppedSpeaking) for e in ev))
        assert runtime.wants_hint()
        assert conv.respond()  # what the room does when the silence timer fires
        await d.run_until(lambda ev: len([e for e in ev if isinstance(e, F.BotStoppedSpeaking)]) == 2)
        spoken = [e.text for e in event_log.of(F.BotText) if e.spoken]
        assert any("hint" in s.lower() for s in spoken) and session.questions[0].hint.split()[0] in " ".join(spoken)
        assert not runtime.wants_hint()  # one hint per question
    finally:
        await conv.aclose()


# ---------------------------------------------------------------------------- the language teacher

@pytest.mark.parametrize("lang", ["de", "fr"])
async def test_teacher_language_sets_whisper_and_voice(lang, tiny_whisper_path, event_log, speech):
    session = build("teacher", {"language": lang, "level": "A2"})
    assert session.config.language == lang
    assert f"Always speak {session.language.label}" in session.config.system_prompt
    assert session.language.id == lang and session.config.greeting == session.language.greeting
    runtime = make_runtime(session, None, None, lambda m: None)
    conv = make_conv(session, runtime, event_log, stt=whisper(tiny_whisper_path))
    try:
        d = Driver(conv, event_log)
        await d.say(speech("fr_picovoice_cv.wav"), trailing_silence_s=0.8)
        await d.run_until(lambda ev: any(isinstance(e, F.Transcript) and e.final for e in ev))
        [final] = [e for e in event_log.of(F.Transcript) if e.final]
        assert final.language == lang  # Whisper was told the target language
    finally:
        await conv.aclose()
    assert ESPEAK_VOICES[lang] in ("de", "fr-fr") and EDGE_VOICES[lang].startswith(f"{lang}-")


async def test_teacher_sends_corrections_vocabulary_and_a_summary(fake_llm, event_log):
    def reply(body):
        name = (body.get("response_format") or {}).get("json_schema", {}).get("name")
        if name == "corrections":
            return json.dumps({"corrections": [{"original": "Ich habe gegangen", "corrected": "Ich bin gegangen",
                                                "explanation": "gehen forms its perfect tense with sein"}],
                               "vocabulary": [{"word": "der Bahnhof", "meaning": "the train station"}]})
        if name == "suggestions":
            return json.dumps({"suggestions": ["Practise the perfect tense with sein."]})
        return "Ach so, du bist zum Bahnhof gegangen! Und dann?"
    fake_llm.reply_for = reply
    session = build("teacher", {"language": "de", "level": "A2", "native_language": "en"})
    sent: list[dict] = []
    client = llm(fake_llm.url)
    runtime = make_runtime(session, client, client, sent.append)
    conv = make_conv(session, runtime, event_log)
    try:
        await run_typed_interview(conv, event_log, ["Ich habe zum Bahnhof gegangen."])
        summary = await runtime.finish()
        correction = next(m for m in sent if m["type"] == "correction")
        assert correction["corrected"] == "Ich bin gegangen"
        assert next(m for m in sent if m["type"] == "vocabulary")["word"] == "der Bahnhof"
        assert summary["corrections"] == [{k: correction[k] for k in ("original", "corrected", "explanation")}]
        assert summary["suggestions"] == ["Practise the perfect tense with sein."] and summary["language"] == "de"
        # Corrections are shown, not spoken: the reply the learner heard is the LLM's recast only.
        spoken = " ".join(e.text for e in event_log.of(F.BotText) if e.spoken)
        assert "sein" not in spoken and "Bahnhof gegangen" in spoken
        structured = [r for r in fake_llm.requests if r.get("response_format")]
        assert "German" in structured[0]["messages"][-1]["content"] and "English" in structured[0]["messages"][-1]["content"]
    finally:
        await conv.aclose()
        await runtime.aclose()
        await client.aclose()


async def test_an_unreachable_llm_does_not_stall_the_interview(event_log):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # closed as soon as we leave: connection refused
    session = build("interviewer", {"questions": 2}, seed=5)
    sent: list[dict] = []
    client = llm(dead, retries=0)
    runtime = make_runtime(session, client, client, sent.append)
    conv = make_conv(session, runtime, event_log)
    try:
        await run_typed_interview(conv, event_log, [good(session.questions[0])])
        spoken = " ".join(e.text for e in event_log.of(F.BotText) if e.spoken)
        assert session.questions[1].text in spoken  # asked from the bank
        notice = next(m for m in sent if m["type"] == "notice")
        assert "language model is unavailable" in notice["text"] and "question bank" in notice["text"]
        card = await runtime.finish()
        assert card["questions"][0]["score"] is not None and "unavailable" in card["note"]
    finally:
        await conv.aclose()
        await runtime.aclose()
        await client.aclose()


def test_personas_set_their_own_turn_endpoint():
    assert build("interviewer", {}).config.endpoint_silence_ms == 1400
    assert build("teacher", {}).config.endpoint_silence_ms == 1200


async def test_a_bad_persona_file_stops_server_start_up(data_copy):
    from agent.config import Settings
    from personas.catalog import use_data_dir
    from signaling.app import create_app

    path = data_copy / "questions" / "hr.yaml"
    path.write_text(path.read_text().replace("kind: technical", "kind: trivia", 1))
    app = create_app(Settings(personas_dir=str(data_copy), tts="espeak", _env_file=None))
    try:
        with pytest.raises(PersonaFileError, match=r"hr\.yaml: questions\.\d+\.kind"):
            async with app.router.lifespan_context(app):
                pass
    finally:
        use_data_dir(None)
